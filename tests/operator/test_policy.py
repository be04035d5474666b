"""The scaling policy (mailrelay_operator.policy): HPA tables and properties.

Tables pin the HPA arithmetic (tolerance, missing metrics, max over metrics, steps, windows); hypothesis
checks the promises for any input: bounds hold, no scale-down on partial metrics, the stabilization
windows hold, and one decision never moves more than a step.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from mailrelay_operator import policy
from mailrelay_operator import spec as specmod

NOW = 1_800_000_000.0


def make_spec(
    *,
    min_: int = 1,
    max_: int = 20,
    fixed: int | None = None,
    sessions: int = 100,
    queue: int = 500,
    up: tuple[int, int] = (0, 4),
    down: tuple[int, int] = (300, 1),
) -> specmod.MailRelaySpec:
    return specmod.MailRelaySpec(
        upstream=specmod.UpstreamSpec(host="smtp.example.net"),
        accept_from=("10.0.0.0/8",),
        replicas=specmod.ReplicaBounds(min=min_, max=max_, fixed=fixed),
        scaling=specmod.Scaling(
            targets=specmod.Targets(sessions_per_pod=sessions, queue_per_pod=queue),
            scale_up=specmod.Step(*up),
            scale_down=specmod.Step(*down),
        ),
    )


def loads(*sessions: int | None, queue: int | None = 0) -> list[policy.PodLoad]:
    return [
        policy.PodLoad(f"relay-{i}", s, None if s is None and queue == 0 else queue)
        for i, s in enumerate(sessions)
    ]


# ---------------------------------------------------------------------------------------------------
# metric_replicas: the HPA arithmetic for one metric
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "values", "target", "expected"),
    [
        (3, [100, 100, 100], 100, (3, False)),  # on target
        (4, [105, 105, 105, 105], 100, (4, False)),  # +5 %: within tolerance
        (4, [110, 110, 110, 110], 100, (4, False)),  # +10 %: the tolerance is inclusive
        (4, [115, 115, 115, 115], 100, (5, False)),  # +15 %: ceil(460 / 100)
        (4, [91, 91, 91, 91], 100, (4, False)),  # -9 %: within tolerance
        (4, [50, 50, 50, 50], 100, (2, False)),  # half the target: half the pods
        (3, [150, 150, 150], 100, (5, False)),  # ceil(4.5)
        (2, [0, 0], 100, (0, False)),  # idle: the bounds raise it later
        (3, [300, 300, None], 100, (6, True)),  # scale-up: missing counts 0 -> ceil(600 / 100)
        (4, [0, 0, None, None], 100, (2, True)),  # scale-down: missing counts 100 % -> ceil(200 / 100)
        (2, [120, None], 100, (2, True)),  # up, but with the missing pod at 0 it would go down: keep
        (2, [80, None], 100, (2, True)),  # down to 0.9 with the missing pod at 100 %: within tolerance
        (3, [None, None, None], 100, (3, True)),  # nothing known: keep
        (5, [], 100, (5, False)),
        (6, [], 100, (6, False)),
    ],
)
def test_metric_replicas(
    current: int, values: list[int | None], target: int, expected: tuple[int, bool]
) -> None:
    assert policy.metric_replicas(current, values, target) == expected


@pytest.mark.parametrize(
    ("current", "values", "unready", "expected"),
    [
        (10, [115, 115], 8, 10),  # up on 2 ready pods, but 8 starting pods at 0 % make it 0.23: keep
        (10, [600, 600], 8, 12),  # 1200 over 10 pods: still up -> ceil(1200 / 100)
        (10, [50, 50], 8, 1),  # scaling down ignores the starting pods
        (10, [100, 100], 8, 10),  # on target
    ],
)
def test_unready_pods_count_zero_on_scale_up(
    current: int, values: list[int], unready: int, expected: int
) -> None:
    assert policy.metric_replicas(current, values, 100, unready) == (expected, False)


def test_never_against_the_load() -> None:
    # 4 pods measured while current says 2 (a rollout surge): low load must not raise the count
    assert policy.metric_replicas(2, [85, 85, 85, 85], 100) == (2, False)
    assert policy.metric_replicas(6, [150, 150], 100) == (6, False)


def test_highest_metric_wins() -> None:
    spec = make_spec(sessions=100, queue=500)
    busy_queue = [policy.PodLoad("a", 10, 1500), policy.PodLoad("b", 10, 1500)]
    assert policy.recommend(2, busy_queue, spec.scaling.targets) == (6, False)
    busy_sessions = [policy.PodLoad("a", 300, 0), policy.PodLoad("b", 300, 0)]
    assert policy.recommend(2, busy_sessions, spec.scaling.targets) == (6, False)


# ---------------------------------------------------------------------------------------------------
# decide: tables
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "current", "pod_loads", "spec", "history", "desired", "reason", "overloaded"),
    [
        ("steady", 3, loads(100, 100, 100), make_spec(), [], 3, "Steady", False),
        ("up at once", 3, loads(150, 150, 150), make_spec(), [], 5, "ScaleUp", False),
        ("up limited per step", 2, loads(1000, 1000), make_spec(), [], 6, "ScaleUp", False),
        (
            "up to max, overloaded",
            8,
            loads(*[400] * 8),
            make_spec(max_=10, up=(0, 10)),
            [],
            10,
            "ScaleUp",
            True,
        ),
        ("held at max", 10, loads(*[400] * 10), make_spec(max_=10), [], 10, "AtMaximum", True),
        ("down one step, empty window", 4, loads(0, 0, 0, 0), make_spec(), [], 3, "ScaleDown", False),
        (
            "down held by the window",
            4,
            loads(0, 0, 0, 0),
            make_spec(),
            [policy.Recommendation(NOW - 100, 4)],
            4,
            "Stabilizing",
            False,
        ),
        (
            "down to the window's highest",
            6,
            loads(*[0] * 6),
            make_spec(down=(300, 5)),
            [policy.Recommendation(NOW - 100, 3), policy.Recommendation(NOW - 200, 2)],
            3,
            "ScaleDown",
            False,
        ),
        (
            "old recommendations leave the window",
            4,
            loads(0, 0, 0, 0),
            make_spec(),
            [policy.Recommendation(NOW - 301, 4)],
            3,
            "ScaleDown",
            False,
        ),
        (
            "scale-up window holds growth",
            2,
            loads(300, 300),
            make_spec(up=(60, 4)),
            [policy.Recommendation(NOW - 30, 2)],
            2,
            "Stabilizing",
            False,
        ),
        (
            "partial metrics veto scale-down",
            4,
            loads(0, 0, None, None),
            make_spec(),
            [],
            4,
            "PartialMetrics",
            False,
        ),
        ("partial metrics allow scale-up", 3, loads(300, 300, None), make_spec(), [], 6, "ScaleUp", False),
        ("no metrics: keep", 3, [], make_spec(), [], 3, "NoMetrics", False),
        ("below the minimum", 0, [], make_spec(min_=2), [], 2, "BelowMinimum", False),
        ("above the maximum", 15, loads(*[100] * 15), make_spec(max_=10), [], 10, "AboveMaximum", True),
        ("idle stays at min", 2, loads(0, 0), make_spec(min_=2), [], 2, "AtMinimum", False),
        ("fixed count wins", 3, loads(0, 0, 0), make_spec(fixed=7), [], 7, "FixedReplicas", False),
        ("fixed count clamped", 3, loads(0, 0, 0), make_spec(fixed=0, min_=2), [], 2, "FixedReplicas", False),
        ("fixed count overloaded", 3, loads(900, 900, 900), make_spec(fixed=3), [], 3, "FixedReplicas", True),
    ],
)
def test_decide_table(
    name: str,
    current: int,
    pod_loads: list[policy.PodLoad],
    spec: specmod.MailRelaySpec,
    history: list[policy.Recommendation],
    desired: int,
    reason: str,
    overloaded: bool,
) -> None:
    decision = policy.decide(current, pod_loads, spec, NOW, history)
    assert (decision.desired, decision.reason, decision.overloaded) == (desired, reason, overloaded), name
    assert decision.message


def test_idle_relays_only_where_min_allows() -> None:
    # "idle stays at min": the raw recommendation is 0, the bounds keep 2 and it is reported as steady.
    decision = policy.decide(2, loads(0, 0), make_spec(min_=2), NOW, [])
    assert decision.recommended == 0 and decision.desired == 2


def test_history_is_pruned_and_appended() -> None:
    spec = make_spec(up=(60, 4), down=(300, 1))
    history = [policy.Recommendation(NOW - 400, 9), policy.Recommendation(NOW - 250, 5)]
    decision = policy.decide(5, loads(100, 100, 100, 100, 100), spec, NOW, history)
    assert decision.history == (policy.Recommendation(NOW - 250, 5), policy.Recommendation(NOW, 5))


def test_recommendations_from_the_future_are_dropped() -> None:
    decision = policy.decide(4, loads(0, 0, 0, 0), make_spec(), NOW, [policy.Recommendation(NOW + 3600, 9)])
    assert decision.desired == 3
    assert decision.history == (policy.Recommendation(NOW, 0),)


def test_partial_metrics_do_not_enter_the_window_as_low_values() -> None:
    decision = policy.decide(4, loads(0, 0, None, None), make_spec(), NOW, [])
    assert decision.history[-1].replicas == 4


def test_a_window_of_ticks_scales_down_only_after_stabilization() -> None:
    spec = make_spec(down=(30, 1))
    history: tuple[policy.Recommendation, ...] = ()
    current = 4
    timeline = []
    for tick in range(12):
        now = NOW + tick * 5
        busy = tick < 2
        decision = policy.decide(current, loads(*[100 if busy else 0] * current), spec, now, history)
        history = decision.history
        current = decision.desired
        timeline.append(current)
    # load vanished at tick 2; the last busy recommendation (t=5 s) leaves the 30 s window at t=35 s (tick 7)
    assert timeline == [4, 4, 4, 4, 4, 4, 4, 3, 2, 1, 1, 1]


# ---------------------------------------------------------------------------------------------------
# decide: properties
# ---------------------------------------------------------------------------------------------------

metric = st.one_of(st.none(), st.integers(min_value=0, max_value=5000))


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[int, list[policy.PodLoad], specmod.MailRelaySpec, list[policy.Recommendation]]:
    lo = draw(st.integers(1, 10))
    hi = draw(st.integers(lo, 30))
    spec = make_spec(
        min_=lo,
        max_=hi,
        fixed=draw(st.one_of(st.none(), st.integers(0, 40))) if draw(st.integers(0, 9)) == 0 else None,
        sessions=draw(st.integers(1, 300)),
        queue=draw(st.integers(1, 2000)),
        up=(draw(st.integers(0, 120)), draw(st.integers(1, 6))),
        down=(draw(st.integers(0, 600)), draw(st.integers(1, 6))),
    )
    current = draw(st.integers(0, 40))
    n = draw(st.integers(0, 12))
    pod_loads = [policy.PodLoad(f"p{i}", draw(metric), draw(metric)) for i in range(n)]
    history = draw(
        st.lists(
            st.builds(policy.Recommendation, st.floats(NOW - 700, NOW - 0.001), st.integers(0, 40)),
            max_size=8,
        )
    )
    history.sort(key=lambda r: r.at)
    return current, pod_loads, spec, history


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_properties(
    case: tuple[int, list[policy.PodLoad], specmod.MailRelaySpec, list[policy.Recommendation]],
) -> None:
    current, pod_loads, spec, history = case
    bounds = spec.replicas
    d = policy.decide(current, pod_loads, spec, NOW, history)

    # bounds always hold
    assert bounds.min <= d.desired <= bounds.max
    # the history keeps this decision's raw recommendation and nothing older than the widest window
    window = max(spec.scaling.scale_up.stabilization_seconds, spec.scaling.scale_down.stabilization_seconds)
    assert d.history[-1] == policy.Recommendation(NOW, d.recommended)
    assert all(r.at > NOW - window for r in d.history[:-1])

    if bounds.fixed is not None:
        assert d.desired == max(bounds.min, min(bounds.max, bounds.fixed))
        return

    assert d.overloaded == (d.recommended > bounds.max)
    in_bounds = bounds.min <= current <= bounds.max
    partial = any(p.sessions is None or p.queue_messages is None for p in pod_loads)
    if in_bounds:
        # one decision moves at most one step
        assert current - spec.scaling.scale_down.max_pods_per_step <= d.desired
        assert d.desired <= current + spec.scaling.scale_up.max_pods_per_step
        # no scale-down on partial metrics (or without metrics)
        if partial or not pod_loads:
            assert d.desired >= current
        # scale-down never goes below any recommendation of the scale-down window
        if d.desired < current:
            cutoff = NOW - spec.scaling.scale_down.stabilization_seconds
            in_window = [r.replicas for r in history if r.at > cutoff] + [d.recommended]
            assert d.desired >= min(current, max(in_window))
            assert d.desired >= d.recommended
        # scale-up never goes above any recommendation of the scale-up window
        if d.desired > current:
            cutoff = NOW - spec.scaling.scale_up.stabilization_seconds
            in_window = [r.replicas for r in history if r.at > cutoff] + [d.recommended]
            assert d.desired <= max(current, min(in_window))
            assert d.desired <= d.recommended or d.desired == bounds.min


@settings(max_examples=200, deadline=None)
@given(scenarios(), st.integers(0, 500))
def test_more_load_never_asks_for_fewer_relays(
    case: tuple[int, list[policy.PodLoad], specmod.MailRelaySpec, list[policy.Recommendation]], extra: int
) -> None:
    current, pod_loads, spec, history = case
    spec = dataclasses.replace(spec, replicas=dataclasses.replace(spec.replicas, fixed=None))
    known = [p for p in pod_loads if p.sessions is not None and p.queue_messages is not None]
    assume(len(known) <= current)
    heavier = [dataclasses.replace(p, sessions=(p.sessions or 0) + extra) for p in known]
    light = policy.decide(current, known, spec, NOW, history)
    heavy = policy.decide(current, heavier, spec, NOW, history)
    assert heavy.recommended >= light.recommended
    assert heavy.desired >= light.desired


def test_negative_current_is_rejected() -> None:
    with pytest.raises(ValueError):
        policy.decide(-1, [], make_spec(), NOW, [])
