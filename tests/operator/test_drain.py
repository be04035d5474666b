"""Drain-first scale-in (mailrelay_operator.drain): victim choice, the plan state machine, restarts.

Tables pin each transition (start, wait, complete, time out, cancel, maintenance, pending pods first).
Properties check the invariants for any cluster state, that a plan rebuilt from the pods' annotations
alone (an operator restart) is the same plan, and a simulated cluster (a ReplicaSet that honours
NotReady and deletion-cost ordering, relays whose load drains away) checks that no relay holding mail
is ever removed before its drain ended and that the pool settles on the desired count.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, cast

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from mailrelay_operator import drain, kubetypes

NOW = 1_800_000_000.0
TIMEOUT = 600.0


def pod(name: str, **kw: Any) -> drain.PodState:
    base: dict[str, Any] = {
        "name": name,
        "phase": "Running",
        "ready": True,
        "created_at": NOW - 3600,
        "deleting": False,
        "drain_started": None,
        "sessions": 10,
        "queue_messages": 0,
        "drained": False,
        "relay_draining": False,
    }
    base.update(kw)
    if base["drain_started"] is not None and "ready" not in kw:
        base["ready"] = False
    if base["drain_started"] is not None and "relay_draining" not in kw:
        base["relay_draining"] = True
    return drain.PodState(**base)


def draining(name: str, since: float = 60, **kw: Any) -> drain.PodState:
    return pod(name, drain_started=NOW - since, **kw)


# ---------------------------------------------------------------------------------------------------
# Victim choice
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pods", "count", "expected"),
    [
        ([pod("a", sessions=5), pod("b", sessions=1), pod("c", sessions=9)], 1, ("b",)),
        ([pod("a", sessions=5), pod("b", sessions=1), pod("c", sessions=9)], 2, ("b", "a")),
        ([pod("a", sessions=0), pod("b", ready=False, sessions=50)], 1, ("b",)),  # not ready first
        ([pod("a", sessions=0), pod("b", phase="Pending", ready=False, sessions=None)], 1, ("b",)),
        (
            [pod("a", ready=False), pod("b", phase="Pending", ready=False)],
            2,
            ("b", "a"),
        ),  # pending before not ready
        (
            [pod("a", sessions=3, queue_messages=9), pod("b", sessions=3, queue_messages=2)],
            1,
            ("b",),
        ),  # queue
        (
            [pod("a", sessions=1, queue_messages=900), pod("b", sessions=2, queue_messages=0)],
            1,
            ("a",),
        ),  # sessions
        ([pod("a", sessions=None), pod("b", sessions=400)], 1, ("b",)),  # unknown load last
        ([pod("a", created_at=NOW - 10), pod("b", created_at=NOW - 20)], 1, ("a",)),  # youngest on a tie
        ([pod("a"), draining("b"), pod("c", deleting=True)], 3, ("a",)),  # never draining or deleting ones
        ([pod("a")], 0, ()),
    ],
)
def test_choose_victims(pods: list[drain.PodState], count: int, expected: tuple[str, ...]) -> None:
    assert drain.choose_victims(pods, count) == expected


# ---------------------------------------------------------------------------------------------------
# The plan: tables
# ---------------------------------------------------------------------------------------------------


def plan(desired: int, replicas: int, pods: list[drain.PodState], maintenance: bool = False) -> drain.Plan:
    return drain.plan(desired, replicas, pods, NOW, TIMEOUT, maintenance)


def test_scale_in_starts_draining_the_lightest_relay() -> None:
    p = plan(2, 3, [pod("a", sessions=5), pod("b", sessions=1), pod("c", sessions=9)])
    assert p == drain.Plan(
        start_drain=("b",), resume=(), completed=(), deployment_replicas=None, delete_pods=()
    )


def test_replicas_stay_while_the_drain_runs() -> None:
    p = plan(2, 3, [pod("a"), draining("b", sessions=3), pod("c")])
    assert p.empty


def test_drained_relay_is_removed_and_replicas_lowered_by_one() -> None:
    p = plan(2, 3, [pod("a"), draining("b", sessions=0, drained=True), pod("c")])
    assert p.completed == (("b", "drained"),)
    assert p.deployment_replicas == 2
    assert p.start_drain == () and p.resume == ()


def test_drain_times_out() -> None:
    p = plan(2, 3, [pod("a"), draining("b", since=TIMEOUT, sessions=4, queue_messages=7), pod("c")])
    assert p.completed == (("b", "timeout"),)
    assert p.deployment_replicas == 2


@pytest.mark.parametrize(
    ("since", "sessions", "queue", "drained", "completed", "held"),
    [
        # Past the timeout with mail queued: held (the spool would go with the pod).
        (TIMEOUT, 4, 7, False, (), ("b",)),
        # Past the timeout, scrape failed: the queue is unknown, so held too.
        (TIMEOUT, None, None, None, (), ("b",)),
        # Past the timeout with an empty queue but sessions open: removed (their clients retry).
        (TIMEOUT, 4, 0, False, (("b", "timeout"),), ()),
        # Drained, whenever: removed as drained.
        (TIMEOUT * 3, 0, 0, True, (("b", "drained"),), ()),
        # Before the timeout: nothing held yet.
        (TIMEOUT - 1, 4, 7, False, (), ()),
    ],
)
def test_keep_while_queued_holds_a_timed_out_drain_that_still_has_mail(
        since: float, sessions: int | None, queue: int | None, drained: bool | None,
        completed: tuple[tuple[str, str], ...], held: tuple[str, ...]) -> None:
    pods = [pod("a"), draining("b", since=since, sessions=sessions, queue_messages=queue, drained=drained),
            pod("c")]
    p = drain.plan(2, 3, pods, NOW, TIMEOUT, False, keep_queued=True)
    assert p.completed == completed
    assert p.deployment_replicas == (2 if completed else None)
    assert p.held == held
    assert drain.plan(2, 3, pods, NOW, TIMEOUT, False, keep_queued=False).held == ()
    assert drain.plan(2, 3, pods, NOW, TIMEOUT, True, keep_queued=True).held == (), "maintenance holds none"


def test_a_held_drain_is_resumed_when_demand_comes_back() -> None:
    p = drain.plan(3, 3, [pod("a"), draining("b", since=TIMEOUT, queue_messages=5), pod("c")], NOW, TIMEOUT,
                   False, keep_queued=True)
    assert p.resume == ("b",) and p.completed == () and p.held == ()


def test_failed_scrape_never_completes_a_drain_early() -> None:
    p = plan(2, 3, [pod("a"), draining("b", sessions=None, queue_messages=None, drained=None), pod("c")])
    assert p.empty


def test_cancel_mid_drain_resumes() -> None:
    p = plan(3, 3, [pod("a"), draining("b", sessions=3), pod("c")])
    assert p.resume == ("b",)
    assert p.start_drain == () and p.completed == () and p.deployment_replicas is None


def test_cancel_resumes_only_what_demand_needs_newest_drain_first() -> None:
    pods = [pod("a"), draining("b", since=100), draining("c", since=10), pod("d")]
    p = plan(3, 4, pods)  # serving 2, want 3: one back
    assert p.resume == ("c",)
    assert p.deployment_replicas is None


def test_demand_beyond_draining_relays_resumes_all_and_grows() -> None:
    p = plan(5, 3, [pod("a"), draining("b"), pod("c")])
    assert p.resume == ("b",)
    assert p.deployment_replicas == 5


def test_terminated_pods_are_not_replicas() -> None:
    # b was evicted while draining; the ReplicaSet has already replaced it with d
    pods = [pod("a"), draining("b", phase="Failed", sessions=None, drained=None), pod("c"), pod("d")]
    assert plan(3, 3, pods).empty  # neither resumed nor counted: lowering replicas for it would cut d
    assert drain.serving_replicas(3, pods, False) == 3
    p = plan(2, 3, [pod("a"), pod("b", phase="Failed", ready=False, sessions=None), pod("c"), pod("d")])
    assert p.delete_pods == () and len(p.start_drain) == 1 and p.deployment_replicas is None


def test_a_drained_relay_is_resumed_rather_than_replaced() -> None:
    p = plan(3, 3, [pod("a"), draining("b", sessions=0, drained=True), pod("c")])
    assert p.resume == ("b",) and p.completed == () and p.deployment_replicas is None


def test_pending_pods_go_first_without_drain() -> None:
    pods = [pod("a"), pod("b"), pod("c", phase="Pending", ready=False, sessions=None, drained=None)]
    p = plan(2, 3, pods)
    assert p.delete_pods == ("c",) and p.start_drain == ()
    assert p.deployment_replicas == 2


def test_pods_not_created_yet_go_first() -> None:
    p = plan(2, 3, [pod("a"), pod("b")])  # the third pod does not exist yet
    assert p.deployment_replicas == 2
    assert p.start_drain == () and p.delete_pods == ()


def test_mixed_scale_in_frees_pending_then_drains() -> None:
    pods = [pod("a", sessions=7), pod("b", sessions=2), pod("c", phase="Pending", ready=False), pod("d")]
    p = plan(1, 5, pods)  # serving 5 (one not created), want 1: free 1 + delete c, drain 2
    assert p.delete_pods == ("c",)
    assert p.start_drain == ("b", "a")
    assert p.deployment_replicas == 3


def test_scale_up_without_drains_only_raises_replicas() -> None:
    p = plan(5, 3, [pod("a"), pod("b"), pod("c")])
    assert p == drain.Plan((), (), (), 5, ())


def test_deleting_pods_are_ignored() -> None:
    p = plan(2, 2, [pod("a"), pod("b"), pod("c", deleting=True, drain_started=NOW - 9)])
    assert p.empty


def test_relay_that_forgot_its_drain_is_drained_again() -> None:
    p = plan(2, 3, [pod("a"), draining("b", relay_draining=False, ready=True), pod("c")])
    assert p.redrain == ("b",)
    assert p.start_drain == () and p.resume == ()


def test_maintenance_drains_every_running_relay_and_keeps_them() -> None:
    pods = [
        pod("a"),
        draining("b", sessions=0, drained=True),
        pod("c", phase="Pending", ready=False),
        draining("d", since=TIMEOUT * 5),
    ]
    p = plan(3, 4, pods, maintenance=True)
    assert p.start_drain == ("a",)
    assert p.completed == () and p.delete_pods == () and p.resume == ()
    assert p.deployment_replicas is None


def test_maintenance_off_resumes() -> None:
    pods = [draining("a", sessions=0, drained=True), draining("b", sessions=0, drained=True)]
    p = plan(2, 2, pods)
    assert set(p.resume) == {"a", "b"}


@pytest.mark.parametrize(
    ("replicas", "pods", "maintenance", "expected"),
    [
        (3, [pod("a"), pod("b"), pod("c")], False, 3),
        (3, [pod("a"), draining("b"), pod("c")], False, 2),
        (3, [pod("a"), draining("b"), pod("c", deleting=True, drain_started=NOW)], False, 2),
        (5, [pod("a"), pod("b")], False, 5),  # pods not created yet still count
        (2, [draining("a"), draining("b")], False, 2),  # right after maintenance: all come back
        (2, [draining("a"), pod("b")], True, 2),  # in maintenance: the pool keeps its size
    ],
)
def test_serving_replicas(
    replicas: int, pods: list[drain.PodState], maintenance: bool, expected: int
) -> None:
    assert drain.serving_replicas(replicas, pods, maintenance) == expected


def test_finalizer_waits_for_every_drain() -> None:
    pods = [draining("a", sessions=0, drained=True), draining("b", sessions=1), pod("c", phase="Pending")]
    assert not drain.all_finished(pods, NOW, TIMEOUT)
    assert drain.all_finished(pods, NOW + TIMEOUT, TIMEOUT)  # b timed out by then
    assert not drain.all_finished([pod("x")], NOW, TIMEOUT)  # running, not even draining


@pytest.mark.parametrize(
    ("pods", "start", "drain_calls", "done"),
    [
        ([], (), (), True),  # nothing left to drain
        ([pod("a"), pod("b")], ("a", "b"), ("a", "b"), False),  # first round: every relay
        ([draining("a", drained=True), draining("b", drained=False)], (), (), False),
        ([draining("a", drained=True), draining("b", drained=True)], (), (), True),
        # A marked relay that restarted (it is not draining) is told again; it holds the release.
        ([draining("a", drained=True, relay_draining=False)], (), ("a",), True),
        ([draining("a", drained=None, relay_draining=None)], (), (), False),  # scrape failed
        # Pods not running or being deleted are not waited for.
        ([pod("p", phase="Pending", relay_draining=None), pod("x", deleting=True),
          draining("a", drained=True)], (), (), True),
    ],
)
def test_deletion_step(pods: list[drain.PodState], start: tuple[str, ...], drain_calls: tuple[str, ...],
                       done: bool) -> None:
    assert drain.deletion_step(pods) == drain.Deletion(start_drain=start, drain=drain_calls, done=done)


def test_negative_counts_are_rejected() -> None:
    with pytest.raises(ValueError):
        plan(-1, 2, [])


# ---------------------------------------------------------------------------------------------------
# Parsing pods and annotations
# ---------------------------------------------------------------------------------------------------


def to_pod(state: drain.PodState) -> kubetypes.Pod:
    """The pod JSON the API would show for `state` (the operator writes only the annotations)."""
    meta: kubetypes.ObjectMeta = {
        "name": state.name,
        "namespace": "mail",
        "creationTimestamp": drain.format_time(state.created_at),
        "annotations": {"unrelated": "x", **drain.pod_annotations(state)},
    }
    if state.deleting:
        meta["deletionTimestamp"] = drain.format_time(state.created_at + 1)
    return {
        "metadata": meta,
        "status": {
            "phase": state.phase,
            "conditions": [{"type": "Ready", "status": "True" if state.ready else "False"}],
        },
    }


def to_status(state: drain.PodState) -> kubetypes.RelayStatus | None:
    if state.sessions is None or state.queue_messages is None or state.drained is None:
        return None
    return {
        "draining": bool(state.relay_draining),
        "drained": state.drained,
        "sessions": state.sessions,
        "queue": {"messages": state.queue_messages, "bytes": 0, "oldest_age_seconds": 0.0},
    }


def test_pod_state_parses_the_pod_and_status() -> None:
    pod_json: kubetypes.Pod = {
        "metadata": {
            "name": "r-1",
            "creationTimestamp": "2027-01-15T08:00:00Z",
            "annotations": {
                drain.DRAIN_STARTED_ANNOTATION: "2027-01-15T08:30:00.5Z",
                drain.DELETION_COST_ANNOTATION: "-1000",
            },
        },
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]},
    }
    status: kubetypes.RelayStatus = {
        "draining": True,
        "drained": False,
        "sessions": 2,
        "queue": {"messages": 5},
    }
    state = drain.pod_state(pod_json, status)
    assert state == drain.PodState(
        name="r-1",
        phase="Running",
        ready=False,
        created_at=drain.parse_time("2027-01-15T08:00:00+00:00"),
        deleting=False,
        drain_started=drain.parse_time("2027-01-15T08:00:00Z") + 1800.5,
        sessions=2,
        queue_messages=5,
        drained=False,
        relay_draining=True,
    )


def test_pod_state_without_status_or_with_garbage() -> None:
    state = drain.pod_state(
        {
            "metadata": {"name": "x", "annotations": {drain.DRAIN_STARTED_ANNOTATION: "yesterday"}},
            "status": {},
        },
        cast(kubetypes.RelayStatus, {"sessions": -3, "queue": {}, "drained": "yes"}),
    )
    assert state.phase == "Pending" and not state.ready
    assert state.drain_started == 0.0  # unreadable: treated as long ago, so it times out, never forgotten
    assert (state.sessions, state.queue_messages, state.drained) == (None, None, None)
    assert drain.outcome(state, NOW, TIMEOUT) == drain.OUTCOME_TIMEOUT


@pytest.mark.parametrize(
    "text",
    [
        "2027-01-15T08:30:00Z",
        "2027-01-15T08:30:00.123456Z",
        "2027-01-15T09:30:00+01:00",
        "2027-01-15T08:30:00z",
    ],
)
def test_parse_time(text: str) -> None:
    assert drain.parse_time(text) == pytest.approx(drain.parse_time("2027-01-15T08:30:00Z"), abs=1)


def test_parse_time_needs_a_zone() -> None:
    with pytest.raises(ValueError):
        drain.parse_time("2027-01-15T08:30:00")


def test_annotations_round_trip() -> None:
    annotations = drain.drain_annotations(NOW + 0.25)
    assert annotations[drain.DELETION_COST_ANNOTATION] == "-1000"
    assert drain.parse_time(annotations[drain.DRAIN_STARTED_ANNOTATION]) == NOW + 0.25
    assert drain.resume_annotations() == {
        drain.DRAIN_STARTED_ANNOTATION: None,
        drain.DELETION_COST_ANNOTATION: None,
    }


# ---------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------

# Times on a microsecond grid, as the annotation stores them.
times = st.integers(min_value=-2 * 10**9, max_value=0).map(lambda us: NOW + us / 10**6)
counts = st.one_of(st.none(), st.integers(0, 300))


@st.composite
def pod_states(draw: st.DrawFn, name: str) -> drain.PodState:
    phase = draw(st.sampled_from(["Running", "Running", "Running", "Pending", "Failed"]))
    scraped = phase == "Running" and draw(st.integers(0, 5)) > 0
    return drain.PodState(
        name=name,
        phase=phase,
        ready=phase == "Running" and draw(st.booleans()),
        created_at=draw(times),
        deleting=draw(st.integers(0, 9)) == 0,
        drain_started=draw(st.one_of(st.none(), times)),
        sessions=draw(st.integers(0, 300)) if scraped else None,
        queue_messages=draw(st.integers(0, 300)) if scraped else None,
        drained=draw(st.booleans()) if scraped else None,
        relay_draining=draw(st.booleans()) if scraped else None,
    )


@st.composite
def clusters(draw: st.DrawFn) -> tuple[int, int, list[drain.PodState], bool]:
    n = draw(st.integers(0, 10))
    pods = [draw(pod_states(f"relay-{i}")) for i in range(n)]
    replicas = draw(st.integers(0, 12))
    desired = draw(st.integers(0, 12))
    return desired, replicas, pods, draw(st.integers(0, 5)) == 0


@settings(max_examples=250, deadline=None)
@given(clusters())
def test_plan_invariants(cluster: tuple[int, int, list[drain.PodState], bool]) -> None:
    desired, replicas, pods, maintenance = cluster
    p = drain.plan(desired, replicas, pods, NOW, TIMEOUT, maintenance)
    by_name = {s.name: s for s in pods}
    live = [s for s in pods if not s.deleting and s.phase not in drain.TERMINAL_PHASES]
    draining_names = {s.name for s in live if s.draining}

    # each action only touches pods in the right state, and no pod gets two actions
    assert all(not by_name[n].deleting and not by_name[n].draining for n in p.start_drain)
    assert all(by_name[n].phase == "Running" for n in p.start_drain)
    assert set(p.resume) <= draining_names
    assert all(by_name[n].phase == "Running" for n in p.resume)
    completed = [n for n, _ in p.completed]
    assert set(completed) <= draining_names
    assert all(drain.outcome(by_name[n], NOW, TIMEOUT) == o for n, o in p.completed)
    assert all(not by_name[n].draining and by_name[n].phase != "Running" for n in p.delete_pods)
    assert set(p.redrain) <= draining_names
    actions = [*p.start_drain, *p.resume, *completed, *p.delete_pods]
    assert len(actions) == len(set(actions))
    assert not (p.start_drain and p.resume), "never drain and resume in one step"

    new = replicas if p.deployment_replicas is None else p.deployment_replicas
    assert new >= 0
    if maintenance:
        # maintenance drains every running relay and never removes one
        assert set(p.start_drain) == {s.name for s in live if s.phase == "Running" and not s.draining}
        assert p.completed == () and p.delete_pods == () and p.deployment_replicas is None
        return
    # replicas are lowered only by the pods this plan removes (and by pods that do not exist yet)
    not_created = max(0, replicas - len(live))
    assert replicas - new <= len(p.completed) + len(p.delete_pods) + not_created
    # the count of relays that serve once this plan is applied moves towards the desired count
    serving_before = replicas - len(draining_names)
    serving_after = new - (len(draining_names) - len(p.resume) - len(p.completed) + len(p.start_drain))
    if serving_before != desired:
        assert abs(serving_after - desired) <= abs(serving_before - desired)


@given(clusters())
def test_keep_while_queued_never_removes_a_relay_that_may_hold_mail(
        cluster: tuple[int, int, list[drain.PodState], bool]) -> None:
    desired, replicas, pods, maintenance = cluster
    p = drain.plan(desired, replicas, pods, NOW, TIMEOUT, maintenance, keep_queued=True)
    by_name = {s.name: s for s in pods}
    for name, result in p.completed:
        state = by_name[name]
        assert state.drained is True or state.queue_messages == 0, (name, result, state)
    # and it changes nothing else: the plan equals Remove's, except the held drains it leaves running
    removing = drain.plan(desired, replicas, pods, NOW, TIMEOUT, maintenance, keep_queued=False)
    held = set(p.held)
    assert {n for n, _ in removing.completed} - {n for n, _ in p.completed} <= held
    assert held.isdisjoint(n for n, _ in p.completed) and held.isdisjoint(p.resume)
    assert p.start_drain == removing.start_drain or held
    assert removing.held == ()


@settings(max_examples=150, deadline=None)
@given(clusters(), st.floats(0, 2 * TIMEOUT))
def test_restart_rebuilds_the_same_plan_from_the_pods(
    cluster: tuple[int, int, list[drain.PodState], bool], later: float
) -> None:
    """An operator restart keeps nothing in memory: the state parsed back from the pods' JSON (the
    drain annotations) and the relays' /status gives the same plan as the state before the restart."""
    desired, replicas, pods, maintenance = cluster
    rebuilt = [drain.pod_state(to_pod(s), to_status(s)) for s in pods]
    for before, after in zip(pods, rebuilt, strict=True):
        assert after.drain_started == before.drain_started
        assert after.draining == before.draining
    now = NOW + later
    assert drain.plan(desired, replicas, rebuilt, now, TIMEOUT, maintenance) == drain.plan(
        desired, replicas, pods, now, TIMEOUT, maintenance
    )


