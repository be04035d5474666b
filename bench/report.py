"""Printing the benchmark's figures as they come, and keeping them for out/bench/results.json.

What it must not do: compute figures (callers pass measured values) or print a number for a part that was
not measured: `pending()` prints "not yet measured" with the reason.
"""

from __future__ import annotations

import json
import pathlib
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


class Report:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def section(self, title: str) -> None:
        self.line("")
        self.line(f"== {title} ==")

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        sys.stdout.flush()

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
        for row in (header, *rows):
            self.line("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)))

    def record(self, key: str, value: Any) -> None:
        self.data[key] = value

    def pending(self, key: str, title: str, reason: str, status: str = "not yet measured") -> None:
        self.section(title)
        self.line(f"{status}: {reason}")
        self.record(key, {"status": status, "reason": reason})

    def save(self, path: pathlib.Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.data, indent=2, sort_keys=True, default=str) + "\n")


def run_module(json_path: pathlib.Path, measure: Callable[[Report], object]) -> int:
    """The tail of a bench module's `main`: SIGTERM exits cleanly (so every part stops what it started),
    `measure` fills a Report, the run time is printed and the figures are saved to `json_path`."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Report()
    started = time.monotonic()
    measure(out)
    out.line(f"done in {time.monotonic() - started:.0f} s; figures in {json_path}")
    out.save(json_path)
    return 0
