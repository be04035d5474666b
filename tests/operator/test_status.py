"""What a MailRelay's status says after a tick (`status.after_tick`): its counts and its four conditions,
by tables over the relays' states, the policy's decision and the drain plan, and hypothesis properties
that hold for any of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailrelay_operator import conditions, drain, policy, spec, status

NOW = 1_800_000_000.0
PARSED = spec.parse({"upstream": {"host": "smarthost.test", "port": 25}, "acceptFrom": ["10.0.0.0/8"],
                     "replicas": {"min": 1, "max": 4}})
MAINTENANCE = spec.parse({"upstream": {"host": "smarthost.test", "port": 25}, "acceptFrom": ["10.0.0.0/8"],
                          "replicas": {"min": 1, "max": 4}, "maintenance": True})
NO_PLAN = drain.Plan(start_drain=(), resume=(), completed=(), deployment_replicas=None, delete_pods=())


def pod(name: str, *, ready: bool = True, phase: str = "Running", draining: bool = False,
        deleting: bool = False, sessions: int | None = 0, queue: int | None = 0) -> drain.PodState:
    return drain.PodState(name=name, phase=phase, ready=ready, created_at=NOW - 3600, deleting=deleting,
                          drain_started=NOW - 60 if draining else None, sessions=sessions,
                          queue_messages=queue, drained=None)


def decision(desired: int, *, recommended: int | None = None, overloaded: bool = False,
             reason: str = "Steady") -> policy.Decision:
    return policy.Decision(desired=desired, recommended=desired if recommended is None else recommended,
                           overloaded=overloaded, reason=reason, history=(), message="")


def plan(**kw: Any) -> drain.Plan:
    return drain.Plan(**{"start_drain": (), "resume": (), "completed": (), "deployment_replicas": None,
                         "delete_pods": (), **kw})


def report(states: list[drain.PodState], dec: policy.Decision, the_plan: drain.Plan = NO_PLAN, *,
           replicas: int = 2, parsed: spec.MailRelaySpec = PARSED, scaled: bool = False,
           orphaned_spools: Sequence[str] = ()) -> status.Report:
    return status.after_tick(name="outbound", generation=3, parsed=parsed, decision=dec, plan=the_plan,
                             states=states, replicas=replicas, scaled=scaled, now=NOW,
                             orphaned_spools=orphaned_spools)


def condition(rep: status.Report, type_: str) -> tuple[str, str, str]:
    (found,) = [(s, reason, message) for t, s, reason, message in rep.conditions if t == type_]
    return found


@pytest.mark.parametrize(
    ("states", "dec", "the_plan", "parsed", "expected"),
    [
        # Enough serving relays ready.
        ([pod("a"), pod("b")], decision(2), NO_PLAN, PARSED,
         ("True", "ReplicasReady", "2 of 2 relays ready")),
        # One still starting.
        ([pod("a"), pod("b", ready=False)], decision(2), NO_PLAN, PARSED,
         ("False", "ReplicasNotReady", "1 of 2 relays ready")),
        # A draining relay is ready but does not serve ...
        ([pod("a"), pod("b", draining=True)], decision(2), NO_PLAN, PARSED,
         ("False", "ReplicasNotReady", "1 of 2 relays ready")),
        # ... unless this tick resumes it.
        ([pod("a"), pod("b", draining=True)], decision(2), plan(resume=("b",)), PARSED,
         ("True", "ReplicasReady", "2 of 2 relays ready")),
        # Maintenance wins over the counts.
        ([pod("a"), pod("b")], decision(2), NO_PLAN, MAINTENANCE,
         ("False", "Maintenance", "spec.maintenance is true: every relay drains and answers 421")),
    ],
)
def test_ready_condition(states: list[drain.PodState], dec: policy.Decision, the_plan: drain.Plan,
                         parsed: spec.MailRelaySpec, expected: tuple[str, str, str]) -> None:
    assert condition(report(states, dec, the_plan, parsed=parsed), conditions.READY) == expected


@pytest.mark.parametrize(
    ("states", "the_plan", "parsed", "expected"),
    [
        ([pod("a"), pod("b")], NO_PLAN, PARSED, ("False", "NoDrain", "no relay is draining")),
        ([pod("a"), pod("b")], plan(start_drain=("b",)), PARSED, ("True", "ScaleIn", "draining b")),
        ([pod("c", draining=True), pod("a"), pod("b")], plan(start_drain=("b",)), PARSED,
         ("True", "ScaleIn", "draining b, c")),
        # Resumed and finished drains no longer count.
        ([pod("a", draining=True), pod("b", draining=True)],
         plan(resume=("a",), completed=(("b", drain.OUTCOME_DRAINED),)), PARSED,
         ("False", "NoDrain", "no relay is draining")),
        # A drain held past its timeout by queued mail.
        ([pod("a"), pod("b", draining=True, queue=3)], plan(held=("b",)), PARSED,
         ("True", "HeldByQueuedMail",
          "draining b; past the drain timeout and kept until their queue is empty "
          "(spec.drain.onTimeout): b")),
        ([pod("a", draining=True), pod("b", draining=True)], NO_PLAN, MAINTENANCE,
         ("True", "Maintenance", "2 relays draining for maintenance")),
        # A pod being deleted, or terminated, is not draining any more.
        ([pod("a"), pod("b", draining=True, deleting=True), pod("c", draining=True, phase="Failed")],
         NO_PLAN, PARSED, ("False", "NoDrain", "no relay is draining")),
    ],
)
def test_draining_condition(states: list[drain.PodState], the_plan: drain.Plan, parsed: spec.MailRelaySpec,
                            expected: tuple[str, str, str]) -> None:
    assert condition(report(states, decision(2), the_plan, parsed=parsed), conditions.DRAINING) == expected


@pytest.mark.parametrize(
    ("dec", "expected"),
    [
        (decision(2), ("False", "WithinCapacity", "the load fits within the maximum of 4 relays")),
        (decision(4, recommended=7, overloaded=True),
         ("True", "DemandAboveMaximum",
          "the load asks for 7 relays, above the maximum 4; relays shed new sessions with 421")),
    ],
)
def test_overloaded_condition(dec: policy.Decision, expected: tuple[str, str, str]) -> None:
    assert condition(report([pod("a"), pod("b")], dec), conditions.OVERLOADED) == expected


@pytest.mark.parametrize(
    ("replicas", "desired", "the_plan", "expected"),
    [
        (2, 2, NO_PLAN, "False"),  # steady
        (2, 3, NO_PLAN, "True"),  # the count is not there yet
        (2, 2, plan(start_drain=("b",)), "True"),  # the count matches, but a drain starts
        (3, 2, plan(start_drain=("c",)), "True"),
    ],
)
def test_scaling_condition(replicas: int, desired: int, the_plan: drain.Plan, expected: str) -> None:
    states = [pod("a"), pod("b"), pod("c")]
    rep = report(states, decision(desired, reason="ScaleUp"), the_plan, replicas=replicas)
    assert condition(rep, conditions.SCALING) == (expected, "ScaleUp", "ScaleUp")


def test_fields() -> None:
    states = [pod("a", sessions=4, queue=1), pod("b", draining=True, sessions=1, queue=2),
              pod("c", ready=False, phase="Pending", sessions=None, queue=None),
              pod("d", deleting=True, sessions=9, queue=9)]
    rep = report(states, decision(2), plan(start_drain=("a",)), replicas=3, scaled=True,
                 orphaned_spools=["spool-outbound-7", "spool-outbound-5"])
    assert rep.status == {
        "replicas": 1, "readyReplicas": 2, "desiredReplicas": 2, "selector": rep.status["selector"],
        "drainingPods": 2, "sessions": 5, "queueMessages": 3, "observedGeneration": 3, "mode": "Autoscale",
        "recommendations": [], "lastScaleTime": drain.format_time(NOW),
        "orphanedSpools": ["spool-outbound-5", "spool-outbound-7"],
    }
    assert report(states, decision(2)).status["orphanedSpools"] == []
    assert "outbound" in rep.status["selector"]
    assert (rep.ready, rep.draining) == (2, 2)
    assert "lastScaleTime" not in report(states, decision(2)).status


def test_invalid_spec_reports_only_ready_false() -> None:
    rep = status.invalid_spec(7, "spec.upstream.host: required")
    assert rep.status == {"observedGeneration": 7}
    assert rep.conditions == ((conditions.READY, "False", "InvalidSpec", "spec.upstream.host: required"),)


names = st.sampled_from(["a", "b", "c", "d", "e"])
states_st = st.lists(
    st.builds(pod, names, ready=st.booleans(), phase=st.sampled_from(["Running", "Pending", "Failed"]),
              draining=st.booleans(), deleting=st.booleans(),
              sessions=st.none() | st.integers(0, 50), queue=st.none() | st.integers(0, 50)),
    max_size=5, unique_by=lambda s: s.name,
)


@given(states=states_st, replicas=st.integers(0, 6), desired=st.integers(0, 6),
       start=st.lists(names, unique=True, max_size=2), resume=st.lists(names, unique=True, max_size=2))
def test_counts_hold_together(states: list[drain.PodState], replicas: int, desired: int, start: list[str],
                              resume: list[str]) -> None:
    # As drain.plan makes them: drains start on relays not draining yet, and resume relays that drain.
    marked = {s.name for s in states if s.draining}
    the_plan = plan(start_drain=tuple(n for n in start if n not in marked),
                    resume=tuple(n for n in resume if n in marked))
    rep = report(states, decision(desired), the_plan, replicas=replicas)
    fields = rep.status
    assert fields["replicas"] == max(0, replicas - fields["drainingPods"])
    assert fields["drainingPods"] == rep.draining <= len(states)
    assert fields["readyReplicas"] == rep.ready <= len(states)
    assert {t for t, *_ in rep.conditions} == set(conditions.TYPES)
    draining = condition(rep, conditions.DRAINING)
    # Outside maintenance and held drains, the Draining condition is True exactly when a relay drains.
    assert (draining[0] == "True") == (rep.draining > 0)
