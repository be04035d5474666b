"""The operator's metrics exist before their first event: every label value known in advance is created
at import (handlers, drain outcomes) or at a MailRelay's first tick (its counters), so dashboards and
alerts read 0 instead of nothing; and the code counts only under those known label values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mailrelay_operator import drain, handlers, metrics, reconcile

SOURCES = {mod.__name__: Path(str(mod.__file__)).read_text() for mod in (handlers, reconcile)}


def lines() -> set[str]:
    return set(metrics.exposition().decode().splitlines())


@pytest.mark.parametrize("handler", ["owned", "scaling", "delete"])
def test_reconcile_errors_exist_at_zero_per_handler(handler: str) -> None:
    # Other tests in this process may have counted errors already: the series exists, whatever its value.
    prefix = f'mailrelay_operator_reconcile_errors_total{{handler="{handler}"}} '
    assert any(line.startswith(prefix) for line in lines())


@pytest.mark.parametrize("outcome", ["drained", "timeout", "cancelled"])
def test_drain_duration_exists_per_outcome(outcome: str) -> None:
    assert any(
        line.startswith(f'mailrelay_operator_drain_duration_seconds_count{{outcome="{outcome}"}} ')
        for line in lines()
    )


@pytest.mark.parametrize("resource", ["deployments", "pods"])
def test_cache_relists_exist_per_resource(resource: str) -> None:
    prefix = f'mailrelay_operator_cache_relists_total{{resource="{resource}"}} '
    assert any(line.startswith(prefix) for line in lines())


def constant(expr: str) -> object:
    """The value of `module.NAME` as written in the code."""
    module, _, name = expr.partition(".")
    return getattr({"metrics": metrics, "drain": drain}[module], name)


def used(pattern: str) -> set[str]:
    return {match for source in SOURCES.values() for match in re.findall(pattern, source)}


def test_the_code_counts_only_under_the_initialised_label_values() -> None:
    """Every handler label and drain outcome the code uses is one of those created at import."""
    used_handlers = used(r"RECONCILE_ERRORS\.labels\(([^)]*)\)")
    assert used_handlers and {constant(h) for h in used_handlers} <= set(metrics.HANDLERS)
    used_outcomes = used(r"DRAIN_DURATION\.labels\(([^)]*)\)")
    assert used_outcomes
    for expr in used_outcomes - {"result"}:
        assert constant(expr) in metrics.DRAIN_OUTCOMES, expr
    # `result` comes from a drain plan's completed pods: drain's own outcomes.
    assert {drain.OUTCOME_DRAINED, drain.OUTCOME_TIMEOUT} <= set(metrics.DRAIN_OUTCOMES)


def test_a_mailrelays_counters_exist_from_its_first_tick_and_go_with_it() -> None:
    series = 'mailrelay="m1",namespace="ns-metrics"'
    expected = {
        f"mailrelay_operator_scrape_errors_total{{{series}}} 0.0",
        f'mailrelay_operator_scale_events_total{{direction="up",{series}}} 0.0',
        f'mailrelay_operator_scale_events_total{{direction="down",{series}}} 0.0',
    }
    assert not expected & lines()
    metrics.initialise("ns-metrics", "m1")
    assert expected <= lines()
    metrics.SCRAPE_ERRORS.labels("ns-metrics", "m1").inc()
    metrics.initialise("ns-metrics", "m1")  # idempotent: a later tick does not reset a count
    assert f"mailrelay_operator_scrape_errors_total{{{series}}} 1.0" in lines()
    metrics.forget("ns-metrics", "m1")
    assert not any(series in line for line in lines())
