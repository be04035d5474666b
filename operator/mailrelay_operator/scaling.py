"""The scaling loop's tick for one MailRelay: observe the relays, ask `policy` for the count and `drain`
for the plan, apply the plan, and report (status and conditions from `status`, Events, metrics).

The tick is also the one path that ensures the owned objects (`owned.ensure`): at its first run, after
a spec change (a new generation), and every `--resync-seconds`.

What it must not do: decide anything itself (the count is `policy`'s, the drains `drain`'s, the status
`status`'s); it orders the I/O, and it makes no API call except through `kube`. Every step is idempotent
and restart-safe: drain state lives on pods (annotations), the stabilization window in
`status.recommendations`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from mailrelay_operator import (
    conditions,
    drain,
    kube,
    kubetypes,
    manifests,
    metrics,
    observation,
    owned,
    policy,
    runtime,
    spec,
    status,
)

logger = logging.getLogger("mailrelay_operator.scaling")

# A finished drain's Event: by its outcome, (reason, message with {pod}, type).
COMPLETED_EVENTS = {
    drain.OUTCOME_DRAINED: ("DrainCompleted", "relay {pod} drained: no session, empty queue; removing it",
                            "Normal"),
    drain.OUTCOME_TIMEOUT: ("DrainTimedOut", "relay {pod} did not drain within the timeout; removing it",
                            "Warning"),
}


@dataclass(frozen=True)
class TickReport:
    decision: policy.Decision | None
    plan: drain.Plan | None
    replicas: int | None


async def tick(rt: runtime.Runtime, body: Mapping[str, Any], memory: runtime.Memory,
               now: float | None = None) -> TickReport:
    """One pass of the scaling loop: observe, decide (policy + drain plan), apply, report."""
    namespace, name = runtime.meta(body)
    metrics.initialise(namespace, name)  # its counters exist (at 0) from the first tick on
    now = time.time() if now is None else now
    generation = int(body.get("metadata", {}).get("generation") or 0)
    try:
        parsed = spec.parse(body.get("spec") or {})
    except spec.SpecError as exc:
        await _patch_status(rt, body, memory, status.invalid_spec(generation, str(exc)), now)
        return TickReport(None, None, None)
    await _ensure_owned_when_due(rt, body, parsed, memory, generation, now)

    workload = owned.workload(parsed)
    deployment = await rt.read.get(workload, namespace, name)
    if deployment is None:
        return TickReport(None, None, None)
    dep_replicas = int((deployment.get("spec") or {}).get("replicas") or 0)
    seen = await observation.observe(rt, namespace, name, memory)
    states = seen.states
    # Serving relays; in and right after maintenance, the Deployment's count (not scale-in: the pool comes
    # back at its size instead of dropping to the minimum).
    # A StatefulSet's pods above its replicas are already leaving (the controller removes them): not
    # counted, as a Deployment's pods being deleted are not.
    members = drain.set_members(name, dep_replicas, states) if workload is kube.STATEFULSETS else states
    current = drain.serving_replicas(dep_replicas, members, parsed.maintenance)
    if memory.history is None:
        memory.history = status.load_history(body, now)
    decision = policy.decide(current, policy.loads(states), parsed, now, memory.history)
    memory.history = decision.history
    keep_queued = parsed.drain_on_timeout == "KeepWhileQueued"
    orphans: tuple[tuple[int, str], ...] = ()
    if workload is kube.STATEFULSETS:
        claims = cast(list[kubetypes.PersistentVolumeClaim],
                      await rt.read.list_(kube.PVCS, namespace, manifests.selector_labels(name)))
        prefix = manifests.spool_claim_prefix(name)
        claimed = drain.claimed_ordinals(prefix, claims)
        orphans = drain.orphaned_claims(name, prefix, dep_replicas, claims, seen.pods.keys())
        recover = drain.recovers_orphans(cast(kubetypes.StatefulSet, deployment))
        plan = drain.plan_ordinals(name, decision.desired, dep_replicas, states, now,
                                   float(parsed.drain_timeout_seconds), parsed.maintenance, keep_queued,
                                   claimed=claimed, orphans=[n for n, _ in orphans] if recover else ())
        await _announce_orphans(rt, body, memory, orphans, recover and not parsed.maintenance,
                                parsed.maintenance)
    else:
        plan = drain.plan(decision.desired, dep_replicas, states, now, float(parsed.drain_timeout_seconds),
                          parsed.maintenance, keep_queued)
    new_replicas = await apply_plan(rt, body, plan, seen, dep_replicas, now, token=memory.token,
                                    workload=workload)
    await _announce_held(rt, body, memory, plan.held, {s.name: s for s in states},
                         parsed.drain_timeout_seconds)

    report = status.after_tick(
        name=name, generation=generation, parsed=parsed, decision=decision, plan=plan, states=states,
        replicas=new_replicas if new_replicas is not None else dep_replicas,
        scaled=new_replicas is not None, now=now, orphaned_spools=[claim for _, claim in orphans],
    )
    await _patch_status(rt, body, memory, report, now)
    metrics.DESIRED_REPLICAS.labels(namespace, name).set(decision.desired)
    metrics.READY_REPLICAS.labels(namespace, name).set(report.ready)
    metrics.DRAINING_PODS.labels(namespace, name).set(report.draining)
    metrics.OVERLOADED.labels(namespace, name).set(1 if decision.overloaded else 0)
    metrics.ORPHANED_SPOOLS.labels(namespace, name).set(len(orphans))
    metrics.LAST_RECONCILE.labels(namespace, name).set(now)
    return TickReport(decision, plan, new_replicas)


async def _ensure_owned_when_due(rt: runtime.Runtime, body: Mapping[str, Any], parsed: spec.MailRelaySpec,
                                 memory: runtime.Memory, generation: int, now: float) -> None:
    """The owned objects, at the first tick, after a spec change and every `--resync-seconds`. A failure
    is counted (handler "owned") and retried at the next tick; the tick goes on with what exists."""
    if now - memory.last_resync < rt.config.resync_seconds and memory.observed_generation == generation:
        return
    namespace, name = runtime.meta(body)
    try:
        actions = await owned.ensure(rt, body, parsed, memory)
    except kube.ApiError as exc:
        metrics.RECONCILE_ERRORS.labels(metrics.HANDLER_OWNED).inc()
        logger.warning("%s/%s: cannot ensure the owned objects: %s", namespace, name, exc)
        return
    memory.last_resync = now
    memory.observed_generation = generation
    changed = {kind: action for kind, action in actions.items() if action != "unchanged"}
    if changed:
        logger.info("%s/%s: owned objects: %s", namespace, name,
                    ", ".join(f"{kind} {action}" for kind, action in changed.items()))


async def _announce_held(rt: runtime.Runtime, body: Mapping[str, Any], memory: runtime.Memory,
                         held: Sequence[str], states: Mapping[str, drain.PodState],
                         timeout_seconds: int) -> None:
    """A Warning Event the first time this process sees a drain held past its timeout by queued mail."""
    for name in held:
        if name in memory.held:
            continue
        state = states.get(name)
        queued = "an unknown number of" if state is None or state.queue_messages is None \
            else str(state.queue_messages)
        await rt.kube.post_event(
            body, reason="DrainHeld", type_="Warning",
            message=f"relay {name} is still draining after the {timeout_seconds}s drain timeout with "
                    f"{queued} messages queued; it is kept until its queue is empty "
                    "(spec.drain.onTimeout: KeepWhileQueued). Check its upstream.",
        )
    memory.held = set(held)


async def _announce_orphans(rt: runtime.Runtime, body: Mapping[str, Any], memory: runtime.Memory,
                            orphans: Sequence[tuple[int, str]], recovering: bool, maintenance: bool) -> None:
    """An Event when this process first sees an orphaned spool claim, and when that claim's fate
    changes: Normal when its ordinal is brought back to deliver what it holds, Warning when it is not
    (and why)."""
    _, name = runtime.meta(body)
    for n, claim in orphans:
        if memory.orphans.get(claim) == recovering:
            continue
        if recovering:
            await rt.kube.post_event(
                body, reason="OrphanedSpoolRecovering",
                message=f"claim {claim} of ordinal {n}, beyond the StatefulSet, may hold mail: the "
                        f"StatefulSet grows to bring {name}-{n} back, which delivers what the claim holds "
                        "and is then drained; its claim goes with it",
            )
        else:
            why = ("spec.maintenance is true" if maintenance else
                   "the StatefulSet has no persistentVolumeClaimRetentionPolicy whenScaled: Delete "
                   "(the cluster ignores it), so the claim would be left again after the drain")
            await rt.kube.post_event(
                body, reason="OrphanedSpool", type_="Warning",
                message=f"claim {claim} of ordinal {n}, beyond the StatefulSet, may hold mail and is not "
                        f"brought back: {why}. docs/operator.md, \"Orphaned claims\", says how to flush it",
            )
    memory.orphans = {claim: recovering for _, claim in orphans}


async def _patch_status(rt: runtime.Runtime, body: Mapping[str, Any], memory: runtime.Memory,
                        report: status.Report, now: float) -> None:
    """Write the report's status and conditions, when `conditions.patch_due` says so."""
    namespace, name = runtime.meta(body)
    existing: list[kubetypes.Condition] = list((body.get("status") or {}).get("conditions") or [])
    generation = body.get("metadata", {}).get("generation")
    for type_, status_, reason, message in report.conditions:
        existing = conditions.set_condition(existing, type_, status_, reason, message, drain.format_time(now),
                                            observed_generation=generation)
    wanted = {**report.status, "conditions": existing}
    if not conditions.patch_due(body.get("status") or {}, wanted, now=now,
                                last_patch=memory.last_status_patch,
                                refresh_seconds=rt.config.status_refresh_seconds):
        return
    with contextlib.suppress(kube.NotFound):  # deleted meanwhile
        await rt.kube.patch(kube.MAILRELAYS, namespace, name, {"status": wanted}, subresource="status")
    memory.last_status_patch = now