# ---------------------------------------------------------------------------------------------------
# A simulated cluster: the plan applied tick after tick
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SimPod:
    name: str
    created: float
    phase: str = "Pending"
    sessions: int = 0
    queue: int = 0
    drain_started: float | None = None  # the annotation
    relay_draining: bool = False
    stuck: bool = False  # a client that never lets go: the drain can only time out
    finished: bool = False  # the operator marked its drain over (the lowest deletion cost)

    def state(self) -> drain.PodState:
        drained = self.relay_draining and self.sessions == 0 and self.queue == 0
        return drain.PodState(
            name=self.name,
            phase=self.phase,
            ready=self.phase == "Running" and not self.relay_draining,
            created_at=self.created,
            deleting=False,
            drain_started=self.drain_started,
            sessions=self.sessions if self.phase == "Running" else None,
            queue_messages=self.queue if self.phase == "Running" else None,
            drained=drained if self.phase == "Running" else None,
            relay_draining=self.relay_draining if self.phase == "Running" else None,
        )


class Cluster:
    """A ReplicaSet that creates pods (pending for a tick) and, when it has too many, deletes by the
    real ordering: pending first, then not ready, then the lowest deletion cost. Relays take load while
    ready and lose it while draining. The operator lowers the count first and lets the ReplicaSet pick,
    so the ReplicaSet's choices are checked: it must never remove a serving relay."""

    def __init__(self, replicas: int, rng: random.Random, stuck_ratio: float) -> None:
        self.rng = rng
        self.stuck_ratio = stuck_ratio  # share of relays whose sessions never end (their drain times out)
        self.tick = 0
        self.replicas = replicas
        self.pods: dict[str, SimPod] = {}
        self.serial = 0
        self.lost: list[str] = []  # relays removed while they still held mail, before their drain ended
        self.serving_removed: list[str] = []  # ready relays never drained, removed all the same
        self.rs_choices = 0

    def active(self) -> list[SimPod]:
        """The pods the ReplicaSet counts: evicted (Failed) pods are replaced, not counted."""
        return [p for p in self.pods.values() if p.phase != "Failed"]

    def reconcile_rs(self, now: float) -> None:
        for p in self.pods.values():
            if p.phase == "Pending":
                p.phase = "Running"
        while len(self.active()) < self.replicas:
            self.serial += 1
            name = f"relay-{self.serial}"
            self.pods[name] = SimPod(name, created=now, stuck=self.rng.random() < self.stuck_ratio)
        self.scale_down(now)

    def scale_down(self, now: float) -> None:
        """The ReplicaSet's answer to a lower count: remove the lowest-ranked pods."""
        while len(self.active()) > self.replicas:
            self.rs_choices += 1

            def rank(p: SimPod) -> tuple[bool, bool, int]:
                ready = p.phase == "Running" and not p.relay_draining
                cost = -2000 if p.finished else -1000 if p.drain_started is not None else 0
                return (p.phase == "Running", ready, cost)

            victim = min(self.active(), key=rank)
            self.remove(victim.name, now, by_rs=True)

    def evict_one(self) -> None:
        """A node drain evicts a relay: it drains itself on SIGTERM and ends as a Failed pod."""
        running = sorted(p.name for p in self.pods.values() if p.phase == "Running")
        if running:
            self.pods[self.rng.choice(running)].phase = "Failed"

    def remove(self, name: str, now: float, by_rs: bool = False) -> None:
        p = self.pods.pop(name)
        finished = p.drain_started is not None and (
            (p.relay_draining and p.sessions == 0 and p.queue == 0) or now - p.drain_started >= TIMEOUT
        )
        if p.phase == "Running" and (p.sessions or p.queue) and not finished:
            self.lost.append(f"{name} (by {'ReplicaSet' if by_rs else 'operator'})")
        if p.phase == "Running" and p.drain_started is None and not p.relay_draining:
            self.serving_removed.append(f"{name} (by {'ReplicaSet' if by_rs else 'operator'})")

    def traffic(self) -> None:
        for p in self.pods.values():
            if p.phase != "Running":
                continue
            if p.relay_draining:
                if p.stuck:
                    p.sessions = max(p.sessions, 1)
                    continue
                p.sessions = max(0, p.sessions - self.rng.randint(0, 3))
                p.queue = max(0, p.queue - self.rng.randint(0, 5))
            else:
                p.sessions = self.rng.randint(0, 8)
                p.queue = self.rng.randint(0, 10)

    def apply(self, p: drain.Plan, now: float) -> None:
        for name in p.start_drain:
            self.pods[name].drain_started = now
            self.pods[name].relay_draining = True
        for name in p.redrain:
            self.pods[name].relay_draining = True
        for name in p.resume:
            self.pods[name].drain_started = None
            self.pods[name].relay_draining = False
        # The operator's order (scaling.apply_plan): mark finished drains cheapest, lower the count (the
        # ReplicaSet acts on it at once, by its own ranking), then delete the finished pods itself.
        for name, _ in p.completed:
            self.pods[name].finished = True
        if p.deployment_replicas is not None:
            self.replicas = p.deployment_replicas
            self.scale_down(now)
        for name, _ in p.completed:
            if name in self.pods:
                self.remove(name, now)
        for name in p.delete_pods:
            if name in self.pods:
                self.remove(name, now)


