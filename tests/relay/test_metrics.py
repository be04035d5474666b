"""The relay's metrics: every name from docs/contracts.md is exposed, with the right type and labels,
and multiprocess mode aggregates several worker processes into one exposition."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mailrelay_relay import metrics
from prometheus_client import parser

REPO_ROOT = Path(__file__).resolve().parents[2]

# name -> (type, label names), transcribed from docs/contracts.md below and cross-checked against it.
EXPECTED = {
    "mailrelay_relay_build_info": ("gauge", {"version"}),
    "mailrelay_relay_sessions": ("gauge", set()),
    "mailrelay_relay_max_sessions": ("gauge", set()),
    "mailrelay_relay_connections": ("counter", {"result"}),
    "mailrelay_relay_replies": ("counter", {"code"}),
    "mailrelay_relay_messages_accepted": ("counter", set()),
    "mailrelay_relay_messages_delivered": ("counter", set()),
    "mailrelay_relay_messages_dead_lettered": ("counter", {"reason"}),
    "mailrelay_relay_delivery_attempts": ("counter", {"result"}),
    "mailrelay_relay_queue_messages": ("gauge", set()),
    "mailrelay_relay_queue_bytes": ("gauge", set()),
    "mailrelay_relay_queue_oldest_age_seconds": ("gauge", set()),
    "mailrelay_relay_inflight_bytes": ("gauge", set()),
    "mailrelay_relay_draining": ("gauge", set()),
    "mailrelay_relay_delivery_duration_seconds": ("histogram", set()),
    "mailrelay_relay_message_size_bytes": ("histogram", set()),
    "mailrelay_relay_spool_fsync_duration_seconds": ("histogram", set()),
}


def contract_names() -> set[str]:
    text = (REPO_ROOT / "docs" / "contracts.md").read_text()
    section = text.split("## Relay metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(mailrelay_relay_[a-z_]+)`", section, flags=re.M))


def test_expected_table_matches_contract() -> None:
    counters = {n for n, (t, _) in EXPECTED.items() if t == "counter"}
    names = {n + "_total" if n in counters else n for n in EXPECTED}
    assert names == contract_names()


def test_every_contract_metric_is_exposed_with_type_and_labels() -> None:
    families = {f.name: f for f in parser.text_string_to_metric_families(metrics.render().decode())}
    for name, (typ, labels) in EXPECTED.items():
        assert name in families, name
        family = families[name]
        assert family.type == typ, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
    build = [s for s in families["mailrelay_relay_build_info"].samples]
    assert build and build[0].value == 1.0


def test_bounded_labels_are_enforced() -> None:
    metrics.reply("421")
    metrics.reply("4xx; DROP TABLE")
    text = metrics.render().decode()
    assert 'mailrelay_relay_replies_total{code="421"}' in text
    assert 'code="other"' in text
    assert "DROP" not in text
    with pytest.raises(ValueError):
        metrics.dead_lettered("because")
    with pytest.raises(ValueError):
        metrics.attempt("maybe")
    with pytest.raises(ValueError):
        metrics.connection("whatever")


WORKER = """
import sys
from mailrelay_relay import metrics
metrics.MESSAGES_ACCEPTED.inc(int(sys.argv[1]))
metrics.SESSIONS.set(int(sys.argv[1]))
metrics.set_queue(int(sys.argv[1]), 100, float(sys.argv[1]))
metrics.attempt("success")
"""

RENDER = """
import sys
from mailrelay_relay import metrics
for pid in sys.argv[1:]:
    metrics.mark_process_dead(int(pid))
sys.stdout.write(metrics.render().decode())
"""


def test_multiprocess_mode_aggregates_workers(tmp_path: Path) -> None:
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    pids = []
    for amount in (3, 4):
        proc = subprocess.run([sys.executable, "-c", WORKER, str(amount)], env=env, check=True, timeout=60)
        assert proc.returncode == 0
    out = subprocess.run(
        [sys.executable, "-c", RENDER], env=env, check=True, timeout=60, capture_output=True, text=True
    ).stdout
    families = {f.name: f for f in parser.text_string_to_metric_families(out)}
    assert families["mailrelay_relay_messages_accepted"].samples[0].value == 7
    # Live gauges: the worker processes exited, but nobody marked them dead yet, so they still count.
    assert families["mailrelay_relay_sessions"].samples[0].value == 7
    assert families["mailrelay_relay_queue_oldest_age_seconds"].samples[0].value == 4
    attempts = {s.labels["result"]: s.value for s in families["mailrelay_relay_delivery_attempts"].samples}
    assert attempts["success"] == 2
    # Once the supervisor marks the workers dead, their live gauges vanish but counters stay.
    for f in tmp_path.iterdir():
        m = re.search(r"_(\d+)\.db$", f.name)
        if m and f.name.startswith("gauge_live"):
            pids.append(m.group(1))
    assert pids
    out = subprocess.run(
        [sys.executable, "-c", RENDER, *pids], env=env, check=True, timeout=60, capture_output=True,
        text=True,
    ).stdout
    families = {f.name: f for f in parser.text_string_to_metric_families(out)}
    assert families["mailrelay_relay_messages_accepted"].samples[0].value == 7
    sessions = families["mailrelay_relay_sessions"].samples
    assert sum(s.value for s in sessions) == 0


def test_promtool_lints_the_exposition_clean() -> None:
    """Prometheus's own linter (naming, units, _total, help) finds nothing to complain about."""
    from tests.conftest import require_tool

    promtool = require_tool("promtool")
    metrics.reply("250")
    metrics.DELIVERY_DURATION.observe(0.2)
    out = subprocess.run([promtool, "check", "metrics"], input=metrics.render(), capture_output=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == b"" and out.stderr.strip() == b""
