"""Process and socket plumbing for the benchmark: free ports, waiting for a greeting, process trees and
their memory and CPU, and stopping what the benchmark started.

What it must not do: signal any process it was not handed (callers pass the pids they started).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_greeting(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> str:
    """Connect until the server answers its SMTP greeting; return the greeting line."""
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before greeting on :{port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
                line = sock.makefile("rb").readline().decode("ascii", "replace").strip()
                if line.startswith("220"):
                    with contextlib.suppress(OSError):
                        sock.sendall(b"QUIT\r\n")
                    return line
                last_error = f"greeting {line!r}"
        except OSError as error:
            last_error = str(error)
        time.sleep(0.1)
    raise TimeoutError(f"no SMTP greeting on 127.0.0.1:{port} within {timeout}s ({last_error})")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces; fields after it are space-separated.
    return text[text.rfind(")") + 2 :].split()


def children_map() -> dict[int, list[int]]:
    result: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        result.setdefault(int(fields[1]), []).append(int(entry))
    return result


def tree(root: int) -> list[int]:
    """`root` and every live descendant."""
    kids = children_map()
    out: list[int] = []
    stack = [root]
    while stack:
        pid = stack.pop()
        if _stat_fields(pid) is None:
            continue
        out.append(pid)
        stack.extend(kids.get(pid, []))
    return out


def cpu_seconds(pids: Iterable[int], reaped_of: Iterable[int] = ()) -> float:
    """User+system CPU of `pids`; for `reaped_of` also the CPU of their children already waited for."""
    total = 0
    reaped = set(reaped_of)
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # Fields after the name start at 3 (state), so utime=14 is index 11, stime 12, cutime 13, cstime 14.
        total += int(fields[11]) + int(fields[12])
        if pid in reaped:
            total += int(fields[13]) + int(fields[14])
    return total / CLK_TCK


def memory_kib(pids: Iterable[int]) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in KiB over `pids`, from /proc/PID/smaps_rollup."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as handle:
                for line in handle:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a pid from a reused one)."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def kill_leftovers(identities: Iterable[tuple[int, int | None]]) -> None:
    """SIGKILL each (pid, start time) that is still the same process."""
    for pid, started in identities:
        if started is not None and start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Signal `proc`, wait, then SIGKILL it and whatever it had started that is still alive."""
    if proc.poll() is not None:
        return
    identities = [(pid, start_time(pid)) for pid in tree(proc.pid)]
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=5)
    kill_leftovers(identities[1:])
