"""Every PromQL expression the project ships returns data from a real Prometheus scraping real relays
and the real operator under load, on the real control plane (the scenario of tests/chart/livestack.py;
only the kubelet, pod discovery and the MTA clients are simulated there).

A panel that shows nothing under load is a failed test: each dashboard query, run as Grafana would run
it over the scenario's time range, must give at least one series with a finite value. Alert expressions
are checked on their signal: each comparison with a number becomes a `bool` comparison (`x > 300` becomes
`x > bool 300`) and `absent(x)` becomes `x`, so the expression returns a series whenever the metrics it
reads exist, whether the alert would fire or not; a misspelt metric or label still returns nothing.
"""

from __future__ import annotations

import math
import re

import pytest

from tests.chart import livestack, promql

# The first test to use the live stack runs its scenario (and may start the session's control plane).
pytestmark = pytest.mark.timeout(900)

RATE_INTERVAL = "5s"  # Grafana's $__rate_interval for a 1s scrape interval is 4s plus the step


def _params(expressions: list[promql.Expression]) -> list[object]:
    return [pytest.param(expression, id=expression.where) for expression in expressions]


DASHBOARD_EXPRESSIONS = _params(promql.dashboard_expressions())
ALERT_EXPRESSIONS = _params(promql.alert_expressions())


def grafana_substitute(expr: str) -> str:
    return (
        expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$namespace", ".*")
        .replace("$mailrelay", ".*")
    )


def signal_of(expr: str) -> str:
    expr = re.sub(r"(==|!=|>=|<=|>|<)\s*(?=[0-9.])", r"\1 bool ", expr)
    return re.sub(r"\babsent\((.*)\)", r"(\1)", expr, flags=re.DOTALL)


def finite_points(result: list[dict[str, object]]) -> int:
    return sum(
        1
        for series in result
        for _, value in series["values"]  # type: ignore[attr-defined]
        if not math.isnan(float(value))
    )


def test_signal_transformation() -> None:
    assert signal_of("max(x) > 3600") == "max(x) > bool 3600"
    assert signal_of('absent(up{job="a"} == 1)') == '(up{job="a"} == bool 1)'
    assert signal_of('a{code=~"4.."} > 0.1') == 'a{code=~"4.."} > bool 0.1'


@pytest.mark.parametrize("expression", DASHBOARD_EXPRESSIONS)
def test_dashboard_query_shows_data(live: livestack.Stack, expression: promql.Expression) -> None:
    result = live.query_range(grafana_substitute(expression.expr))
    assert finite_points(result) > 0, f"no data for {expression.expr}\n" + "\n".join(live.events)


@pytest.mark.parametrize("expression", ALERT_EXPRESSIONS)
def test_alert_expression_reads_live_metrics(live: livestack.Stack, expression: promql.Expression) -> None:
    result = live.query_range(signal_of(expression.expr))
    assert finite_points(result) > 0, f"no data for {signal_of(expression.expr)}\n" + "\n".join(live.events)


@pytest.mark.parametrize("expression", promql.dashboard_variable_queries(), ids=lambda e: e.where)
def test_dashboard_variables_have_values(live: livestack.Stack, expression: promql.Expression) -> None:
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", grafana_substitute(expression.expr))
    assert match, expression.expr
    values = live.label_values(match.group(2), match.group(1))
    assert values == [live.namespace if match.group(2) == "namespace" else livestack.NAME]


def test_scenario_provoked_what_the_panels_show(live: livestack.Stack) -> None:
    """The load really shed (421), rejected recipients (452), dead-lettered, scaled up, drained."""

    def total(expr: str) -> float:
        result = live.query_range(expr)
        return max((float(v) for s in result for _, v in s["values"]), default=0.0)  # type: ignore[attr-defined]

    assert total('sum(mailrelay_relay_replies_total{code="421"})') > 0
    assert total('sum(mailrelay_relay_replies_total{code="452"})') > 0
    assert total('sum(mailrelay_relay_messages_dead_lettered_total{reason="permanent"})') > 0
    assert total('sum(mailrelay_operator_scale_events_total{direction="up"})') > 0
    assert total("sum(mailrelay_operator_drain_duration_seconds_count)") > 0
    assert total("max(mailrelay_operator_overloaded)") == 1


def test_operator_liveness_endpoint_answers(live: livestack.Stack) -> None:
    """The chart's livenessProbe (GET /healthz on the health port) reaches Kopf's endpoint."""
    assert live.liveness_status == 200


def test_docs_scrape_config_keeps_the_metrics_ports_and_drops_the_others(live: livestack.Stack) -> None:
    """The relabeling of docs/observability.md, fed pod targets as Kubernetes discovery gives them, keeps
    each relay's `admin` port and the operator's `metrics` port, and drops every other container port."""
    active = live.targets["activeTargets"]
    dropped = live.targets["droppedTargets"]
    kept = {
        (t["labels"]["job"], t["discoveredLabels"]["__meta_kubernetes_pod_container_port_name"])
        for t in active
    }
    assert kept == {("mailrelay-relay", "admin"), ("mailrelay-operator", "metrics")}
    gone = {t["discoveredLabels"]["__meta_kubernetes_pod_container_port_name"] for t in dropped}
    assert {"smtp", "health"} <= gone
    relay = next(t for t in active if t["labels"]["job"] == "mailrelay-relay")
    assert (
        relay["labels"]["mailrelay"] == livestack.NAME and relay["labels"]["namespace"] == live.namespace
    )


def test_the_operator_ran_with_the_charts_rbac_and_was_never_refused(live: livestack.Stack) -> None:
    """The scenario's operator ran as the chart renders it (watching the stack's namespace) with the
    chart's ServiceAccount token; the real API server refused none of its calls (a refusal is logged as
    Forbidden), so what the panels show is what an operator with the chart's RBAC does."""
    assert f"--namespace={live.namespace}" in live.operator_args
    assert live.operator_log, "the operator's log is empty"
    refused = [line for line in live.operator_log.splitlines() if "forbidden" in line.lower()]
    assert refused == [], "RBAC refused the operator:\n" + "\n".join(refused[:20])
