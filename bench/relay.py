"""`mailrelay-relay` as a benchmark target, with the flags of docs/contracts.md: the sandbox's one
relay-process wrapper (mailrelay_sandbox.relayproc) seen through the interface the benchmarks share with
bench/postfix.py (port, name, pids, CPU, log tail), its processes registered with the run folder.

What it must not do: change relay behaviour beyond its documented flags (every figure is for the relay as
a user would run it), or leave a worker behind (stop() stops the whole process group).
"""

from __future__ import annotations

from mailrelay_sandbox import relayproc

from bench import workdir


class Relay:
    """`with Relay(run, upstream_port, workers=2) as relay:` then send to 127.0.0.1:relay.port."""

    def __init__(
        self,
        run: workdir.RunDir,
        upstream_port: int,
        workers: int = 1,
        max_sessions: int = 1000,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        label: str | None = None,
    ) -> None:
        self.run = run
        self.name = label or f"relay w{workers}"
        root = run.sub(self.name.replace(" ", "-"))
        self.process = relayproc.RelayProcess(
            upstream=("127.0.0.1", upstream_port), spool=root / "spool", workers=workers,
            hostname="relay-bench.localdomain", token=None, env=env, log_path=root / "relay.log",
            extra_args=["--max-sessions", str(max_sessions), "--drain-timeout", "10", *extra],
            startup_timeout=60.0, stop_timeout=30.0,
        )
        self.port = self.process.smtp_port

    def start(self) -> Relay:
        if self.process.running:
            return self
        try:
            self.process.start()  # returns once every worker listens
        finally:
            for pid in self.process.pids():
                self.run.register(pid)
        return self

    def healthy(self) -> bool:
        return self.process.healthy()

    def stop(self) -> None:
        self.process.close()

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pids(self) -> list[int]:
        return self.process.pids()

    def cpu_seconds(self) -> float:
        return self.process.cpu_seconds()

    def log_tail(self, lines: int = 5) -> str:
        return "\n".join(self.process.log_text().splitlines()[-lines:])
