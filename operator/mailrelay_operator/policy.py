"""The scaling policy: how many serving relays a MailRelay should have, from the load its pods report.

It follows the Kubernetes HPA (docs/operator.md §3): per metric `ceil(sum(observed) / target)` over the pods
that serve (not draining), a tolerance of 0.1, the highest recommendation over the metrics, the HPA's
missing-metric rule (a missing value counts as 100 % of target when scaling down and 0 % when scaling
up), stabilization windows and per-step limits, and finally the min/max bounds. One stricter rule than
the HPA: while any serving pod's metrics are missing the policy never scales down (a failed scrape may
mean an overloaded relay). When `/scale` set a fixed count, that count wins (clamped to the bounds).

Pure: no I/O, no clock reads (time is `now`, in seconds), no asyncio. It must not talk to Kubernetes or
to relays, and it does not pick which pods go: that is `drain`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mailrelay_operator import drain
from mailrelay_operator import spec as specmod

TOLERANCE_TENTHS = 1  # the HPA's 0.1 tolerance, kept as an integer fraction for exact arithmetic
TOLERANCE = TOLERANCE_TENTHS / 10


@dataclass(frozen=True)
class PodLoad:
    """The load one serving (not draining, running and ready) pod reported; None = scrape failed."""

    name: str
    sessions: int | None
    queue_messages: int | None


@dataclass(frozen=True)
class Recommendation:
    """A raw recommendation kept for the stabilization windows (`at` in seconds, like `now`)."""

    at: float
    replicas: int


@dataclass(frozen=True)
class Decision:
    desired: int  # serving replicas wanted now: stabilized, step-limited, within min..max
    recommended: int  # the raw recommendation from the metrics, before stabilization, steps and bounds
    overloaded: bool  # the load needs more serving relays than the bounds (or the fixed count) allow
    reason: str  # CamelCase, usable as a condition reason and an Event reason
    history: tuple[Recommendation, ...]  # pruned window, oldest first; pass it to the next decide()
    message: str = ""  # one human sentence for the Scaling condition and Events


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def metric_replicas(
    current: int, values: Sequence[int | None], target: int, unready: int = 0
) -> tuple[int, bool]:
    """HPA recommendation for one per-pod average metric. Returns (replicas, partial).

    `values` holds one entry per serving pod that is ready (None when its value is missing); `unready`
    counts the serving pods that are not ready yet (pending or starting). As in the HPA, a missing value
    counts as 100 % of target when the pods measured ask for fewer relays and as 0 % when they ask for
    more, and unready pods count as 0 % when scaling up (they will take load soon) and are left out when
    scaling down. Within the tolerance, or when filling in flips the direction, the answer is `current`.
    `partial` is True when a value is missing.
    """
    if target < 1:
        raise ValueError("target must be positive")
    known = [max(0, v) for v in values if v is not None]
    missing = len(values) - len(known)
    if not known:
        return current, missing > 0
    total = sum(known)
    scale = len(known) * target
    # usage ratio = total / scale; compared with 1 +- tolerance in exact integer arithmetic.
    if 10 * abs(total - scale) <= TOLERANCE_TENTHS * scale:
        return current, missing > 0
    going_up = total > scale
    rebalance_unready = going_up and unready > 0
    if missing == 0 and not rebalance_unready:
        return _same_direction(current, _ceil_div(total, target), going_up), False
    filled = total + (0 if going_up else missing * target)
    pods = len(values) + (unready if rebalance_unready else 0)
    new_scale = pods * target
    within = 10 * abs(filled - new_scale) <= TOLERANCE_TENTHS * new_scale
    flipped = filled < new_scale if going_up else filled > new_scale
    if within or flipped:
        return current, missing > 0
    return _same_direction(current, _ceil_div(filled, target), going_up), missing > 0


def _same_direction(current: int, proposal: int, going_up: bool) -> int:
    """Never move against the load: more load than target never lowers the count, less never raises it
    (possible when more pods were measured than `current` counts, e.g. during a rollout)."""
    if going_up:
        return max(current, proposal)
    return min(current, proposal)


def recommend(current: int, loads: Sequence[PodLoad], targets: specmod.Targets) -> tuple[int, bool]:
    """The raw recommendation: the highest over sessions and queue. Returns (replicas, partial)."""
    if not loads:
        return current, True
    unready = max(0, current - len(loads))
    by_sessions, partial_s = metric_replicas(
        current, [p.sessions for p in loads], targets.sessions_per_pod, unready
    )
    by_queue, partial_q = metric_replicas(
        current, [p.queue_messages for p in loads], targets.queue_per_pod, unready
    )
    return max(by_sessions, by_queue), partial_s or partial_q


def loads(states: Sequence[drain.PodState]) -> list[PodLoad]:
    """The relays whose load counts: running, not draining, not being deleted, and ready or unscraped.

    A relay whose scrape failed counts too: a relay that hangs turns NotReady, and it may be the busiest
    one, so its metrics are missing (no scale-down on partial metrics), not those of a relay still
    starting."""
    return [
        PodLoad(s.name, s.sessions, s.queue_messages)
        for s in states
        if s.phase == "Running" and not s.draining and not s.deleting and (s.ready or s.sessions is None)
    ]


def clamp(value: int, bounds: specmod.ReplicaBounds) -> int:
    return max(bounds.min, min(bounds.max, value))


def decide(
    current: int,
    loads: Sequence[PodLoad],
    spec: specmod.MailRelaySpec,
    now: float,
    history: Sequence[Recommendation],
) -> Decision:
    """One scaling decision.

    `current`: the serving replicas the operator currently wants (the Deployment's replicas minus the
    pods being drained). `loads`: one entry per serving pod that is running and ready (pending pods are
    left out: they will take load soon). `history`: the previous Decision.history (empty after a start).
    """
    if current < 0:
        raise ValueError("current must not be negative")
    bounds = spec.replicas
    up, down = spec.scaling.scale_up, spec.scaling.scale_down
    raw, partial = recommend(current, loads, spec.scaling.targets)
    vetoed = partial and raw < current
    if vetoed:
        raw = current

    window = max(up.stabilization_seconds, down.stabilization_seconds)
    # Entries from the future (a clock that went back, a restored status) would hold the window open
    # for as long as the jump; they are dropped.
    history = [r for r in history if r.at <= now]
    kept = tuple(r for r in history if r.at > now - window)
    new_history = (*kept, Recommendation(at=now, replicas=raw))

    if bounds.fixed is not None:
        desired = clamp(bounds.fixed, bounds)
        note = "" if desired == bounds.fixed else f", clamped to {bounds.min}..{bounds.max}"
        return Decision(
            desired=desired,
            recommended=raw,
            overloaded=raw > desired,
            reason="FixedReplicas",
            history=new_history,
            message=f"replicas fixed at {bounds.fixed} through the scale subresource{note}; "
            f"the load alone would ask for {raw}",
        )

    # Stabilization as the HPA does it: never above the lowest recommendation of the scale-up window,
    # never below the highest of the scale-down window; the current raw value belongs to both.
    up_limit = raw
    down_limit = raw
    for rec in history:
        if rec.at > now - up.stabilization_seconds:
            up_limit = min(up_limit, rec.replicas)
        if rec.at > now - down.stabilization_seconds:
            down_limit = max(down_limit, rec.replicas)
    stabilized = current
    stabilized = max(stabilized, up_limit)
    stabilized = min(stabilized, down_limit)

    if stabilized > current:
        stepped = min(stabilized, current + up.max_pods_per_step)
    elif stabilized < current:
        stepped = max(stabilized, current - down.max_pods_per_step)
    else:
        stepped = current
    desired = clamp(stepped, bounds)
    overloaded = raw > bounds.max

    if desired > current:
        if current < bounds.min and stepped <= bounds.min:
            reason, message = "BelowMinimum", f"{current} serving, raising to the minimum {bounds.min}"
        else:
            reason, message = "ScaleUp", f"load asks for {raw}, scaling up from {current} to {desired}"
    elif desired < current:
        if current > bounds.max and stepped >= bounds.max:
            reason, message = "AboveMaximum", f"{current} serving, lowering to the maximum {bounds.max}"
        else:
            reason, message = "ScaleDown", f"load asks for {raw}, scaling down from {current} to {desired}"
    elif vetoed:
        reason, message = "PartialMetrics", "some relays did not report their load; not scaling down"
    elif not loads:
        reason, message = "NoMetrics", "no serving relay reported its load yet"
    elif raw < current and current <= bounds.min:
        reason, message = "AtMinimum", f"load asks for {raw}, held at the minimum {bounds.min}"
    elif raw < current:
        reason, message = (
            "Stabilizing",
            (
                f"load asks for {raw}; keeping {current} within the "
                f"{down.stabilization_seconds}s scale-down window"
            ),
        )
    elif raw > current and overloaded and current >= bounds.max:
        reason, message = "AtMaximum", f"load asks for {raw}, held at the maximum {bounds.max}"
    elif raw > current:
        reason, message = (
            "Stabilizing",
            (
                f"load asks for {raw}; keeping {current} within the "
                f"{up.stabilization_seconds}s scale-up window"
            ),
        )
    else:
        reason, message = "Steady", f"load fits {current} serving relays"
    return Decision(
        desired=desired,
        recommended=raw,
        overloaded=overloaded,
        reason=reason,
        history=new_history,
        message=message,
    )
