"""The relay's metrics: every name from docs/contracts.md is exposed, with the right type and labels,
and multiprocess mode aggregates several worker processes into one exposition."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    "mailrelay_relay_notifications": ("counter", {"kind"}),
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


def test_delivery_counters_refuse_an_unknown_label() -> None:
    """The helpers delivery calls keep their labels bounded: an unknown reason or result is an error."""
    with pytest.raises(ValueError):
        metrics.dead_lettered("because")
    with pytest.raises(ValueError):
        metrics.attempt("maybe")


def test_a_real_relay_labels_replies_by_code_and_connections_by_result(tmp_path: Path) -> None:
    """Bounded labels as a real relay sets them: after a session of garbage, every `replies` series is
    labelled with a three-digit code, each code the client saw is counted as often as it was sent, and
    nothing the client wrote became a label; the connection is counted once, as accepted."""
    from mailrelay_sandbox import relayproc, smtpwire, waiting
    from mailrelay_sandbox import sink as sinkmod

    garbage = ["EHLO client.test", "4xx; DROP TABLE", "MAIL FROM:<a@example.org>", "DATA",
               "NOOP " + "x" * 600, "RCPT TO:<\x01@example.org>", "QUIT"]
    with sinkmod.running() as upstream, relayproc.RelayProcess(
        upstream=(upstream.host, upstream.port), spool=tmp_path / "spool", token="t0ken"
    ) as relay:
        with smtpwire.Wire(relay.smtp_address) as wire:
            assert wire.greeting is not None
            sent = collections.Counter([str(wire.greeting[0])])
            for line in garbage:
                sent[str(wire.cmd(line)[0])] += 1
        families: dict[str, Any] = {}

        def counted() -> bool:  # reply counts are published on the workers' 0.1 s timer
            families.update((f.name, f) for f in parser.text_string_to_metric_families(relay.metrics()))
            return "mailrelay_relay_replies" in families and \
                family_value(families, "mailrelay_relay_replies") >= sum(sent.values())

        waiting.wait_until(counted, what="every reply counted")
    replies = {s.labels["code"]: s.value for s in families["mailrelay_relay_replies"].samples
               if s.name == "mailrelay_relay_replies_total"}
    assert all(re.fullmatch(r"[2-5][0-9][0-9]", code) for code in replies), replies
    assert {code: replies.get(code, 0) for code in sent} == dict(sent)
    assert len(sent) >= 3, sent  # the garbage really drew different answers
    assert family_value(families, "mailrelay_relay_connections", result="accepted") == 1
    assert family_value(families, "mailrelay_relay_connections") == 1


WORKER = """
import sys
import time
from mailrelay_relay import metrics
metrics.MESSAGES_ACCEPTED.inc(int(sys.argv[1]))
metrics.SESSIONS.set(int(sys.argv[1]))
metrics.set_queue(int(sys.argv[1]), 100, float(sys.argv[1]))
metrics.attempt("success")
"""

RENDER = """
import sys
import time
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
    metrics.REPLIES.labels(code="250").inc()
    metrics.DELIVERY_DURATION.observe(0.2)
    out = subprocess.run([promtool, "check", "metrics"], input=metrics.render(), capture_output=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == b"" and out.stderr.strip() == b""


def family_value(families: dict[str, Any], name: str, **labels: str) -> float:
    """A counter's/gauge's value (or a histogram's count), summed over samples matching `labels`."""
    return float(sum(s.value for s in families[name].samples
                     if s.name in (name, name + "_total", name + "_count")
                     and all(s.labels.get(k) == v for k, v in labels.items())))


@pytest.mark.parametrize("workers", [1, 2])
def test_real_relay_exposes_one_coherent_view(tmp_path: Path, workers: int) -> None:
    """A real `mailrelay-relay` (1 or 2 workers): after N messages through it to the sink, /metrics
    shows every contract name, and the counters summed over the workers equal N exactly."""
    import smtplib

    from mailrelay_sandbox import relayproc, waiting
    from mailrelay_sandbox import sink as sinkmod

    from tests.conftest import require_tool

    n = 12
    with sinkmod.running() as upstream, relayproc.RelayProcess(
        upstream=(upstream.host, upstream.port), spool=tmp_path / "spool", token="t0ken", workers=workers
    ) as relay:
        for i in range(n):  # one session per message, so SO_REUSEPORT spreads them over the workers
            with smtplib.SMTP(*relay.smtp_address, timeout=60) as client:
                client.sendmail("a@example.org", ["b@example.org"], f"Subject: {i}\r\n\r\nx\r\n".encode())
        assert upstream.wait_for(n, 60)
        scraped: dict[str, Any] = {}

        def settled() -> bool:
            # The queue gauge drops when the spool file is unlinked, a moment after the upstream's 250,
            # and reply counts are published on the workers' 0.1 s timer.
            scraped["text"] = relay.metrics()
            scraped["families"] = {f.name: f for f in parser.text_string_to_metric_families(scraped["text"])}
            return family_value(scraped["families"], "mailrelay_relay_messages_delivered") == n and \
                family_value(scraped["families"], "mailrelay_relay_queue_messages") == 0 and \
                "mailrelay_relay_replies" in scraped["families"]

        waiting.wait_until(settled, within=60, every=0.2, what=f"{n} deliveries counted, the queue empty")
        text, families = scraped["text"], scraped["families"]
        for name in EXPECTED:
            assert name in families, name
        assert family_value(families, "mailrelay_relay_messages_accepted") == n
        assert family_value(families, "mailrelay_relay_messages_delivered") == n
        assert family_value(families, "mailrelay_relay_delivery_attempts", result="success") == n
        assert family_value(families, "mailrelay_relay_delivery_duration_seconds") == n
        assert family_value(families, "mailrelay_relay_message_size_bytes") == n
        assert family_value(families, "mailrelay_relay_queue_messages") == 0
        assert family_value(families, "mailrelay_relay_max_sessions") == relay.status()["max_sessions"]
        assert len(families["mailrelay_relay_build_info"].samples) == 1
        promtool = require_tool("promtool")
        lint = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True,
                              timeout=60)
        assert lint.returncode == 0, lint.stdout + lint.stderr
