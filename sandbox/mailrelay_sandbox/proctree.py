"""Process trees read from /proc: a process and its descendants, their CPU and memory, and stopping a
process with whatever it started, for the benchmark and the relay-process wrapper (relayproc).

What it must not do: signal any process it was not handed (callers pass the pids they started).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterable

CLK_TCK = os.sysconf("SC_CLK_TCK")


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