async def apply_plan(rt: runtime.Runtime, body: Mapping[str, Any], plan: drain.Plan,
                     seen: observation.Observation, dep_replicas: int, now: float, *,
                     token: str | None, workload: kube.Resource = kube.DEPLOYMENTS) -> int | None:
    """Apply a drain Plan in the order `drain` documents. Returns the workload's new replicas, if set."""
    by_state = {s.name: s for s in seen.states}
    await _start_drains(rt, body, plan, seen, now, token)
    await _resume(rt, body, plan, seen, by_state, now, token)
    return await _finish(rt, body, plan, by_state, dep_replicas, now, workload)


async def _start_drains(rt: runtime.Runtime, body: Mapping[str, Any], plan: drain.Plan,
                        seen: observation.Observation, now: float, token: str | None) -> None:
    """1. Start drains: record on the pod first (restart-safe), then tell the relay."""
    namespace, _ = runtime.meta(body)
    started: list[str] = []
    for pod_name in plan.start_drain:
        try:
            await rt.kube.patch(
                kube.PODS, namespace, pod_name, {"metadata": {"annotations": drain.drain_annotations(now)}}
            )
        except kube.NotFound:
            continue
        started.append(pod_name)
    to_drain = seen.endpoints((*started, *plan.redrain), token)
    if to_drain:
        await rt.relays.call_many("drain", to_drain)
    for pod_name in started:
        await rt.kube.post_event(
            body, reason="DrainStarted",
            message=f"draining relay {pod_name}: new sessions get 421, the queue flushes",
        )