def run(
    cluster: Cluster,
    schedule: list[tuple[int, int]],
    now: float,
    stats: dict[str, int],
    *,
    evictions: bool = True,
) -> float:
    """Drive the cluster through (desired, ticks) phases; the operator keeps no memory between ticks.

    The settling phase runs without evictions: an eviction on its very last tick would leave the check
    looking at a Failed pod that the ReplicaSet has not had a tick to replace."""
    for desired, ticks in schedule:
        for _ in range(ticks):
            now += 20.0
            cluster.reconcile_rs(now)
            cluster.traffic()
            cluster.tick += 1
            if cluster.tick % 23 == 0:
                # a relay container restarts: it forgets it was draining; the annotation stays
                for sim in cluster.pods.values():
                    sim.relay_draining = False
            if evictions and cluster.tick % 31 == 0:
                cluster.evict_one()
            states = [sim.state() for sim in cluster.pods.values()]
            step = drain.plan(desired, cluster.replicas, states, now, TIMEOUT, False)
            stats["resume"] += len(step.resume)
            stats["start"] += len(step.start_drain)
            stats["timeout"] += sum(o == drain.OUTCOME_TIMEOUT for _, o in step.completed)
            stats["drained"] += sum(o == drain.OUTCOME_DRAINED for _, o in step.completed)
            stats["redrain"] += len(step.redrain)
            cluster.apply(step, now)
    return now


