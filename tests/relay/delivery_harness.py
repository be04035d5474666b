"""Helpers for the delivery tests that run `delivery.Delivery` in-process against a real upstream (no
tests here): the counters they read, the message content they queue, their deadline, and Postfix's
`smtp-sink` as an upstream that dumps each transaction (`SmtpSink`).

What it must not do: decide what delivery should do; the tests assert that.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import tempfile
import time

from prometheus_client import REGISTRY

from tests.conftest import require_tool

WAIT = 60.0  # generous: other engineers load this 2-core machine at the same time


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Counters:
    """Deltas of the delivery counters since creation (the registry is process-wide)."""

    NAMES = {
        "delivered": ("mailrelay_relay_messages_delivered_total", {}),
        "dl_permanent": ("mailrelay_relay_messages_dead_lettered_total", {"reason": "permanent"}),
        "dl_expired": ("mailrelay_relay_messages_dead_lettered_total", {"reason": "expired"}),
        "success": ("mailrelay_relay_delivery_attempts_total", {"result": "success"}),
        "temporary": ("mailrelay_relay_delivery_attempts_total", {"result": "temporary"}),
        "permanent": ("mailrelay_relay_delivery_attempts_total", {"result": "permanent"}),
        "connection_error": ("mailrelay_relay_delivery_attempts_total", {"result": "connection_error"}),
        "duration_count": ("mailrelay_relay_delivery_duration_seconds_count", {}),
    }

    def __init__(self) -> None:
        self.base = {k: sample(n, **labels) for k, (n, labels) in self.NAMES.items()}

    def __getitem__(self, key: str) -> float:
        name, labels = self.NAMES[key]
        return sample(name, **labels) - self.base[key]


def content(n: int) -> bytes:
    return (f"From: a@example.org\r\nTo: b@example.org\r\nSubject: test {n}\r\n\r\n"
            f"line one of {n}\r\n.leading dot\r\n").encode()


class SmtpSink:
    """One `smtp-sink` process that dumps every transaction to a file in its own directory."""

    def __init__(self, port: int, *flags: str) -> None:
        self.port = port
        self.dump = pathlib.Path(tempfile.mkdtemp(prefix="mailrelay-smtp-sink-"))
        self.dump.chmod(0o777)  # smtp-sink writes as user nobody
        args = [require_tool("smtp-sink"), "-u", "nobody", *flags, "-d", f"{self.dump}/%M.",
                f"127.0.0.1:{port}", "1000"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else b""
                raise RuntimeError(f"smtp-sink exited: {err!r}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.recv(100)  # the greeting (or the 421 it was told to send)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def files(self) -> list[pathlib.Path]:
        return [p for p in self.dump.rglob("*") if p.is_file()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()
        for p in self.files():
            p.unlink()
        for d in sorted(self.dump.rglob("*"), reverse=True):
            d.rmdir()
        os.rmdir(self.dump)
