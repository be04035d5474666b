"""Loopback sockets for the sandbox, the tests and the benchmark: a free port, and waiting until an SMTP
server greets.

What it is for: the one `free_port`, `accepts` and `wait_for_greeting` every harness uses, so that a
server started on a port found here is waited for the same way everywhere.

What it must not do: bind anything but the address it is given (loopback in practice), or keep a socket
open after it returns.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (IPv4 or IPv6 literal), and never one this process was
    given before: a caller often binds its port later (a sink started after a relay was killed), and
    the kernel may hand the same free port to the next caller meanwhile."""
    for _ in range(1000):
        with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no TCP port left that this process was not given before")


def accepts(host: str, port: int, timeout: float = 2.0) -> bool:
    """Something accepts TCP connections on host:port right now (the connection is closed at once)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_greeting(host: str, port: int, *, timeout: float = 60.0,
                      proc: subprocess.Popen[bytes] | None = None) -> str:
    """Connect until the server on host:port answers 220 (then QUIT); return the greeting line.

    Raises RuntimeError when `proc` exits first, TimeoutError when no greeting came within `timeout`.
    """
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it greeted on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=5) as sock:
                line = sock.makefile("rb").readline()
                if line.startswith(b"220"):
                    with contextlib.suppress(OSError):
                        sock.sendall(b"QUIT\r\n")
                    return line.decode("ascii", "replace").strip()
                last = f"greeting {line!r}"
        except OSError as error:
            last = str(error)
        time.sleep(0.05)
    raise TimeoutError(f"no 220 greeting on {host}:{port} within {timeout:.0f}s ({last})")