SETTLE_TICKS = int(TIMEOUT // 20) + 10  # longer than a drain timeout


def assert_settled(cluster: Cluster, desired: int) -> None:
    assert cluster.lost == []
    assert cluster.serving_removed == [], "a relay was removed without a drain"
    serving = [p for p in cluster.active() if p.drain_started is None]
    assert len(serving) == desired
    assert cluster.replicas == len(cluster.active()) == desired


def new_stats() -> dict[str, int]:
    return {"resume": 0, "start": 0, "timeout": 0, "drained": 0, "redrain": 0}


def test_simulated_scenario_covers_cancel_timeout_and_redrain() -> None:
    cluster = Cluster(replicas=6, rng=random.Random(7), stuck_ratio=0.3)
    stats = new_stats()
    now = run(cluster, [(6, 5), (2, 4), (6, 2), (1, 3), (5, 2), (3, 40), (8, 3)], NOW, stats)
    now = run(cluster, [(2, SETTLE_TICKS)], now, stats, evictions=False)
    assert_settled(cluster, 2)
    assert now > NOW
    assert stats["resume"] > 0 and stats["timeout"] > 0 and stats["drained"] > 0 and stats["redrain"] > 0, (
        stats
    )
    assert any(p.phase == "Failed" for p in cluster.pods.values()), "evictions happened"


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 8), st.integers(1, 40)), min_size=1, max_size=6),
    st.integers(0, 2**32 - 1),
)
# A finished drain whose relay restarted was ready again when the count was lowered: the ReplicaSet
# removed another draining relay, not ready and still holding mail, instead (found by hypothesis).
@example(schedule=[(4, 1), (2, 26), (7, 34), (2, 1), (1, 1)], seed=255)
def test_simulated_cluster_never_loses_mail_and_settles(schedule: list[tuple[int, int]], seed: int) -> None:
    cluster = Cluster(replicas=schedule[0][0], rng=random.Random(seed), stuck_ratio=0.1)
    final = schedule[-1][0]
    now = run(cluster, schedule, NOW, new_stats())
    run(cluster, [(final, SETTLE_TICKS)], now, new_stats(), evictions=False)
    assert_settled(cluster, final)



