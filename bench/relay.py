"""`mailrelay-relay` started as a real process for the benchmark, with the flags of docs/contracts.md.

What it must not do: change relay behaviour beyond its documented flags (every figure is for the relay as
a user would run it), or leave a worker behind (stop() kills the whole process tree).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.request

from mailrelay_sandbox import netutil

from bench import procs, workdir


def relay_command() -> list[str]:
    script = pathlib.Path(sys.executable).parent / "mailrelay-relay"
    if script.exists():
        return [str(script)]
    found = shutil.which("mailrelay-relay")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from mailrelay_relay import cli; sys.exit(cli.main())"]


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
        self.workers = workers
        self.name = label or f"relay w{workers}"
        self.root = run.sub(self.name.replace(" ", "-"))
        self.upstream_port = upstream_port
        self.max_sessions = max_sessions
        self.extra = extra
        self.env = env or {}
        self.port = netutil.free_port()
        self.admin_port = netutil.free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            *relay_command(),
            "--listen", f"127.0.0.1:{self.port}",
            "--upstream", f"127.0.0.1:{self.upstream_port}",
            "--spool", str(self.root / "spool"),
            "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--workers", str(self.workers),
            "--max-sessions", str(self.max_sessions),
            "--hostname", "relay-bench.localdomain",
            "--drain-timeout", "10",
            *self.extra,
        ]  # fmt: skip

    def start(self) -> Relay:
        if self.proc is not None and self.proc.poll() is None:
            return self
        (self.root / "spool").mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILRELAY_")}
        env.update(self.env)
        with open(self.root / "relay.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        self.run.register(self.proc.pid)
        netutil.wait_for_greeting("127.0.0.1", self.port, timeout=60, proc=self.proc)
        self._wait_workers()
        for pid in procs.tree(self.proc.pid)[1:]:
            self.run.register(pid)
        return self

    def _wait_workers(self) -> None:
        """With N workers, wait until N+ processes exist and answer (SO_REUSEPORT spreads connections)."""
        assert self.proc is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.workers <= 1 or len(procs.tree(self.proc.pid)) >= self.workers:
                break
            time.sleep(0.1)
        for _ in range(4 * self.workers):
            netutil.wait_for_greeting("127.0.0.1", self.port, timeout=30, proc=self.proc)

    def healthy(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.admin_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as answer:
                return int(answer.status) == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc, timeout=30)
            self.proc = None

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pids(self) -> list[int]:
        return [] if self.proc is None else procs.tree(self.proc.pid)

    def cpu_seconds(self) -> float:
        reaped = [] if self.proc is None else [self.proc.pid]
        return procs.cpu_seconds(self.pids(), reaped_of=reaped)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = (self.root / "relay.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
