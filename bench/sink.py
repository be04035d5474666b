"""Postfix's `smtp-sink` as the upstream, with its running counter (`-c`) read live.

The counter line "sess=N quit=N mesg=N" is printed each time a message's "." arrives, so the time at which
the count reaches a target is the time that message reached the upstream: the end of an end-to-end run.

What it must not do: write the messages anywhere (it only counts them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

from mailrelay_sandbox import netutil, proctree

from bench import stats, workdir

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"


class Sink:
    def __init__(self, run: workdir.RunDir, backlog: int = 1024) -> None:
        self.run = run
        self.port = netutil.free_port()
        self.backlog = backlog
        self.proc: subprocess.Popen[bytes] | None = None
        self._count = 0
        self._stamp = 0.0
        self._cond = threading.Condition()

    def start(self) -> Sink:
        if self.proc is not None:
            return self
        self.proc = subprocess.Popen(
            [SMTP_SINK, "-c", "-u", "nobody", f"127.0.0.1:{self.port}", str(self.backlog)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        self.run.register(self.proc.pid)
        threading.Thread(target=self._read, daemon=True, name=f"sink-{self.port}").start()
        netutil.wait_for_greeting("127.0.0.1", self.port, timeout=10, proc=self.proc)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        buffer = b""
        while True:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return
            buffer += chunk
            *lines, buffer = buffer.replace(b"\n", b"\r").split(b"\r")
            for line in reversed(lines):
                value = stats.parse_sink_counter(line.decode("ascii", "replace"))
                if value is not None:
                    with self._cond:
                        if value > self._count:
                            self._count = value
                            self._stamp = time.monotonic()
                            self._cond.notify_all()
                    break

    @property
    def count(self) -> int:
        with self._cond:
            return self._count

    def wait_for(self, target: int, timeout: float) -> float | None:
        """Block until `target` messages arrived; the monotonic time it happened, None on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._count < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(timeout=min(left, 0.5))
            return self._stamp

    def wait_quiet(self, quiet: float = 0.5, timeout: float = 30.0) -> int:
        """Wait until the count stops moving for `quiet` seconds; return it."""
        deadline = time.monotonic() + timeout
        last = self.count
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.count
            if now == last:
                return now
            last = now
        return last

    def stop(self) -> None:
        if self.proc is not None:
            proctree.stop(self.proc)
            self.proc = None

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