# ---------------------------------------------------------------------------------------------------
# A StatefulSet (persistent spools): the highest ordinals drain, then the replicas drop past them
# ---------------------------------------------------------------------------------------------------


def sts(desired: int, replicas: int, pods: list[drain.PodState], *, keep_queued: bool = False,
        claimed: Any = None, maintenance: bool = False, orphans: Any = ()) -> drain.Plan:
    return drain.plan_ordinals("relay", desired, replicas, pods, NOW, TIMEOUT, maintenance,
                               keep_queued=keep_queued, claimed=claimed, orphans=orphans)


def done(name: str, **kw: Any) -> drain.PodState:
    """A relay whose drain is over: drained, not ready."""
    return draining(name, drained=True, sessions=0, **kw)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("relay-0", 0), ("relay-12", 12), ("relay-x", None), ("relay-01", None), ("other-1", None),
     ("relay-", None), ("relay-1-2", None), ("relay-\u0663", None)],
)
def test_ordinal(name: str, expected: int | None) -> None:
    assert drain.ordinal("relay", name) == expected


@pytest.mark.parametrize(
    ("desired", "replicas", "pods", "kw", "expected"),
    [
        # scale-in 4 -> 2: the two highest ordinals drain, highest first, whatever their load
        (2, 4, [pod("relay-0"), pod("relay-1"), pod("relay-2", sessions=99), pod("relay-3", sessions=0)],
         {}, {"start_drain": ("relay-3", "relay-2")}),
        # draining: the replicas stay
        (2, 4, [pod("relay-0"), pod("relay-1"), draining("relay-2"), draining("relay-3")], {}, {}),
        # both over: the replicas drop past both, the StatefulSet removes them (nothing deleted here)
        (2, 4, [pod("relay-0"), pod("relay-1"), done("relay-2"), done("relay-3")], {},
         {"completed": (("relay-3", "drained"), ("relay-2", "drained")), "deployment_replicas": 2}),
        # only the highest is over: it goes alone
        (2, 4, [pod("relay-0"), pod("relay-1"), draining("relay-2"), done("relay-3")], {},
         {"completed": (("relay-3", "drained"),), "deployment_replicas": 3}),
        # the lower one is over first: it waits for the one above (a StatefulSet cannot skip an ordinal)
        (2, 4, [pod("relay-0"), pod("relay-1"), done("relay-2"), draining("relay-3")], {}, {}),
        # timed out with mail, Remove: completed as timeout (the claim goes: Remove's documented cost)
        (1, 2, [pod("relay-0"), draining("relay-1", since=TIMEOUT, queue_messages=5)], {},
         {"completed": (("relay-1", "timeout"),), "deployment_replicas": 1}),
        # the same, KeepWhileQueued: held, its ordinal (and claim) kept
        (1, 2, [pod("relay-0"), draining("relay-1", since=TIMEOUT, queue_messages=5)],
         {"keep_queued": True}, {"held": ("relay-1",)}),
        # held in the middle: the drained ordinal above it goes, the held one and below stay
        (1, 4, [pod("relay-0"), done("relay-1"), draining("relay-2", since=TIMEOUT, queue_messages=5),
                done("relay-3")], {"keep_queued": True},
         {"completed": (("relay-3", "drained"),), "deployment_replicas": 3, "held": ("relay-2",)}),
        # a finished drain whose relay restarted (ready again) is redrained before it may go
        (1, 2, [pod("relay-0"), done("relay-1", ready=True, relay_draining=False)], {},
         {"redrain": ("relay-1",)}),
        # demand rose: the lowest draining ordinals serve again, the highest keep draining
        (3, 4, [pod("relay-0"), draining("relay-1"), draining("relay-2"), draining("relay-3")], {},
         {"resume": ("relay-1", "relay-2")}),
        # scale-up past the replicas: resume everything and raise them
        (5, 3, [pod("relay-0"), pod("relay-1"), draining("relay-2")], {},
         {"resume": ("relay-2",), "deployment_replicas": 5}),
        (3, 1, [pod("relay-0")], {}, {"deployment_replicas": 3}),
        # an ordinal without a running relay: it may sit on a claim full of mail (a replacement after a
        # lost node), so it waits, unless its claim is known to be absent or unbound
        (1, 2, [pod("relay-0"), pod("relay-1", phase="Pending", ready=False)], {}, {}),
        (1, 2, [pod("relay-0"), pod("relay-1", phase="Pending", ready=False)], {"claimed": {0, 1}}, {}),
        (1, 2, [pod("relay-0"), pod("relay-1", phase="Pending", ready=False)], {"claimed": {0}},
         {"deployment_replicas": 1}),
        (1, 3, [pod("relay-0")], {"claimed": {0}}, {"deployment_replicas": 1}),  # not created yet
        (1, 3, [pod("relay-0")], {"claimed": {0, 2}}, {}),
        (1, 2, [pod("relay-0"), pod("relay-1", deleting=True)], {"claimed": {0, 1}}, {}),  # force-deleted
        # pods above the replicas are the controller's to remove: ignored
        (1, 1, [pod("relay-0"), done("relay-1"), pod("relay-2")], {}, {}),
        # pods of another set are not ordinals of this one
        (1, 1, [pod("relay-0"), pod("relayx-1"), pod("other-0")], {}, {}),
        # maintenance: every running relay drains and stays
        (1, 3, [pod("relay-0"), draining("relay-1"), pod("relay-2", phase="Pending")],
         {"maintenance": True}, {"start_drain": ("relay-0",)}),
        # orphaned claims: the set grows to cover the highest, whatever the desired count
        (1, 1, [pod("relay-0")], {"orphans": {3}}, {"deployment_replicas": 4}),
        (1, 2, [pod("relay-0"), pod("relay-1")], {"orphans": {2, 5}},
         {"start_drain": ("relay-1",), "deployment_replicas": 6}),
        (6, 2, [pod("relay-0"), pod("relay-1")], {"orphans": {3}}, {"deployment_replicas": 6}),
        # ... and no finished drain goes while it grows (the next tick lowers it again, past them)
        (1, 3, [pod("relay-0"), done("relay-1"), done("relay-2")], {"orphans": {4}},
         {"deployment_replicas": 5}),
        # ... but never in maintenance
        (1, 1, [pod("relay-0")], {"orphans": {3}, "maintenance": True}, {"start_drain": ("relay-0",)}),
    ],
)
def test_stateful_set_plan(desired: int, replicas: int, pods: list[drain.PodState], kw: dict[str, Any],
                           expected: dict[str, Any]) -> None:
    want = drain.Plan(start_drain=(), resume=(), completed=(), deployment_replicas=None, delete_pods=(),
                      operator_deletes=False)
    assert sts(desired, replicas, pods, **kw) == dataclasses.replace(want, **expected)


