"""The benchmark's Postfix: a private instance relaying from a loopback port to a smarthost on loopback.

The instance itself (its main.cf and master.cf, `postfix -c <folder>/etc start`, its own queue_directory,
data_directory and maillog_file, and a stop that leaves no process behind) is mailrelay_sandbox.mtas.
Postfix, which the client-MTA tests run too; this wraps it for a run: the folder is a RunDir's, the
master's pid is registered so that workdir.sweep() can clean up after a run that died, and the
benchmark reads its processes, CPU and deliveries. Settings are Postfix defaults except what makes it a
loopback relay and `default_process_limit`, which the caller picks (the session cap); no pickup service.

What it must not do: write outside its folder, or leave a master process behind.
"""

from __future__ import annotations

from mailrelay_sandbox import mtas, netutil, proctree

from bench import workdir


class Postfix:
    """`with Postfix(run, upstream_port, process_limit) as pf:` then send to 127.0.0.1:pf.port."""

    name = "postfix"

    def __init__(self, run: workdir.RunDir, upstream_port: int, process_limit: int, label: str = "postfix"):
        self.run = run
        self.instance = mtas.Postfix(run.sub(label), ("127.0.0.1", upstream_port),
                                     process_limit=process_limit, label="postfix-bench",
                                     port=netutil.free_port(), pickup=False)
        self.root = self.instance.folder
        self.port = self.instance.port

    @property
    def master_pid(self) -> int | None:
        return self.instance.master_pid

    def running(self) -> bool:
        return self.instance.running()

    def start(self) -> Postfix:
        if self.instance.running():  # idempotent: a second start() is a no-op
            return self
        self.instance.start()
        assert self.instance.master_pid is not None
        self.run.register(self.instance.master_pid)
        return self

    def stop(self) -> None:
        self.instance.stop()

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pids(self) -> list[int]:
        return [] if self.master_pid is None else proctree.tree(self.master_pid)

    def cpu_seconds(self) -> float:
        reaped = [] if self.master_pid is None else [self.master_pid]
        return proctree.cpu_seconds(self.pids(), reaped_of=reaped)

    def sent_count(self) -> int:
        """Lines with status=sent in the instance's maillog (deliveries Postfix made to the smarthost)."""
        return self.instance.sent_count()

    def log_tail(self, lines: int = 5) -> str:
        return self.instance.log_tail(lines)
