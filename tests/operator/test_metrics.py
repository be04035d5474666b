"""The operator's metrics exist before their first event: every label value known in advance is created
at import (handlers, drain outcomes) or at a MailRelay's first tick (its counters), so dashboards and
alerts read 0 instead of nothing; and the code counts only under those known label values (the tick and
its plan run against a fake API client, and the label values are read back from the registry)."""

from __future__ import annotations

from typing import Any

import pytest
from mailrelay_operator import drain, metrics, observation, runtime, scaling
from mailrelay_operator import kube as k


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


@pytest.mark.parametrize("resource", ["deployments", "statefulsets", "pods", "persistentvolumeclaims"])
def test_cache_relists_exist_per_resource(resource: str) -> None:
    prefix = f'mailrelay_operator_cache_relists_total{{resource="{resource}"}} '
    assert any(line.startswith(prefix) for line in lines())


class FakeKube:
    """The API client's surface the scaling tick uses: every write succeeds, or every call fails."""

    def __init__(self, *, failing: bool = False) -> None:
        self.failing = failing

    def _check(self) -> None:
        if self.failing:
            raise k.ApiError(503, "ServiceUnavailable", "down")

    async def get(self, res: k.Resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        self._check()
        return None

    async def ensure(self, desired: Any, **_: Any) -> tuple[dict[str, Any], str]:
        self._check()
        return dict(desired), "created"

    async def patch(self, *_: Any, **__: Any) -> dict[str, Any]:
        self._check()
        return {}

    async def delete(self, *_: Any) -> bool:
        self._check()
        return True

    async def post_event(self, *_: Any, **__: Any) -> None:
        return None


class FakeRelays:
    async def call_many(self, action: str, endpoints: Any) -> dict[str, Any]:
        return {ep.pod: {"draining": action == "drain"} for ep in endpoints}


def label_values(family: str, label: str) -> set[str]:
    return {sample.labels[label] for metric in metrics.REGISTRY.collect() if metric.name == family
            for sample in metric.samples if label in sample.labels}


def count(family: str, labels: dict[str, str]) -> float:
    return metrics.REGISTRY.get_sample_value(family, labels) or 0.0


def state(name: str, started: float | None) -> drain.PodState:
    return drain.PodState(name=name, phase="Running", ready=True, created_at=0.0, deleting=False,
                          drain_started=started, sessions=0, queue_messages=0, drained=True)


async def test_a_failing_owned_object_step_counts_under_its_handler_label() -> None:
    rt = runtime.Runtime(kube=FakeKube(failing=True), relays=FakeRelays(), config=runtime.Config())  # type: ignore[arg-type]
    body = {"metadata": {"namespace": "ns-metrics", "name": "m2", "generation": 1},
            "spec": {"upstream": {"host": "smarthost.test", "port": 25}, "acceptFrom": ["10.0.0.0/8"]}}
    errors = "mailrelay_operator_reconcile_errors_total"
    before = count(errors, {"handler": metrics.HANDLER_OWNED})
    with pytest.raises(k.ApiError):  # the tick goes on to read the Deployment, which fails too
        await scaling.tick(rt, body, runtime.Memory(), now=1000.0)
    assert count(errors, {"handler": metrics.HANDLER_OWNED}) == before + 1
    assert label_values("mailrelay_operator_reconcile_errors", "handler") == set(metrics.HANDLERS)
    metrics.forget("ns-metrics", "m2")


async def test_drain_durations_count_only_under_the_initialised_outcomes() -> None:
    """Every outcome the scaling loop reports (drained, timed out, cancelled) is one created at import."""
    rt = runtime.Runtime(kube=FakeKube(), relays=FakeRelays(), config=runtime.Config())  # type: ignore[arg-type]
    body = {"metadata": {"namespace": "ns-metrics", "name": "m3"}}
    states = (state("done", 900.0), state("late", 100.0), state("back", 950.0))
    plan = drain.Plan(start_drain=(), resume=("back",), completed=(("done", drain.OUTCOME_DRAINED),
                      ("late", drain.OUTCOME_TIMEOUT)), deployment_replicas=1, delete_pods=())
    seen = observation.Observation(pods={}, states=states)
    family = "mailrelay_operator_drain_duration_seconds_count"
    before = {o: count(family, {"outcome": o}) for o in metrics.DRAIN_OUTCOMES}
    assert await scaling.apply_plan(rt, body, plan, seen, 3, 1000.0, token=None) == 1
    assert {o: count(family, {"outcome": o}) - before[o] for o in metrics.DRAIN_OUTCOMES} == {
        drain.OUTCOME_DRAINED: 1, drain.OUTCOME_TIMEOUT: 1, metrics.OUTCOME_CANCELLED: 1}
    assert label_values("mailrelay_operator_drain_duration_seconds", "outcome") == set(metrics.DRAIN_OUTCOMES)
    metrics.forget("ns-metrics", "m3")


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