def test_claimed_ordinals() -> None:
    def claim(name: str, phase: str | None) -> kubetypes.PersistentVolumeClaim:
        out: kubetypes.PersistentVolumeClaim = {"metadata": {"name": name}}
        if phase is not None:
            out["status"] = {"phase": phase}
        return out

    claims = [claim("spool-relay-0", "Bound"), claim("spool-relay-1", "Pending"),
              claim("spool-relay-2", None), claim("spool-relay-3", "Lost"),
              claim("spool-other-4", "Bound"), claim("spool-relay-x", "Bound")]
    assert drain.claimed_ordinals("spool-relay", claims) == {0, 2, 3}


def pvc(name: str, phase: str | None = "Bound", *, deleting: bool = False,
        owner: str | None = None) -> kubetypes.PersistentVolumeClaim:
    meta: kubetypes.ObjectMeta = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    if owner is not None:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": owner, "name": "x", "uid": "u"}]
    out: kubetypes.PersistentVolumeClaim = {"metadata": meta}
    if phase is not None:
        out["status"] = {"phase": phase}
    return out


@pytest.mark.parametrize(
    ("claim", "pods", "orphaned"),
    [
        (pvc("spool-relay-3"), (), True),  # bound, beyond the set, no pod: may hold mail
        (pvc("spool-relay-1"), (), False),  # inside the set (replicas 2): its ordinal is there
        (pvc("spool-relay-2"), (), True),  # the first ordinal beyond
        (pvc("spool-relay-3"), ("relay-3",), False),  # its pod still exists (the controller removes it)
        (pvc("spool-relay-3", "Pending"), (), False),  # never bound: never written
        (pvc("spool-relay-3", None), (), False),
        (pvc("spool-relay-3", "Lost"), (), False),  # its volume is gone: nothing to bring back
        (pvc("spool-relay-3", deleting=True), (), False),
        (pvc("spool-relay-3", owner="Pod"), (), False),  # condemned by the controller (whenScaled)
        (pvc("spool-relay-3", owner="StatefulSet"), (), True),  # whenDeleted: Delete's owner: still ours
        (pvc("spool-other-3"), (), False),  # another MailRelay's
        (pvc("spool-relay-03"), (), False),  # not a claim the StatefulSet names
    ],
)
def test_orphaned_claims(claim: kubetypes.PersistentVolumeClaim, pods: tuple[str, ...],
                         orphaned: bool) -> None:
    found = drain.orphaned_claims("relay", "spool-relay", 2, [claim], pods)
    name = claim["metadata"]["name"]
    assert found == (((int(name.rsplit("-", 1)[1]), name),) if orphaned else ())


