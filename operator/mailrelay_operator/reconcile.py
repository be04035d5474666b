"""The operator's I/O steps for one MailRelay: ensure its owned objects, run one scaling/drain tick, and
drain everything on deletion. Each step gathers state (API, relays), asks the pure modules (`spec`,
`policy`, `drain`, `manifests`, `conditions`) what to do, applies it, and reports (status, Events,
metrics).

Every step is idempotent and restart-safe: drain state lives on pods (annotations), the policy's
stabilization window in `status.recommendations`, the admin token in its Secret. This module must not
contain decisions of its own beyond ordering the I/O, and it makes no API call except through `kube`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from mailrelay_operator import (
    cache,
    conditions,
    drain,
    kube,
    kubetypes,
    manifests,
    metrics,
    policy,
    relayclient,
    spec,
)

logger = logging.getLogger("mailrelay_operator.reconcile")

JSON = dict[str, Any]


@dataclass(frozen=True)
class Config:
    """Operator-wide settings from the command line."""

    relay_image: str = "mailrelay-relay:latest"
    relay_timeout: float = 2.0  # per admin call
    resync_seconds: float = 60.0  # how often the scaling loop re-checks the owned objects for drift
    status_refresh_seconds: float = 15.0  # sessions/queueMessages alone are written at most this often
    delete_wait_seconds: float | None = None  # bound of the finalizer's wait; None: spec drain timeout
    operator_labels: Mapping[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "mailrelay-operator"}
    )
    operator_namespace: str | None = None  # where the operator runs (NetworkPolicy peer); None: any
    # The metrics scraper (Prometheus) admitted to the relays' admin port: its pods' labels and namespace
    # (manifests.scraper_peer); both empty: none.
    metrics_scraper_labels: Mapping[str, str] = field(default_factory=dict)
    metrics_scraper_namespace: str | None = None


@dataclass
class Runtime:
    """What every handler shares: the API client, the relay client and the settings."""

    kube: kube.Kube
    relays: relayclient.RelayClient
    config: Config
    # Where the scaling loop reads Deployments and pods: the watch-fed cache, or the API when None.
    read_cache: cache.Cache | None = None

    @property
    def read(self) -> cache.Reader:
        return self.read_cache if self.read_cache is not None else self.kube


@dataclass
class Memory:
    """Per-MailRelay memory of the running operator (lost on restart, rebuilt from the cluster)."""

    history: tuple[policy.Recommendation, ...] | None = None  # None: load from status.recommendations
    token: str | None = None
    last_resync: float = 0.0
    observed_generation: int | None = None
    last_status_patch: float | None = None  # when this process last wrote the status (conditions.patch_due)
    held: set[str] = field(default_factory=set)  # drains held past their timeout, already announced


def _meta(body: Mapping[str, Any]) -> tuple[str, str]:
    meta = body.get("metadata", {})
    return str(meta.get("namespace")), str(meta.get("name"))


def selector_labels(name: str) -> dict[str, str]:
    return dict(manifests.selector_labels(name))


def selector_string(name: str) -> str:
    return manifests.selector(name)


def now_iso(now: float) -> str:
    return drain.format_time(now)


# ---------------------------------------------------------------------------------------------------
# Owned objects
# ---------------------------------------------------------------------------------------------------


async def ensure_owned(
    rt: Runtime, body: Mapping[str, Any], parsed: spec.MailRelaySpec, memory: Memory
) -> dict[str, str]:
    """Create or repair the Secret, Deployment, Service, PDB and NetworkPolicy. Returns kind -> action."""
    namespace, name = _meta(body)
    owner = cast(Any, body)  # kopf.adopt only reads metadata (a Body or a dict)
    secret_name = manifests.admin_secret_name(name)
    secret = manifests.admin_secret(name, namespace, secrets.token_urlsafe(32))
    live_deployment = await rt.kube.get(kube.DEPLOYMENTS, namespace, name)
    replicas = _initial_replicas(body, parsed)
    deployment: Any = manifests.deployment(
        name,
        namespace,
        parsed,
        image=parsed.image or rt.config.relay_image,
        replicas=replicas,
        token_secret=secret_name,
    )
    if live_deployment is not None:
        # The scaling loop owns the replica count once the Deployment exists. The count the create
        # applied stays ours until the loop first writes it; until then it is applied unchanged, under
        # the live resourceVersion, so a write of the loop in between is never undone (409, retried).
        if kube.manager_owns(live_deployment, ("spec", "replicas")):
            deployment["spec"]["replicas"] = live_deployment["spec"]["replicas"]
            deployment["metadata"]["resourceVersion"] = live_deployment["metadata"]["resourceVersion"]
        else:
            del deployment["spec"]["replicas"]
    objects: list[Any] = [
        secret,
        deployment,
        manifests.service(name, namespace),
        manifests.pod_disruption_budget(name, namespace),
        manifests.network_policy(
            name,
            namespace,
            dict(rt.config.operator_labels),
            operator_namespace=rt.config.operator_namespace,
            admin_peers=[p for p in (_scraper_peer(rt.config),) if p is not None],
        ),
    ]
    kopf.adopt(objects, owner=owner)
    actions: dict[str, str] = {}
    for obj in objects:
        known: Any = live_deployment if obj["kind"] == "Deployment" else "unknown"
        live, action = await rt.kube.ensure(obj, create_only=obj["kind"] == "Secret", live=known)
        actions[obj["kind"]] = action
        if obj["kind"] == "Secret":
            memory.token = _token_of(live)
    if live_deployment is None:
        logger.info("%s/%s: created the Deployment with %d replicas", namespace, name, replicas)
    return actions


def _scraper_peer(config: Config) -> kubetypes.NetworkPolicyPeer | None:
    return manifests.scraper_peer(config.metrics_scraper_labels, config.metrics_scraper_namespace)


def _initial_replicas(body: Mapping[str, Any], parsed: spec.MailRelaySpec) -> int:
    status = body.get("status") or {}
    desired = status.get("desiredReplicas")
    if isinstance(desired, int) and desired >= 0:
        return policy.clamp(desired, parsed.replicas) if parsed.replicas.fixed is None else desired
    if parsed.replicas.fixed is not None:
        return parsed.replicas.fixed
    return parsed.replicas.min


def _token_of(secret_obj: Mapping[str, Any]) -> str | None:
    return manifests.secret_token(cast(kubetypes.Secret, secret_obj))


async def _token(rt: Runtime, namespace: str, name: str, memory: Memory) -> str | None:
    if memory.token is None:
        secret_obj = await rt.kube.get(kube.SECRETS, namespace, manifests.admin_secret_name(name))
        if secret_obj is not None:
            memory.token = _token_of(secret_obj)
    return memory.token


# ---------------------------------------------------------------------------------------------------
# One scaling / drain tick
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TickReport:
    decision: policy.Decision | None
    plan: drain.Plan | None
    replicas: int | None


async def _observe(
    rt: Runtime, namespace: str, name: str, memory: Memory
) -> tuple[list[kubetypes.Pod], dict[str, kubetypes.RelayStatus | None], int]:
    pods = cast(list[kubetypes.Pod], await rt.read.list_(kube.PODS, namespace, selector_labels(name)))
    token = await _token(rt, namespace, name, memory)
    endpoints = {
        p["metadata"]["name"]: (
            relayclient.endpoint(p, token)
            if (p.get("status") or {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")
            else None
        )
        for p in pods
    }
    statuses = await rt.relays.status_many(endpoints)
    failures = sum(1 for pod, ep in endpoints.items() if ep is not None and statuses.get(pod) is None)
    if failures:
        metrics.SCRAPE_ERRORS.labels(namespace, name).inc(failures)
    return pods, statuses, failures


async def tick(rt: Runtime, body: Mapping[str, Any], memory: Memory, now: float | None = None) -> TickReport:
    """One pass of the scaling loop: observe, decide (policy + drain plan), apply, report."""
    namespace, name = _meta(body)
    metrics.initialise(namespace, name)  # its counters exist (at 0) from the first tick on
    now = time.time() if now is None else now
    generation = int(body.get("metadata", {}).get("generation") or 0)
    try:
        parsed = spec.parse(body.get("spec") or {})
    except spec.SpecError as exc:
        await _patch_status(
            rt,
            body,
            memory,
            {"observedGeneration": generation},
            [(conditions.READY, "False", "InvalidSpec", str(exc))],
            now,
        )
        return TickReport(None, None, None)

    if now - memory.last_resync >= rt.config.resync_seconds or memory.observed_generation != generation:
        await ensure_owned(rt, body, parsed, memory)
        memory.last_resync = now
        memory.observed_generation = generation

    deployment = await rt.read.get(kube.DEPLOYMENTS, namespace, name)
    if deployment is None:
        return TickReport(None, None, None)
    dep_replicas = int((deployment.get("spec") or {}).get("replicas") or 0)
    pods, statuses, _ = await _observe(rt, namespace, name, memory)
    states = [drain.pod_state(p, statuses.get(p["metadata"]["name"])) for p in pods]
    # Serving relays; in and right after maintenance, the Deployment's count (not scale-in: the pool comes
    # back at its size instead of dropping to the minimum).
    current = drain.serving_replicas(dep_replicas, states, parsed.maintenance)
    # A running relay counts when it is ready, and also when its scrape failed: a relay that hangs turns
    # NotReady too, and it may be the busiest one, so its metrics are missing (no scale-down on partial
    # metrics), not those of a relay still starting.
    loads = [
        policy.PodLoad(s.name, s.sessions, s.queue_messages)
        for s in states
        if s.phase == "Running" and not s.draining and not s.deleting and (s.ready or s.sessions is None)
    ]

    if memory.history is None:
        memory.history = _load_history(body, now)
    decision = policy.decide(current, loads, parsed, now, memory.history)
    memory.history = decision.history
    keep_queued = parsed.drain_on_timeout == "KeepWhileQueued"
    timeout = float(parsed.drain_timeout_seconds)
    plan = drain.plan(decision.desired, dep_replicas, states, now, timeout, parsed.maintenance, keep_queued)
    by_name = {p["metadata"]["name"]: p for p in pods}
    new_replicas = await apply_plan(rt, body, plan, by_name, states, dep_replicas, now, token=memory.token)
    held = plan.held
    await _announce_held(rt, body, memory, held, {s.name: s for s in states}, parsed.drain_timeout_seconds)

    # -- report --
    replicas_now = new_replicas if new_replicas is not None else dep_replicas
    # Pods the ReplicaSet counts: not being deleted, not terminated (an evicted pod is already replaced).
    live_states = [s for s in states if not s.deleting and s.phase not in drain.TERMINAL_PHASES]
    draining_now = [
        s
        for s in live_states
        if s.draining and s.name not in plan.resume and s.name not in {n for n, _ in plan.completed}
    ] + [s for s in live_states if s.name in plan.start_drain]
    ready = [s for s in live_states if s.ready and s.phase == "Running"]
    serving_ready = [s for s in ready if not s.draining or s.name in plan.resume]
    serving_now = max(0, replicas_now - len(draining_now))
    sessions = sum(s.sessions or 0 for s in live_states)
    queue = sum(s.queue_messages or 0 for s in live_states)
    status: JSON = {
        # Serving or starting relays, as the CRD documents and the scale subresource reports.
        "replicas": serving_now,
        "readyReplicas": len(ready),
        "desiredReplicas": decision.desired,
        "selector": selector_string(name),
        "drainingPods": len(draining_now),
        "sessions": sessions,
        "queueMessages": queue,
        "observedGeneration": generation,
        "mode": "Autoscale" if parsed.autoscaling else "Fixed",
        "recommendations": persisted_history(decision.history),
    }
    if new_replicas is not None:
        status["lastScaleTime"] = now_iso(now)
    wanted_serving = decision.desired
    if parsed.maintenance:
        ready_cond = ("False", "Maintenance", "spec.maintenance is true: every relay drains and answers 421")
    elif len(serving_ready) >= wanted_serving:
        ready_cond = ("True", "ReplicasReady", f"{len(serving_ready)} of {wanted_serving} relays ready")
    else:
        ready_cond = ("False", "ReplicasNotReady", f"{len(serving_ready)} of {wanted_serving} relays ready")
    scaling_now = serving_now != decision.desired or not plan.empty
    overload_msg = (
        f"the load asks for {decision.recommended} relays, above the maximum {parsed.replicas.max}; "
        "relays shed new sessions with 421"
        if decision.overloaded
        else f"the load fits within the maximum of {parsed.replicas.max} relays"
    )
    if parsed.maintenance:
        drain_cond = ("True", "Maintenance", f"{len(draining_now)} relays draining for maintenance")
    elif held:
        drain_cond = ("True", "HeldByQueuedMail",
                      f"draining {', '.join(sorted(s.name for s in draining_now))}; past the drain timeout "
                      f"and kept until their queue is empty (spec.drain.onTimeout): {', '.join(held)}")
    elif draining_now:
        drain_cond = ("True", "ScaleIn", f"draining {', '.join(sorted(s.name for s in draining_now))}")
    else:
        drain_cond = ("False", "NoDrain", "no relay is draining")
    await _patch_status(
        rt,
        body,
        memory,
        status,
        [
            (conditions.READY, *ready_cond),
            (
                conditions.SCALING,
                conditions.status_of(scaling_now),
                decision.reason,
                decision.message or decision.reason,
            ),
            (
                conditions.OVERLOADED,
                conditions.status_of(decision.overloaded),
                "DemandAboveMaximum" if decision.overloaded else "WithinCapacity",
                overload_msg,
            ),
            (conditions.DRAINING, *drain_cond),
        ],
        now,
    )

    metrics.DESIRED_REPLICAS.labels(namespace, name).set(decision.desired)
    metrics.READY_REPLICAS.labels(namespace, name).set(len(ready))
    metrics.DRAINING_PODS.labels(namespace, name).set(len(draining_now))
    metrics.OVERLOADED.labels(namespace, name).set(1 if decision.overloaded else 0)
    metrics.LAST_RECONCILE.labels(namespace, name).set(now)
    return TickReport(decision, plan, new_replicas)


async def _announce_held(rt: Runtime, body: Mapping[str, Any], memory: Memory, held: Sequence[str],
                         states: Mapping[str, drain.PodState], timeout_seconds: int) -> None:
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


HISTORY_GRID_SECONDS = 30.0


def persisted_history(history: Sequence[policy.Recommendation]) -> list[JSON]:
    """The stabilization window as kept in status.recommendations, compact and slow-changing.

    Only the latest time of each recommended count matters to the window's min/max, so one entry per
    count is kept, its time rounded up to a 30 s grid: the status changes about twice a minute in a
    steady state instead of every tick, and a restarted operator holds a scale-down at most 30 s longer
    (never shorter). `_load_history` caps the times at the present, so no entry blocks a scale-up.
    """
    latest: dict[int, float] = {}
    for rec in history:
        latest[rec.replicas] = max(latest.get(rec.replicas, rec.at), rec.at)
    grid = HISTORY_GRID_SECONDS
    return [
        {"at": -(-at // grid) * grid, "replicas": replicas}
        for replicas, at in sorted(latest.items(), key=lambda item: (item[1], item[0]))
    ]


def _load_history(body: Mapping[str, Any], now: float) -> tuple[policy.Recommendation, ...]:
    raw = (body.get("status") or {}).get("recommendations") or []
    history: list[policy.Recommendation] = []
    for item in raw:
        try:
            at = min(float(item["at"]), now)
            history.append(policy.Recommendation(at=at, replicas=int(item["replicas"])))
        except (KeyError, TypeError, ValueError):
            continue
    return tuple(sorted(history, key=lambda rec: rec.at))


async def _patch_status(
    rt: Runtime, body: Mapping[str, Any], memory: Memory, status: JSON,
    conds: Sequence[tuple[str, str, str, str]], now: float,
) -> None:
    namespace, name = _meta(body)
    existing: list[kubetypes.Condition] = list((body.get("status") or {}).get("conditions") or [])
    generation = body.get("metadata", {}).get("generation")
    for type_, status_, reason, message in conds:
        existing = conditions.set_condition(
            existing,
            type_,
            cast(conditions.Status, status_),
            reason,
            message,
            now_iso(now),
            observed_generation=generation,
        )
    status = {**status, "conditions": existing}
    due = conditions.patch_due(body.get("status") or {}, status, now=now, last_patch=memory.last_status_patch,
                               refresh_seconds=rt.config.status_refresh_seconds)
    if not due:
        return
    with contextlib.suppress(kube.NotFound):  # deleted meanwhile
        await rt.kube.patch(kube.MAILRELAYS, namespace, name, {"status": status}, subresource="status")
    memory.last_status_patch = now


def _endpoint(pod: kubetypes.Pod | None, token: str | None) -> relayclient.Endpoint | None:
    return relayclient.endpoint(pod, token) if pod is not None else None


async def apply_plan(
    rt: Runtime,
    body: Mapping[str, Any],
    plan: drain.Plan,
    pods: Mapping[str, kubetypes.Pod],
    states: Sequence[drain.PodState],
    dep_replicas: int,
    now: float,
    *,
    token: str | None,
) -> int | None:
    """Apply a drain Plan in the order `drain` documents. Returns the new Deployment replicas, if set."""
    namespace, name = _meta(body)
    by_state = {s.name: s for s in states}

    # 1. start drains: record on the pod first (restart-safe), then tell the relay.
    started: list[str] = []
    for pod_name in plan.start_drain:
        try:
            await rt.kube.patch(
                kube.PODS, namespace, pod_name, {"metadata": {"annotations": drain.drain_annotations(now)}}
            )
        except kube.NotFound:
            continue
        started.append(pod_name)
    to_drain = [
        ep for ep in (_endpoint(pods.get(p), token) for p in (*started, *plan.redrain)) if ep is not None
    ]
    if to_drain:
        await rt.relays.call_many("drain", to_drain)
    for pod_name in started:
        await rt.kube.post_event(
            body,
            reason="DrainStarted",
            message=f"draining relay {pod_name}: new sessions get 421, the queue flushes",
        )

    # 2. resume: tell the relay first, then clear the record.
    if plan.resume:
        eps = [ep for ep in (_endpoint(pods.get(p), token) for p in plan.resume) if ep is not None]
        results = await rt.relays.call_many("resume", eps)
        for pod_name in plan.resume:
            if pod_name in results and results[pod_name] is None:
                continue  # the relay did not answer: keep the drain record, retry next tick
            try:
                await rt.kube.patch(
                    kube.PODS, namespace, pod_name, {"metadata": {"annotations": drain.resume_annotations()}}
                )
            except kube.NotFound:
                continue
            started_at = by_state[pod_name].drain_started if pod_name in by_state else None
            if started_at is not None:
                metrics.DRAIN_DURATION.labels(metrics.OUTCOME_CANCELLED).observe(max(0.0, now - started_at))
            await rt.kube.post_event(
                body, reason="DrainCancelled", message=f"demand rose: relay {pod_name} resumed service"
            )

    # 3. relays whose drain is over become the cheapest pods (below those still draining); 4. lower the
    # Deployment's count, so the ReplicaSet removes them (NotReady and cheapest) and never starts a
    # replacement that could take sessions; 5. delete them ourselves too: a no-op when the ReplicaSet was
    # first, and when it removed a pod that never served instead, the count stays right.
    can_lower = True
    for pod_name, _ in plan.completed:
        try:
            await rt.kube.patch(
                kube.PODS, namespace, pod_name, {"metadata": {"annotations": drain.finished_annotations()}}
            )
        except kube.NotFound:
            continue
        except kube.ApiError as exc:
            can_lower = False
            logger.warning("%s/%s: cannot mark drained pod %s: %s", namespace, name, pod_name, exc)

    events: list[tuple[str, str, str]] = []
    scale_events: list[tuple[str, str, str]] = []  # posted after the drain Events, in the order they happen
    new: int | None = None
    if plan.deployment_replicas is not None:
        if not can_lower:
            return None  # nothing removed this tick; the next tick retries the whole step
        new = plan.deployment_replicas
        await rt.kube.patch(kube.DEPLOYMENTS, namespace, name, {"spec": {"replicas": new}})
        direction = "up" if new > dep_replicas else "down"
        metrics.SCALE_EVENTS.labels(namespace, name, direction).inc()
        scale_events.append(
            (
                "ScaledUp" if direction == "up" else "ScaledDown",
                f"Deployment {name} replicas {dep_replicas} -> {new}",
                "Normal",
            )
        )

    for pod_name, result in plan.completed:
        try:
            await rt.kube.delete(kube.PODS, namespace, pod_name)
        except kube.ApiError as exc:
            logger.warning("%s/%s: cannot delete drained pod %s: %s", namespace, name, pod_name, exc)
            continue
        started_at = by_state[pod_name].drain_started if pod_name in by_state else None
        if started_at is not None:
            metrics.DRAIN_DURATION.labels(result).observe(max(0.0, now - started_at))
        if result == drain.OUTCOME_DRAINED:
            events.append(
                (
                    "DrainCompleted",
                    f"relay {pod_name} drained: no session, empty queue; removing it",
                    "Normal",
                )
            )
        else:
            events.append(
                (
                    "DrainTimedOut",
                    f"relay {pod_name} did not drain within the timeout; removing it",
                    "Warning",
                )
            )
    for pod_name in plan.delete_pods:
        try:
            await rt.kube.delete(kube.PODS, namespace, pod_name)
        except kube.ApiError as exc:
            logger.warning("%s/%s: cannot delete pod %s: %s", namespace, name, pod_name, exc)

    for reason, message, type_ in [*events, *scale_events]:
        await rt.kube.post_event(body, reason=reason, message=message, type_=type_)
    return new


# ---------------------------------------------------------------------------------------------------
# Deletion
# ---------------------------------------------------------------------------------------------------


async def drain_all(
    rt: Runtime, body: Mapping[str, Any], memory: Memory, *, poll: float = 1.0, bound: float | None = None
) -> bool:
    """For the finalizer: drain every relay and wait (bounded) until all are drained. True if all were."""
    namespace, name = _meta(body)
    try:
        timeout = float(spec.parse(body.get("spec") or {}).drain_timeout_seconds)
    except spec.SpecError:
        timeout = float(spec.DEFAULT_DRAIN_TIMEOUT_SECONDS)
    if bound is not None:
        timeout = min(timeout, bound)
    start = time.time()
    announced = False
    while True:
        now = time.time()
        pods, statuses, _ = await _observe(rt, namespace, name, memory)
        states = [drain.pod_state(p, statuses.get(p["metadata"]["name"])) for p in pods]
        by_name = {p["metadata"]["name"]: p for p in pods}
        fresh = [s.name for s in states if not s.draining and not s.deleting and s.phase == "Running"]
        for pod_name in fresh:
            try:
                await rt.kube.patch(
                    kube.PODS,
                    namespace,
                    pod_name,
                    {"metadata": {"annotations": drain.drain_annotations(now)}},
                )
            except kube.NotFound:
                continue
        redrain = [s.name for s in states if s.relay_draining is False and not s.deleting]
        eps = [ep for ep in (_endpoint(by_name.get(p), memory.token) for p in {*fresh, *redrain}) if ep]
        if eps:
            await rt.relays.call_many("drain", eps)
        if not announced:
            announced = True
            await rt.kube.post_event(
                body,
                reason="Draining",
                message=f"MailRelay deleted: draining {len(states)} relays before removal",
            )
        running = [s for s in states if not s.deleting and s.phase == "Running"]
        if not fresh and all(s.drained is True for s in running):
            for s in running:
                if s.drain_started is not None:
                    metrics.DRAIN_DURATION.labels(drain.OUTCOME_DRAINED).observe(
                        max(0.0, now - s.drain_started)
                    )
            await rt.kube.post_event(body, reason="DrainCompleted", message="every relay drained; removing")
            metrics.forget(namespace, name)
            return True
        if time.time() - start >= timeout:
            await rt.kube.post_event(
                body,
                reason="DrainTimedOut",
                type_="Warning",
                message=f"relays still held mail after {timeout:.0f}s; removing anyway",
            )
            metrics.forget(namespace, name)
            return False
        await asyncio.sleep(poll)
