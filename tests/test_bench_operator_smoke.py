"""Smoke test of the benchmarks on the real control plane (`python -m bench.operator_reaction`,
`bench.operator_footprint`, `bench.scalein`, `bench.controlplane`): each runs end to end at its smallest
size, so the harness cannot rot.

They run at once, as subprocesses (about a minute together), each on a control plane of its own. The test
checks that each exits 0, writes its figures, that the figures are internally consistent (every step
measured, every emulated pod scraped through the admin contract with its token, mail delivered in both
scale-in modes), and that no sandbox folder is left behind. It asserts no speed and no target: performance
belongs in `make bench`.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

PREFIXES = ("mailrelay-bench-reaction-", "mailrelay-bench-footprint-", "mailrelay-bench-scalein-",
            "mailrelay-bench-kube-")


def _leftovers() -> set[pathlib.Path]:
    tmp = pathlib.Path(tempfile.gettempdir())
    return {path for prefix in PREFIXES for path in tmp.glob(f"{prefix}*")}


@pytest.mark.timeout(420)
def test_operator_benchmarks_run_at_their_smallest_size(tmp_path: pathlib.Path) -> None:
    before = _leftovers()
    runs = {
        "reaction": ["bench.operator_reaction", "--quick", "--steps", "1"],
        "footprint": ["bench.operator_footprint", "--quick", "--relays", "3", "--window", "4"],
        "scalein": ["bench.scalein", "--quick"],
        "controlplane": ["bench.controlplane", "--quick"],
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", *argv, "--json", str(tmp_path / f"{name}.json")],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name, argv in runs.items()
    }  # fmt: skip
    outputs = {name: proc.communicate(timeout=400)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}:\n{outputs[name]}"

    reaction = json.loads((tmp_path / "reaction.json").read_text())["operator_reaction"]
    assert reaction["steps"] == 1 and len(reaction["reaction_seconds"]) == 1, reaction
    assert reaction["reaction_seconds"][0] >= 0.0
    assert "HPA + prometheus-adapter" in outputs["reaction"]
    assert "not measured here" in outputs["reaction"]

    footprint = json.loads((tmp_path / "footprint.json").read_text())["operator_footprint"]
    assert footprint["relays"] == 3 and footprint["pods"] == 9, footprint
    assert footprint["status_scrapes"] > 0, footprint     # the operator scraped the emulated admin API
    assert footprint["unauthorized"] == 0, footprint      # always with the pod's bearer token
    assert footprint["rss_mib_max"] > 0 and footprint["cpu_percent_of_one_core"] >= 0, footprint
    # the API server's own count of the operator's requests (its ServiceAccount's FlowSchema)
    # (none may fall in a 4 s window: the status is written at most every 15 s, the watches are open)
    assert footprint["operator_requests_total"] > 0, footprint
    assert footprint["operator_requests_per_second"] >= 0, footprint

    controlplane = json.loads((tmp_path / "controlplane.json").read_text())["controlplane"]
    assert len(controlplane["runs"]) == 1 and controlplane["start_max"] > 0, controlplane
    assert "kube-apiserver v1.36" in outputs["controlplane"]

    scalein = json.loads((tmp_path / "scalein.json").read_text())["scale_in"]
    for mode in ("drain_first", "naive"):
        result = scalein[mode]
        assert result["removed"] == 2, result               # 3 relays -> 1 in both modes
        assert result["accepted"] > 0, result
        assert result["delivered"] > 0 and 0 <= result["lost"] <= result["accepted"], result
    assert "drain-first vs naive" in outputs["scalein"]
    assert _leftovers() - before == set()