def test_orphaned_claims_lowest_ordinal_first() -> None:
    claims = [pvc("spool-relay-10"), pvc("spool-relay-4"), pvc("spool-relay-0"), pvc("spool-relay-7")]
    assert drain.orphaned_claims("relay", "spool-relay", 1, claims, ()) == (
        (4, "spool-relay-4"), (7, "spool-relay-7"), (10, "spool-relay-10"))


@pytest.mark.parametrize(
    ("retention", "recovers"),
    [({"whenScaled": "Delete", "whenDeleted": "Retain"}, True), ({"whenScaled": "Delete"}, True),
     ({"whenScaled": "Retain"}, False), ({}, False), (None, False)],
)
def test_recovers_orphans_only_where_scaled_claims_are_deleted(
    retention: dict[str, str] | None, recovers: bool
) -> None:
    stateful_set: kubetypes.StatefulSet = {"spec": {"replicas": 1}}
    if retention is not None:
        stateful_set["spec"]["persistentVolumeClaimRetentionPolicy"] = retention  # type: ignore[typeddict-item]
    assert drain.recovers_orphans(stateful_set) is recovers


def test_set_members_and_serving_replicas() -> None:
    pods = [pod("relay-0"), draining("relay-1"), done("relay-2"), pod("other-0")]
    assert [p.name for p in drain.set_members("relay", 2, pods)] == ["relay-0", "relay-1"]
    assert drain.serving_replicas(2, drain.set_members("relay", 2, pods), False) == 1


def test_the_deployment_plan_still_deletes_its_pods() -> None:
    assert drain.plan(1, 2, [pod("a"), done("b")], NOW, TIMEOUT, False).operator_deletes is True


@st.composite
def stateful_clusters(draw: st.DrawFn) -> tuple[int, int, list[drain.PodState], bool, frozenset[int] | None]:
    replicas = draw(st.integers(0, 8))
    present = draw(st.lists(st.integers(0, 10), max_size=10, unique=True))
    pods = [draw(pod_states(f"relay-{i}")) for i in sorted(present)]
    claimed = draw(st.one_of(st.none(), st.frozensets(st.integers(0, 10))))
    return draw(st.integers(0, 10)), replicas, pods, draw(st.integers(0, 5)) == 0, claimed


@settings(max_examples=300, deadline=None)
@given(stateful_clusters(), st.booleans(), st.frozensets(st.integers(0, 12), max_size=3))
def test_stateful_set_plan_invariants(
    cluster: tuple[int, int, list[drain.PodState], bool, frozenset[int] | None], keep_queued: bool,
    beyond: frozenset[int],
) -> None:
    desired, replicas, pods, maintenance, claimed = cluster
    orphans = {n for n in beyond if n >= replicas}  # as orphaned_claims finds them: beyond the set
    p = drain.plan_ordinals("relay", desired, replicas, pods, NOW, TIMEOUT, maintenance,
                            keep_queued=keep_queued, claimed=claimed, orphans=orphans)
    if orphans and not maintenance:
        # the set grows to cover every orphaned claim, and nothing leaves while it does
        assert p.deployment_replicas == max(desired, max(orphans) + 1) and p.completed == ()
        return
    ords = {s.name: int(s.name.split("-")[1]) for s in pods}
    live = {ords[s.name]: s for s in pods
            if not s.deleting and s.phase not in drain.TERMINAL_PHASES and ords[s.name] < replicas}
    assert p.delete_pods == () and p.operator_deletes is False  # the StatefulSet deletes, never the operator
    new = replicas if p.deployment_replicas is None else p.deployment_replicas
    assert set(p.start_drain) <= {s.name for s in live.values() if not s.draining and s.phase == "Running"}
    assert set(p.resume) <= {s.name for s in live.values() if s.draining}
    if maintenance:
        assert p.deployment_replicas is None and p.completed == ()
        return
    # only the ordinals at or above the desired count drain; those below it serve
    assert all(ords[n] >= desired for n in p.start_drain)
    assert all(ords[n] < desired for n in p.resume)
    assert new >= min(desired, replicas) and (desired <= replicas or new == desired)
    # every ordinal the new count removes is one whose relay's drain is over, or one without a relay
    # whose claim is known to hold nothing: never a claim that may hold mail
    for n in range(new, replicas):
        state = live.get(n)
        if state is None or state.phase != "Running":
            assert claimed is not None and n not in claimed, n
        else:
            result = drain.outcome(state, NOW, TIMEOUT, keep_queued)
            assert result is not None and not state.ready, n
            if keep_queued:
                assert state.drained is True or state.queue_messages == 0
            assert (state.name, result) in p.completed
    assert {ords[n] for n, _ in p.completed} <= set(range(new, replicas))
    assert all(ords[n] < new for n in p.held)  # a held drain keeps its ordinal


