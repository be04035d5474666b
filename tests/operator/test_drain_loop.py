"""The whole pure control loop: policy.decide then drain.plan, tick after tick, against the simulated
cluster of test_drain (a ReplicaSet with the real deletion ordering) under an SMTP load model.

It checks the issue's scenarios without I/O: a load step is answered in the same tick, Overloaded is
set above max, a load drop drains one relay at a time only after the scale-down window and lowers the
count only by drained relays, a load rise mid-drain resumes the relay, and no relay holding mail is
removed before its drain ended.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from mailrelay_operator import drain, policy
from mailrelay_operator import spec as specmod

from tests.operator.test_drain import NOW, TIMEOUT, Cluster

INTERVAL = 5.0
SPEC = specmod.MailRelaySpec(
    upstream=specmod.UpstreamSpec(host="smtp.example.net"),
    accept_from=("10.0.0.0/8",),
    replicas=specmod.ReplicaBounds(min=2, max=10),
    scaling=specmod.Scaling(
        interval_seconds=int(INTERVAL),
        targets=specmod.Targets(sessions_per_pod=100, queue_per_pod=500),
        scale_up=specmod.Step(0, 4),
        scale_down=specmod.Step(60, 1),
    ),
    drain_timeout_seconds=int(TIMEOUT),
)


class LoadedCluster(Cluster):
    """Clients keep `demand` sessions open, spread over the ready relays (draining relays get none
    and lose theirs gradually, as clients finish)."""

    demand = 0

    def traffic(self) -> None:
        ready = [p for p in self.pods.values() if p.phase == "Running" and not p.relay_draining]
        for p in self.pods.values():
            if p.phase == "Running" and p.relay_draining:
                p.sessions = max(0, p.sessions - 40)
                p.queue = max(0, p.queue - 100)
        for i, p in enumerate(sorted(ready, key=lambda p: p.name)):
            share = self.demand // len(ready) + (1 if i < self.demand % len(ready) else 0)
            p.sessions = min(share, 200)  # the relay caps sessions and sheds the rest with 421
            p.queue = share // 4


class Loop:
    def __init__(self, replicas: int = 2, seed: int = 1) -> None:
        self.cluster = LoadedCluster(replicas=replicas, rng=random.Random(seed), stuck_ratio=0.0)
        self.now = NOW
        self.history: tuple[policy.Recommendation, ...] = ()
        self.decisions: list[policy.Decision] = []
        self.plans: list[drain.Plan] = []

    def tick(self, maintenance: bool = False) -> tuple[policy.Decision, drain.Plan]:
        self.now += INTERVAL
        self.cluster.reconcile_rs(self.now)
        self.cluster.traffic()
        states = [p.state() for p in self.cluster.pods.values()]
        current = drain.serving_replicas(self.cluster.replicas, states, maintenance)
        loads = [
            policy.PodLoad(s.name, s.sessions, s.queue_messages)
            for s in states
            if s.phase == "Running" and s.ready and not s.draining and not s.deleting
        ]
        decision = policy.decide(current, loads, SPEC, self.now, self.history)
        self.history = decision.history
        step = drain.plan(decision.desired, self.cluster.replicas, states, self.now, TIMEOUT, maintenance)
        self.cluster.apply(step, self.now)
        self.decisions.append(decision)
        self.plans.append(step)
        return decision, step

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            self.tick()

    def serving(self) -> int:
        return sum(1 for p in self.cluster.active() if p.drain_started is None)


def test_load_step_is_answered_in_the_same_tick_and_overload_is_flagged() -> None:
    loop = Loop()
    loop.run(3)
    assert loop.cluster.replicas == 2
    loop.cluster.demand = 600  # 3x the target of 2 relays
    decision, step = loop.tick()
    # each relay caps its sessions at 200 and sheds the rest with 421, so the load seen is 400: 4 relays
    assert step.deployment_replicas == 4
    assert decision.reason == "ScaleUp" and not decision.overloaded
    _, step = loop.tick()  # the new relays start (pending); they count 0 % on scale-up: no overshoot
    loop.run(2)
    assert loop.cluster.replicas == 6  # ceil(600 / 100) once the load spreads
    loop.cluster.demand = 5000
    loop.run(3)
    assert loop.cluster.replicas == 10
    assert loop.decisions[-1].overloaded


def test_load_drop_drains_one_relay_at_a_time_after_the_window() -> None:
    loop = Loop()
    loop.cluster.demand = 600
    loop.run(6)
    assert loop.serving() == 6
    loop.cluster.demand = 100
    drop_at = loop.now
    lowered = 0
    for _ in range(200):
        before = loop.cluster.replicas
        _, step = loop.tick()
        if step.start_drain:
            assert loop.now - drop_at >= SPEC.scaling.scale_down.stabilization_seconds
            assert len(step.start_drain) == 1
        if step.deployment_replicas is not None and step.deployment_replicas < before:
            # the count is only lowered for relays whose drain ended (none here was pending)
            assert before - step.deployment_replicas == len(step.completed) > 0
            assert all(outcome == drain.OUTCOME_DRAINED for _, outcome in step.completed)
            lowered += before - step.deployment_replicas
    assert lowered == 4
    assert loop.serving() == loop.cluster.replicas == 2
    assert loop.cluster.lost == [] and loop.cluster.serving_removed == []


def test_load_rise_mid_drain_resumes_the_relay() -> None:
    loop = Loop()
    loop.cluster.demand = 600
    loop.run(6)
    loop.cluster.demand = 0
    for _ in range(100):
        _, step = loop.tick()
        if step.start_drain:
            victim = step.start_drain[0]
            break
    else:
        raise AssertionError("no drain started")
    for p in loop.cluster.pods.values():  # the victim still holds sessions: it cannot finish at once
        if p.name == victim:
            p.sessions = 150
    loop.cluster.demand = 2000
    _, step = loop.tick()
    assert step.resume == (victim,)
    assert loop.cluster.pods[victim].drain_started is None


def test_maintenance_drains_all_and_the_pool_comes_back_at_its_size() -> None:
    loop = Loop()
    loop.cluster.demand = 600
    loop.run(6)
    assert loop.serving() == 6
    for _ in range(40):
        _, step = loop.tick(maintenance=True)
        assert step.completed == () and step.delete_pods == ()
        assert loop.cluster.replicas == 6
    assert all(p.relay_draining and p.sessions == 0 for p in loop.cluster.pods.values())
    _, step = loop.tick()  # maintenance off
    assert len(step.resume) == 6 and step.completed == ()
    loop.run(3)
    assert loop.serving() == loop.cluster.replicas == 6  # no shrink to the minimum on the way back
    assert loop.cluster.lost == []


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 3000), min_size=1, max_size=8), st.integers(1, 30))
def test_any_load_pattern_keeps_bounds_and_mail(demands: list[int], hold: int) -> None:
    loop = Loop()
    for demand in demands:
        loop.cluster.demand = demand
        for _ in range(hold):
            decision, _ = loop.tick()
            assert SPEC.replicas.min <= decision.desired <= SPEC.replicas.max
            assert loop.serving() <= SPEC.replicas.max
    loop.run(int((SPEC.scaling.scale_down.stabilization_seconds + TIMEOUT) / INTERVAL) + 60)
    assert loop.cluster.lost == []
    assert loop.cluster.serving_removed == []
    assert loop.serving() == loop.cluster.replicas == loop.decisions[-1].desired