async def _resume(rt: runtime.Runtime, body: Mapping[str, Any], plan: drain.Plan,
                  seen: observation.Observation, by_state: Mapping[str, drain.PodState], now: float,
                  token: str | None) -> None:
    """2. Resume: tell the relay first, then clear the record."""
    if not plan.resume:
        return
    namespace, _ = runtime.meta(body)
    results = await rt.relays.call_many("resume", seen.endpoints(plan.resume, token))
    for pod_name in plan.resume:
        if pod_name in results and results[pod_name] is None:
            continue  # the relay did not answer: keep the drain record, retry next tick
        try:
            await rt.kube.patch(
                kube.PODS, namespace, pod_name, {"metadata": {"annotations": drain.resume_annotations()}}
            )
        except kube.NotFound:
            continue
        _observe_drain(by_state, pod_name, metrics.OUTCOME_CANCELLED, now)
        await rt.kube.post_event(
            body, reason="DrainCancelled", message=f"demand rose: relay {pod_name} resumed service"
        )


async def _finish(rt: runtime.Runtime, body: Mapping[str, Any], plan: drain.Plan,
                  by_state: Mapping[str, drain.PodState], dep_replicas: int, now: float,
                  workload: kube.Resource) -> int | None:
    """3. Relays whose drain is over become the cheapest pods (below those still draining); 4. lower the
    Deployment's count, so the ReplicaSet removes them (NotReady and cheapest) and never starts a
    replacement that could take sessions; 5. delete them ourselves too: a no-op when the ReplicaSet was
    first, and when it removed a pod that never served instead, the count stays right.
    A StatefulSet's plan (`operator_deletes` False) skips 3 and 5: lowering its count removes exactly
    the completed ordinals, and their claims after them."""
    namespace, name = runtime.meta(body)
    can_lower = True
    for pod_name, _ in plan.completed if plan.operator_deletes else ():
        try:
            await rt.kube.patch(
                kube.PODS, namespace, pod_name, {"metadata": {"annotations": drain.finished_annotations()}}
            )
        except kube.NotFound:
            continue
        except kube.ApiError as exc:
            can_lower = False
            logger.warning("%s/%s: cannot mark drained pod %s: %s", namespace, name, pod_name, exc)

    new: int | None = None
    if plan.deployment_replicas is not None:
        if not can_lower:
            return None  # nothing removed this tick; the next tick retries the whole step
        new = plan.deployment_replicas
        await rt.kube.patch(workload, namespace, name, {"spec": {"replicas": new}})
        metrics.SCALE_EVENTS.labels(namespace, name, "up" if new > dep_replicas else "down").inc()

    events: list[tuple[str, str, str]] = []
    for pod_name, result in plan.completed:
        if plan.operator_deletes:
            try:
                await rt.kube.delete(kube.PODS, namespace, pod_name)
            except kube.ApiError as exc:
                logger.warning("%s/%s: cannot delete drained pod %s: %s", namespace, name, pod_name, exc)
                continue
        _observe_drain(by_state, pod_name, result, now)
        reason, message, type_ = COMPLETED_EVENTS[result]
        events.append((reason, message.format(pod=pod_name), type_))
    for pod_name in plan.delete_pods:
        try:
            await rt.kube.delete(kube.PODS, namespace, pod_name)
        except kube.ApiError as exc:
            logger.warning("%s/%s: cannot delete pod %s: %s", namespace, name, pod_name, exc)

    if new is not None:  # posted after the drain Events, in the order they happen
        events.append(("ScaledUp" if new > dep_replicas else "ScaledDown",
                       f"{workload.kind} {name} replicas {dep_replicas} -> {new}", "Normal"))
    for reason, message, type_ in events:
        await rt.kube.post_event(body, reason=reason, message=message, type_=type_)
    return new


def _observe_drain(by_state: Mapping[str, drain.PodState], pod_name: str, outcome: str, now: float) -> None:
    """The drain's duration, by outcome, when the pod's drain start is known."""
    state = by_state.get(pod_name)
    if state is not None and state.drain_started is not None:
        metrics.DRAIN_DURATION.labels(outcome).observe(max(0.0, now - state.drain_started))