@settings(max_examples=100, deadline=None)
@given(stateful_clusters(), st.floats(0, 2 * TIMEOUT))
def test_stateful_set_plan_is_rebuilt_from_the_pods(
    cluster: tuple[int, int, list[drain.PodState], bool, frozenset[int] | None], later: float
) -> None:
    desired, replicas, pods, maintenance, claimed = cluster
    rebuilt = [drain.pod_state(to_pod(s), to_status(s)) for s in pods]
    now = NOW + later
    assert drain.plan_ordinals("relay", desired, replicas, rebuilt, now, TIMEOUT, maintenance,
                               claimed=claimed) == drain.plan_ordinals(
        "relay", desired, replicas, pods, now, TIMEOUT, maintenance, claimed=claimed)


@dataclasses.dataclass
class Ordinal:
    """One relay of the simulated StatefulSet; its queue lives in the claim (`StatefulCluster.claims`)."""

    phase: str = "Pending"
    ready: bool = False
    drain_started: float | None = None
    relay_draining: bool = False
    sessions: int = 0


@dataclasses.dataclass
class StatefulCluster:
    """A StatefulSet with Parallel pods and whenScaled: Delete, relays whose queues live in their claims
    (so a lost pod's mail comes back with its ordinal), and an upstream that may hold mail back."""

    replicas: int
    pods: dict[int, Ordinal] = dataclasses.field(default_factory=dict)
    claims: dict[int, int] = dataclasses.field(default_factory=dict)  # ordinal -> queued messages
    lost: int = 0
    condemned: set[int] = dataclasses.field(default_factory=set)  # claims owned by their leaving pod

    def orphans(self) -> set[int]:
        """Claims beyond the set that no pod of it condemned (as `drain.orphaned_claims` finds them)."""
        return {n for n in self.claims
                if n >= self.replicas and n not in self.pods and n not in self.condemned}

    def states(self) -> list[drain.PodState]:
        out = []
        for n, p in sorted(self.pods.items()):
            running = p.phase == "Running"
            queue = self.claims.get(n, 0)
            out.append(drain.PodState(
                name=f"relay-{n}", phase=p.phase, ready=p.ready, created_at=NOW, deleting=False,
                drain_started=p.drain_started, sessions=p.sessions if running else None,
                queue_messages=queue if running else None,
                drained=(p.relay_draining and p.sessions == 0 and queue == 0) if running else None,
                relay_draining=p.relay_draining if running else None))
        return out

    def apply(self, plan: drain.Plan, now: float) -> None:
        for name in plan.start_drain:
            p = self.pods[int(name.split("-")[1])]
            p.drain_started, p.relay_draining, p.ready = now, True, False
        for name in plan.redrain:
            p = self.pods[int(name.split("-")[1])]
            p.relay_draining, p.ready = True, False
        for name in plan.resume:
            p = self.pods[int(name.split("-")[1])]
            p.drain_started, p.relay_draining, p.ready = None, False, True
        if plan.deployment_replicas is not None:
            self.replicas = plan.deployment_replicas

    def controller(self) -> None:
        for n in [n for n in self.pods if n >= self.replicas]:
            if n in self.claims:
                self.condemned.add(n)  # whenScaled: Delete makes the pod own its claim, then deletes it
            del self.pods[n]
        for n in [n for n in self.claims if n in self.condemned and n not in self.pods]:
            self.lost += self.claims.pop(n)  # the garbage collector, after the pod is gone
            self.condemned.discard(n)
        for n in range(self.replicas):
            if n not in self.pods:
                self.pods[n] = Ordinal()
                self.claims.setdefault(n, 0)

    def relays(self, rng: random.Random, upstream_up: bool) -> None:
        for n, p in self.pods.items():
            if p.phase == "Pending":
                p.phase, p.ready = "Running", True
                continue
            if p.relay_draining:
                p.sessions = max(0, p.sessions - rng.randint(0, 3))
            else:
                p.sessions = rng.randint(0, 5)
                self.claims[n] += p.sessions
            if upstream_up:
                self.claims[n] = max(0, self.claims[n] - rng.randint(0, 6))

    def tick(self, desired: int, now: float, rng: random.Random, upstream_up: bool) -> None:
        """One operator tick (KeepWhileQueued, claims and orphans as the operator finds them), then the
        controller and the relays."""
        plan = drain.plan_ordinals("relay", desired, self.replicas, self.states(), now, TIMEOUT, False,
                                   keep_queued=True, claimed=frozenset(self.claims), orphans=self.orphans())
        self.apply(plan, now)
        self.controller()
        self.relays(rng, upstream_up=upstream_up)

    def lose_a_node(self, rng: random.Random) -> None:
        """A pod goes without a drain (annotations and all); its claim stays, with its queue."""
        if self.pods:
            del self.pods[rng.choice(sorted(self.pods))]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 20)), min_size=1, max_size=5),
       st.dictionaries(st.integers(2, 9), st.integers(0, 30), max_size=3), st.integers(0, 2**16))
def test_simulated_stateful_set_loses_no_mail_and_settles(
    schedule: list[tuple[int, int]], left_behind: dict[int, int], seed: int
) -> None:
    """Demand moves, the upstream is down half the time, pods are lost at random, and claims beyond the
    set were left behind holding mail (a MailRelay deleted and created again): no claim is ever deleted
    while it holds mail (KeepWhileQueued), and with demand steady, the upstream up and no more losses,
    the set settles on the desired count with no drain and no claim beyond it left."""
    rng = random.Random(seed)
    cluster = StatefulCluster(replicas=2, claims=dict(left_behind))
    cluster.controller()
    now = NOW
    for desired, ticks in schedule:
        for _ in range(ticks):
            now += 5
            cluster.tick(desired, now, rng, upstream_up=rng.random() < 0.5)
            if rng.random() < 0.1:
                cluster.lose_a_node(rng)
                cluster.controller()
            assert cluster.lost == 0
    desired = schedule[-1][0]
    for _ in range(400):
        now += 5
        cluster.tick(desired, now, rng, upstream_up=True)
    assert cluster.lost == 0
    assert cluster.replicas == desired
    assert set(cluster.claims) == set(range(desired))  # every claim left behind delivered and removed
    assert all(p.drain_started is None for p in cluster.pods.values())
