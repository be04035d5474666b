"""What a MailRelay's status says: its fields and its four conditions (Ready, Scaling, Overloaded,
Draining), derived from what one scaling tick saw (the relays' states) and decided (the policy's
Decision, the drain Plan), and the stabilization window as kept in `status.recommendations`.

Pure: no I/O, no clock reads (the tick passes `now`); it decides neither the scale (that is `policy`) nor
the drains (that is `drain`), it only reports them. `conditions` sets the conditions in the live list
and says when a patch is due.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mailrelay_operator import conditions, drain, manifests, policy, spec

JSON = dict[str, Any]
Condition = tuple[str, conditions.Status, str, str]  # (type, status, reason, message)

HISTORY_GRID_SECONDS = 30.0


@dataclass(frozen=True)
class Report:
    """The status fields and conditions to write, and the counts the metrics show."""

    status: JSON
    conditions: tuple[Condition, ...]
    ready: int = 0  # ready relays (the readyReplicas field)
    draining: int = 0  # relays draining after this tick (the drainingPods field)


def invalid_spec(generation: int, message: str) -> Report:
    """A spec the operator cannot act on: Ready=False, InvalidSpec, and nothing else changes."""
    return Report({"observedGeneration": generation}, ((conditions.READY, "False", "InvalidSpec", message),))


def after_tick(
    *,
    name: str,
    generation: int,
    parsed: spec.MailRelaySpec,
    decision: policy.Decision,
    plan: drain.Plan,
    states: Sequence[drain.PodState],
    replicas: int,
    scaled: bool,
    now: float,
    orphaned_spools: Sequence[str] = (),
) -> Report:
    """The status after a tick applied `plan`: `replicas` is the Deployment's count now, `scaled` whether
    this tick changed it, `orphaned_spools` the claims this tick found outside the StatefulSet
    (`drain.orphaned_claims`)."""
    # Pods the ReplicaSet counts: not being deleted, not terminated (an evicted pod is already replaced).
    live = [s for s in states if not s.deleting and s.phase not in drain.TERMINAL_PHASES]
    ended = {pod for pod, _ in plan.completed}
    draining = sorted(
        [s.name for s in live if s.draining and s.name not in plan.resume and s.name not in ended]
        + [s.name for s in live if s.name in plan.start_drain]
    )
    ready = [s for s in live if s.ready and s.phase == "Running"]
    serving_ready = [s for s in ready if not s.draining or s.name in plan.resume]
    serving = max(0, replicas - len(draining))
    fields: JSON = {
        # Serving or starting relays, as the CRD documents and the scale subresource reports.
        "replicas": serving,
        "readyReplicas": len(ready),
        "desiredReplicas": decision.desired,
        "selector": manifests.selector(name),
        "drainingPods": len(draining),
        "sessions": sum(s.sessions or 0 for s in live),
        "queueMessages": sum(s.queue_messages or 0 for s in live),
        "observedGeneration": generation,
        "mode": "Autoscale" if parsed.autoscaling else "Fixed",
        "recommendations": persisted_history(decision.history),
        "orphanedSpools": sorted(orphaned_spools),
    }
    if scaled:
        fields["lastScaleTime"] = drain.format_time(now)
    conds = (
        ready_condition(parsed.maintenance, len(serving_ready), decision.desired),
        (conditions.SCALING, conditions.status_of(serving != decision.desired or not plan.empty),
         decision.reason, decision.message or decision.reason),
        overloaded_condition(decision, parsed.replicas.max),
        draining_condition(parsed.maintenance, draining, plan.held),
    )
    return Report(fields, conds, ready=len(ready), draining=len(draining))


def ready_condition(maintenance: bool, serving_ready: int, wanted: int) -> Condition:
    if maintenance:
        return (conditions.READY, "False", "Maintenance",
                "spec.maintenance is true: every relay drains and answers 421")
    counts = f"{serving_ready} of {wanted} relays ready"
    if serving_ready >= wanted:
        return conditions.READY, "True", "ReplicasReady", counts
    return conditions.READY, "False", "ReplicasNotReady", counts


def overloaded_condition(decision: policy.Decision, maximum: int) -> Condition:
    if decision.overloaded:
        return (conditions.OVERLOADED, "True", "DemandAboveMaximum",
                f"the load asks for {decision.recommended} relays, above the maximum {maximum}; "
                "relays shed new sessions with 421")
    return (conditions.OVERLOADED, "False", "WithinCapacity",
            f"the load fits within the maximum of {maximum} relays")


def draining_condition(maintenance: bool, draining: Sequence[str], held: Sequence[str]) -> Condition:
    if maintenance:
        return conditions.DRAINING, "True", "Maintenance", f"{len(draining)} relays draining for maintenance"
    if held:
        return (conditions.DRAINING, "True", "HeldByQueuedMail",
                f"draining {', '.join(draining)}; past the drain timeout and kept until their queue is "
                f"empty (spec.drain.onTimeout): {', '.join(held)}")
    if draining:
        return conditions.DRAINING, "True", "ScaleIn", f"draining {', '.join(draining)}"
    return conditions.DRAINING, "False", "NoDrain", "no relay is draining"


def persisted_history(history: Sequence[policy.Recommendation]) -> list[JSON]:
    """The stabilization window as kept in status.recommendations, compact and slow-changing.

    Only the latest time of each recommended count matters to the window's min/max, so one entry per
    count is kept, its time rounded up to a 30 s grid: the status changes about twice a minute in a
    steady state instead of every tick, and a restarted operator holds a scale-down at most 30 s longer
    (never shorter). `load_history` caps the times at the present, so no entry blocks a scale-up.
    """
    latest: dict[int, float] = {}
    for rec in history:
        latest[rec.replicas] = max(latest.get(rec.replicas, rec.at), rec.at)
    grid = HISTORY_GRID_SECONDS
    return [
        {"at": -(-at // grid) * grid, "replicas": replicas}
        for replicas, at in sorted(latest.items(), key=lambda item: (item[1], item[0]))
    ]


def load_history(body: Mapping[str, Any], now: float) -> tuple[policy.Recommendation, ...]:
    """The stabilization window read back from a MailRelay's status.recommendations (bad entries skipped,
    times capped at `now`)."""
    raw = (body.get("status") or {}).get("recommendations") or []
    history: list[policy.Recommendation] = []
    for item in raw:
        try:
            at = min(float(item["at"]), now)
            history.append(policy.Recommendation(at=at, replicas=int(item["replicas"])))
        except (KeyError, TypeError, ValueError):
            continue
    return tuple(sorted(history, key=lambda rec: rec.at))
