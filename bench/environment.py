"""What the machine was doing while the benchmark ran: CPU model, load, pressure and the latency of one
2 KiB write + fdatasync in the bench's folder. On a shared 2-core box these explain run-to-run spread;
the ratios (servers taking turns in the same run) are the figures to compare.

What it must not do: judge the numbers; it only reports them.
"""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess
import sys
import time

from bench import stats


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
    }


def relay_revision() -> str:
    """The checkout's commit, and whether relay/ has changes not committed (the relay runs from it)."""
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "relay"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + (" (relay/ has uncommitted changes)" if dirty.stdout.strip() else "")


def pressure(kind: str) -> str:
    try:
        first = pathlib.Path(f"/proc/pressure/{kind}").read_text().splitlines()[0]
    except (OSError, IndexError):
        return "n/a"
    fields = dict(f.split("=", 1) for f in first.split()[1:] if "=" in f)
    return f"{fields.get('avg60', '?')}%"


def fsync_ms(folder: pathlib.Path, count: int = 100) -> tuple[float, float]:
    """p50 and p99 milliseconds of write(2 KiB) + fdatasync on a fresh file in `folder`."""
    path = folder / "fsync-probe"
    samples = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(count):
            started = time.perf_counter()
            os.write(fd, b"x" * 2048)
            os.fdatasync(fd)
            samples.append(1000 * (time.perf_counter() - started))
    finally:
        os.close(fd)
        path.unlink()
    return stats.percentile(samples, 50), stats.percentile(samples, 99)


def snapshot(folder: pathlib.Path) -> dict[str, str]:
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    p50, p99 = fsync_ms(folder)
    return {
        "loadavg": load,
        "cpu_pressure_avg60": pressure("cpu"),
        "io_pressure_avg60": pressure("io"),
        "fdatasync_2k_ms": f"p50 {p50:.2f} p99 {p99:.2f}",
    }


def line(snap: dict[str, str]) -> str:
    return (
        f"load {snap['loadavg']}, CPU pressure {snap['cpu_pressure_avg60']}, IO pressure "
        f"{snap['io_pressure_avg60']}, 2 KiB write+fdatasync {snap['fdatasync_2k_ms']} ms"
    )
