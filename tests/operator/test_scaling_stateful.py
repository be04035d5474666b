"""The scaling loop's apply step (`scaling.apply_plan`) for both workloads, on a recording fake client:
a StatefulSet's plan (`drain.plan_ordinals`) lowers the StatefulSet's replicas and deletes no pod (the
StatefulSet controller removes the highest ordinals, and their claims after them), while a Deployment's
plan still marks, lowers and deletes as before. The real control plane runs both in tests/e2e.
"""

from __future__ import annotations

from typing import Any

from mailrelay_operator import drain, observation, runtime, scaling
from mailrelay_operator import kube as k


class RecordingKube:
    """Every write succeeds and is recorded as (verb, resource plural, name, body)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, Any]] = []
        self.events: list[tuple[str, str]] = []

    async def patch(self, res: k.Resource, namespace: str | None, name: str, body: Any,
                    **_: Any) -> dict[str, Any]:
        self.calls.append(("patch", res.plural, name, body))
        return {}

    async def delete(self, res: k.Resource, namespace: str | None, name: str) -> bool:
        self.calls.append(("delete", res.plural, name, None))
        return True

    async def post_event(self, _: Any, *, reason: str, message: str, type_: str = "Normal") -> None:
        self.events.append((reason, message))


class FakeRelays:
    async def call_many(self, action: str, endpoints: Any) -> dict[str, Any]:
        return {ep.pod: {"draining": action == "drain"} for ep in endpoints}


def done(name: str) -> drain.PodState:
    return drain.PodState(name=name, phase="Running", ready=False, created_at=0.0, deleting=False,
                          drain_started=900.0, sessions=0, queue_messages=0, drained=True,
                          relay_draining=True)


def serving(name: str) -> drain.PodState:
    return drain.PodState(name=name, phase="Running", ready=True, created_at=0.0, deleting=False,
                          drain_started=None, sessions=0, queue_messages=0, drained=False,
                          relay_draining=False)


BODY = {"metadata": {"namespace": "mail", "name": "outbound"}}


async def test_a_stateful_set_plan_lowers_the_stateful_set_and_deletes_no_pod() -> None:
    fake = RecordingKube()
    rt = runtime.Runtime(kube=fake, relays=FakeRelays(), config=runtime.Config())  # type: ignore[arg-type]
    states = (serving("outbound-0"), done("outbound-1"), done("outbound-2"))
    plan = drain.plan_ordinals("outbound", 1, 3, states, 1000.0, 600.0, False, claimed=frozenset({0, 1, 2}))
    assert plan.deployment_replicas == 1 and not plan.operator_deletes
    seen = observation.Observation(pods={}, states=states)
    assert await scaling.apply_plan(rt, BODY, plan, seen, 3, 1000.0, token=None, workload=k.STATEFULSETS) == 1
    assert fake.calls == [("patch", "statefulsets", "outbound", {"spec": {"replicas": 1}})]
    assert [reason for reason, _ in fake.events] == ["DrainCompleted", "DrainCompleted", "ScaledDown"]
    assert fake.events[-1][1] == "StatefulSet outbound replicas 3 -> 1"


async def test_a_deployment_plan_still_marks_lowers_and_deletes() -> None:
    fake = RecordingKube()
    rt = runtime.Runtime(kube=fake, relays=FakeRelays(), config=runtime.Config())  # type: ignore[arg-type]
    states = (serving("a"), done("b"))
    plan = drain.plan(1, 2, states, 1000.0, 600.0, False)
    seen = observation.Observation(pods={}, states=states)
    assert await scaling.apply_plan(rt, BODY, plan, seen, 2, 1000.0, token=None) == 1
    assert fake.calls == [
        ("patch", "pods", "b", {"metadata": {"annotations": drain.finished_annotations()}}),
        ("patch", "deployments", "outbound", {"spec": {"replicas": 1}}),
        ("delete", "pods", "b", None),
    ]
    assert fake.events[-1] == ("ScaledDown", "Deployment outbound replicas 2 -> 1")
