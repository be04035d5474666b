"""Static checks of the generated Grafana dashboards: fresh, stable uids, $datasource, contract names.

The live check (every panel query returns data from real relays) is in test_promql_live.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.chart import promql

EXPECTED_UIDS = {"mailrelay-relays", "mailrelay-operator"}


def test_committed_json_is_what_generate_py_builds() -> None:
    result = subprocess.run(
        [sys.executable, str(promql.ROOT / "dashboards" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"stale dashboards, run `make dashboards`:\n{result.stderr}"


def test_chart_carries_the_same_dashboards() -> None:
    chart_dir = promql.CHART / "dashboards"
    top = {p.name: p.read_bytes() for p in promql.DASHBOARD_DIR.glob("*.json")}
    chart = {p.name: p.read_bytes() for p in chart_dir.glob("*.json")}
    assert top == chart


def test_stable_uids_and_datasource_variable() -> None:
    boards = promql.dashboards()
    assert set(boards) == EXPECTED_UIDS
    ids = [p["id"] for b in boards.values() for p in b["panels"]]  # type: ignore[attr-defined]
    assert len(ids) == len({(uid, p["id"]) for uid, b in boards.items() for p in b["panels"]})  # type: ignore[attr-defined]
    for uid, board in boards.items():
        assert board["uid"] == uid
        variables = {v["name"]: v for v in board["templating"]["list"]}  # type: ignore[index]
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        for panel in board["panels"]:  # type: ignore[attr-defined]
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], f"panel {panel['title']!r} has no query"
            assert panel["type"] == "timeseries" and panel["options"]["legend"]["showLegend"], panel["title"]
            assert panel["id"] > 0 and panel["description"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize(
    "expression", promql.dashboard_expressions() + promql.dashboard_variable_queries(), ids=lambda e: e.where
)
def test_only_contract_metric_names(expression: promql.Expression) -> None:
    known = promql.contract_metrics()
    names = promql.METRIC_RE.findall(expression.expr)
    assert names, "every query reads a mailrelay metric"
    for name in names:
        assert promql.base_metric(name, known), f"{name} is not in docs/contracts.md"


def test_issue_coverage() -> None:
    """The panels the issue asks for exist (by the metric each one reads)."""
    exprs = " ".join(e.expr for e in promql.dashboard_expressions())
    for needle in (
        "mailrelay_relay_sessions",
        "mailrelay_relay_messages_accepted_total",
        "mailrelay_relay_messages_delivered_total",
        "mailrelay_relay_queue_messages",
        "mailrelay_relay_queue_oldest_age_seconds",
        'code=~"421|452|455"',
        "histogram_quantile(0.5, sum by (namespace, mailrelay, le) "
        "(rate(mailrelay_relay_delivery_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (namespace, mailrelay, le) "
        "(rate(mailrelay_relay_delivery_duration_seconds_bucket",
        "mailrelay_operator_desired_replicas",
        "mailrelay_operator_ready_replicas",
        "mailrelay_operator_draining_pods",
        "mailrelay_operator_scale_events_total",
        "mailrelay_operator_drain_duration_seconds_bucket",
    ):
        assert needle in exprs, needle
