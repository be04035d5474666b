"""How long a group commit of k small messages takes on this disk, three ways: one file per message, one
after another (create, write, fdatasync, rename; then fsync the directory: the relay's first spool), the
same with the files written and fdatasynced from parallel threads (ext4 folds concurrent fsyncs into one
journal commit, which Postfix's parallel cleanup processes get for free; the relay's spool since
09b9244 until 3 Dec 2026), and all k messages in one batch file (one fdatasync, one rename, one
directory fsync: the relay's spool now). It is the evidence behind that change, measured in the bench's
own folder.

What it must not do: write outside the folder it is given (and it removes what it wrote).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import pathlib
import shutil
import time
from collections.abc import Callable

from bench import report, stats

PAYLOAD = b"x" * 2300


class _Spool:
    def __init__(self, root: pathlib.Path) -> None:
        self.tmp = root / "tmp"
        self.queue = root / "queue"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.queue.mkdir(exist_ok=True)
        self.ids = itertools.count()
        self.pool = concurrent.futures.ThreadPoolExecutor(16)

    def write_one(self, size: int = 1) -> None:
        name = str(next(self.ids))
        fd = os.open(self.tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, PAYLOAD * size)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.rename(self.tmp / name, self.queue / name)

    def sync_dir(self) -> None:
        fd = os.open(self.queue, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sequential(self, k: int) -> None:
        for _ in range(k):
            self.write_one()
        self.sync_dir()

    def parallel(self, k: int) -> None:
        list(self.pool.map(lambda _: self.write_one(), range(k)))
        self.sync_dir()

    def one_file(self, k: int) -> None:
        self.write_one(size=k)
        self.sync_dir()


def run(folder: pathlib.Path, out: report.Report, rounds: int = 40) -> dict[str, dict[str, float]]:
    out.line("")
    out.line(f"Group commit of k 2 KiB messages on this disk, three ways ({rounds} rounds, ms):")
    root = folder / "commit-probe"
    spool = _Spool(root)
    results: dict[str, dict[str, float]] = {}
    rows = []
    try:
        for k in (3, 10):
            ways: tuple[tuple[str, Callable[[int], None]], ...] = (
                ("per file, one after another", spool.sequential),
                ("per file, in parallel threads (the relay until 3 Dec 2026)", spool.parallel),
                ("one batch file (the relay now)", spool.one_file),
            )
            for name, way in ways:
                samples = []
                for _ in range(rounds):
                    started = time.perf_counter()
                    way(k)
                    samples.append(1000 * (time.perf_counter() - started))
                p50, p90 = stats.percentile(samples, 50), stats.percentile(samples, 90)
                results[f"k={k} {name}"] = {"p50_ms": p50, "p90_ms": p90}
                rows.append([str(k), name, stats.fmt(p50, 2), stats.fmt(p90, 2)])
    finally:
        spool.pool.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    out.table(["k", "commit", "p50 ms", "p90 ms"], rows)
    out.record("commit_strategies", results)
    return results
