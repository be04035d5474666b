"""Where a benchmark run keeps its files, and how a later run cleans up after one that died.

Every run gets /tmp/mailrelay-bench/run-*/ with an `owner` file (the bench's pid and start time) and a
`pids` file (each process the run started, with its start time). `sweep()` stops and removes what a run
whose owner is gone left behind, and never touches a run whose owner still lives (a smoke test and a full
bench may run at the same time).

What it must not do: touch anything outside /tmp/mailrelay-bench, or signal a pid whose start time has
changed (a reused pid).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
import tempfile

from mailrelay_sandbox import proctree

BASE = pathlib.Path(os.environ.get("MAILRELAY_BENCH_DIR", "/tmp/mailrelay-bench"))


class RunDir:
    """One run's folder; `path` is readable by the `postfix` and `nobody` users."""

    def __init__(self) -> None:
        BASE.mkdir(parents=True, exist_ok=True)
        BASE.chmod(0o755)
        self.path = pathlib.Path(tempfile.mkdtemp(prefix="run-", dir=BASE))
        self.path.chmod(0o755)
        me = os.getpid()
        (self.path / "owner").write_text(f"{me} {proctree.start_time(me)}\n")

    def register(self, pid: int) -> None:
        with open(self.path / "pids", "a", encoding="ascii") as handle:
            handle.write(f"{pid} {proctree.start_time(pid)}\n")

    def sub(self, name: str) -> pathlib.Path:
        path = self.path / name
        path.mkdir(mode=0o755, exist_ok=True)
        path.chmod(0o755)
        return path

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _read_identities(path: pathlib.Path) -> list[tuple[int, int | None]]:
    out: list[tuple[int, int | None]] = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                out.append((int(parts[0]), int(parts[1])))
    return out


def owner_pid(run: pathlib.Path) -> int | None:
    owners = _read_identities(run / "owner")
    return owners[0][0] if owners else None


def owner_alive(run: pathlib.Path) -> bool:
    owners = _read_identities(run / "owner")
    return bool(owners) and all(proctree.start_time(pid) == started for pid, started in owners)


def sweep() -> list[str]:
    """Stop and delete what dead runs left behind; return a line per run cleaned."""
    cleaned: list[str] = []
    if not BASE.is_dir():
        return cleaned
    for run in sorted(BASE.glob("run-*")):
        if owner_alive(run):
            continue
        for config in run.glob("*/etc/main.cf"):
            subprocess.run(
                ["postfix", "-c", str(config.parent), "abort"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        proctree.kill_leftovers(_read_identities(run / "pids"))
        shutil.rmtree(run, ignore_errors=True)
        cleaned.append(str(run))
    return cleaned
