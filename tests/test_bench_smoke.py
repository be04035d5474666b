"""Smoke test of `python -m bench`: the harness runs end to end at a tiny size, so it cannot rot.

It checks that every message reached the sink for Postfix and for the relay, that the figures are
printed, and that nothing is left behind. It asserts no speed: performance belongs in `make bench`.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from bench import stats, workdir
from tests.conftest import REPO_ROOT, missing, require_tool


@pytest.mark.parametrize(
    ("values", "pct", "expected"),
    [
        ([1.0], 50, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 99, 4.0),
        ([5.0, 1.0, 3.0], 0, 1.0),
        (list(map(float, range(1, 101))), 99, 99.0),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], pct: float, expected: float) -> None:
    assert stats.percentile(values, pct) == expected


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(stats.percentile([], 50))


@pytest.mark.parametrize(
    ("line", "expected"),
    [("sess=3 quit=2 mesg=17", 17), ("mesg=0", 0), ("sess=1 quit=1", None), ("", None), ("mesg=x", None)],
)
def test_sink_counter_line(line: str, expected: int | None) -> None:
    assert stats.parse_sink_counter(line) == expected


def test_ratio_and_format() -> None:
    assert stats.fmt_ratio(stats.ratio(125.0, 100.0)) == "1.25x"
    assert stats.fmt_ratio(stats.ratio(1.0, 0.0)) == "n/a"


@pytest.mark.timeout(120)
def test_quick_throughput_run_delivers_everything_and_cleans_up(tmp_path: pathlib.Path) -> None:
    for tool in ("postfix", "smtp-source", "smtp-sink"):
        require_tool(tool)
    if os.geteuid() != 0:
        missing("a private Postfix instance needs root (postfix -c DIR start)")
    result_file = tmp_path / "results.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "throughput", "--quick", "--json", str(result_file)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stdout, stderr = proc.communicate(timeout=110)
    assert proc.returncode == 0, stdout + stderr
    assert "== Throughput" in stdout
    samples = json.loads(result_file.read_text())["throughput"]
    servers = {s["server"] for s in samples}
    assert {"postfix", "relay w1", "relay w2"} <= servers, stdout
    for sample in samples:
        assert sample["delivered"] == sample["messages"], sample
        assert sample["e2e_rate"] > 0, sample
    ours = [
        run for run in workdir.BASE.glob("run-*") if (run / "owner").read_text().split()[0] == str(proc.pid)
    ]
    assert ours == [], f"left behind: {ours}"
