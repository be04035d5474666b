"""Drain-first scale-in (docs/operator.md §4): which relays to drain, when a drain is over, what to resume.

All drain state lives on the pods, as the annotations of docs/contracts.md, so `plan` is a function of
what the cluster shows (Deployment replicas, pods with their annotations, relay /status) and of the
desired count: an operator that restarts mid-drain rebuilds the same plan from the pods alone.

The shell applies a Plan in this order: annotate `start_drain` pods (`drain_annotations`), POST /drain
to them and to `redrain`; POST /resume to `resume` and clear their annotations (`resume_annotations`);
mark the `completed` pods as the cheapest to delete (`finished_annotations`, below the draining ones);
set the Deployment's replicas to `deployment_replicas` (only when every mark succeeded), so that the
ReplicaSet removes those NotReady, cheapest pods and never starts a replacement in between; then delete
the `completed` and `delete_pods` pods as well (404 counts as done), which is a no-op when the
ReplicaSet was first and keeps the count right when it removed a never-serving pod instead.

With a persistent spool the relays are a StatefulSet, which always removes its highest ordinals:
`plan_ordinals` drains exactly those and lowers the replicas only past ordinals whose drain is over. It
never asks the shell to delete a pod (`Plan.operator_deletes` is False): the StatefulSet controller does
that when the replicas drop, and removes the claim after the pod (whenScaled: Delete).

Pure: no I/O, no clock reads (time is `now`, in seconds since the epoch), no asyncio.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from mailrelay_operator import kubetypes

DRAIN_STARTED_ANNOTATION = "mailrelay.dev/drain-started"
DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
DRAINING_DELETION_COST = "-1000"
# A relay whose drain is over: cheaper still than one that is draining, so that when the operator lowers
# the Deployment's replicas the ReplicaSet removes the finished relay and never one still draining.
FINISHED_DELETION_COST = "-2000"

OUTCOME_DRAINED = "drained"
OUTCOME_TIMEOUT = "timeout"


@dataclass(frozen=True)
class PodState:
    name: str
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    ready: bool
    created_at: float
    deleting: bool  # metadata.deletionTimestamp is set
    drain_started: float | None  # from the drain-started annotation; None = not draining
    sessions: int | None  # from /status; None when the scrape failed
    queue_messages: int | None
    drained: bool | None  # /status "drained"; None when the scrape failed
    relay_draining: bool | None = None  # /status "draining"; None when the scrape failed

    @property
    def draining(self) -> bool:
        return self.drain_started is not None


@dataclass(frozen=True)
class Plan:
    start_drain: tuple[str, ...]  # annotate (drain_annotations) + POST /drain
    resume: tuple[str, ...]  # POST /resume + clear the annotations (resume_annotations)
    completed: tuple[tuple[str, str], ...]  # (pod, "drained" | "timeout"): delete these pods
    deployment_replicas: int | None  # new Deployment .spec.replicas after the deletions; None = keep
    delete_pods: tuple[str, ...]  # pods that never served (not Running yet): delete without a drain
    redrain: tuple[str, ...] = ()  # annotated pods whose relay is not draining (it restarted): POST /drain
    held: tuple[str, ...] = ()  # draining past the timeout, kept because mail is queued (report only)
    # True (a Deployment): the shell deletes `completed` and `delete_pods` itself. False (a StatefulSet,
    # `plan_ordinals`): it deletes nothing; lowering the replicas to `deployment_replicas` (the workload's
    # replicas) removes the `completed` pods, which are exactly the ordinals above the new count.
    operator_deletes: bool = True

    @property
    def empty(self) -> bool:
        return not (
            self.start_drain
            or self.resume
            or self.completed
            or self.delete_pods
            or self.redrain
            or self.deployment_replicas is not None
        )


# ---------------------------------------------------------------------------------------------------
# Times and annotations
# ---------------------------------------------------------------------------------------------------


def format_time(ts: float) -> str:
    """RFC 3339 in UTC with microseconds, e.g. 2026-01-02T03:04:05.678901Z."""
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str) -> float:
    """Parse an RFC 3339 time (with or without fractional seconds, Z or an offset). ValueError if bad."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    parsed = dt.datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError(f"time without a zone: {value!r}")
    return parsed.timestamp()


def drain_annotations(now: float) -> dict[str, str]:
    """The annotations that mark a pod as draining since `now` (merge-patch them onto the pod)."""
    return {DRAIN_STARTED_ANNOTATION: format_time(now), DELETION_COST_ANNOTATION: DRAINING_DELETION_COST}


def finished_annotations() -> dict[str, str]:
    """A merge patch of metadata.annotations for a relay whose drain is over (see FINISHED_DELETION_COST)."""
    return {DELETION_COST_ANNOTATION: FINISHED_DELETION_COST}


def resume_annotations() -> dict[str, None]:
    """A merge patch of metadata.annotations that clears the drain state."""
    return {DRAIN_STARTED_ANNOTATION: None, DELETION_COST_ANNOTATION: None}


def pod_state(pod: kubetypes.Pod, status: kubetypes.RelayStatus | None) -> PodState:
    """Build a PodState from the pod JSON and its relay's /status (None when the scrape failed).

    An unreadable drain-started annotation counts as a drain that started at the epoch, so it times out
    at once instead of being forgotten.
    """
    meta = pod.get("metadata", {})
    pod_status = pod.get("status", {})
    annotations = meta.get("annotations") or {}
    drain_started: float | None = None
    raw_started = annotations.get(DRAIN_STARTED_ANNOTATION)
    if raw_started is not None:
        try:
            drain_started = parse_time(raw_started)
        except ValueError:
            drain_started = 0.0
    created_at = 0.0
    if meta.get("creationTimestamp"):
        try:
            created_at = parse_time(meta["creationTimestamp"])
        except ValueError:
            created_at = 0.0
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in pod_status.get("conditions") or []
    )
    sessions: int | None = None
    queue: int | None = None
    drained: bool | None = None
    relay_draining: bool | None = None
    if status is not None:
        sessions = _count(status.get("sessions"))
        queue = _count((status.get("queue") or {}).get("messages"))
        drained_raw = status.get("drained")
        drained = drained_raw if isinstance(drained_raw, bool) else None
        draining_raw = status.get("draining")
        relay_draining = draining_raw if isinstance(draining_raw, bool) else None
    return PodState(
        name=meta.get("name", ""),
        phase=pod_status.get("phase") or "Pending",
        ready=ready,
        created_at=created_at,
        deleting=bool(meta.get("deletionTimestamp")),
        drain_started=drain_started,
        sessions=sessions,
        queue_messages=queue,
        drained=drained,
        relay_draining=relay_draining,
    )


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def pod_annotations(state: PodState) -> Mapping[str, str]:
    """The drain annotations a pod in `state` carries (the inverse of the parsing in `pod_state`)."""
    if state.drain_started is None:
        return {}
    return drain_annotations(state.drain_started)


# ---------------------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------------------


def outcome(pod: PodState, now: float, drain_timeout: float, keep_queued: bool = False) -> str | None:
    """ "drained" when the relay reports drained, "timeout" once the timeout passed, else None.

    With `keep_queued` (spec.drain.onTimeout KeepWhileQueued), a relay past the timeout whose queue is
    not known to be empty is held instead: its spool is an emptyDir, and removing the pod would lose mail
    already answered 250. It completes when the queue empties (as "timeout" if sessions are still open),
    or as "drained"."""
    if pod.drain_started is None:
        return None
    if pod.drained is True:
        return OUTCOME_DRAINED
    if now - pod.drain_started >= drain_timeout:
        if keep_queued and pod.queue_messages != 0:
            return None
        return OUTCOME_TIMEOUT
    return None


def _held(pod: PodState, now: float, drain_timeout: float, keep_queued: bool) -> bool:
    """Past the timeout, and not completed by `outcome` because mail is (or may be) queued."""
    return (keep_queued and pod.drain_started is not None and pod.drained is not True
            and now - pod.drain_started >= drain_timeout and pod.queue_messages != 0)


def _victim_key(pod: PodState) -> tuple[bool, bool, float, float, float, str]:
    return (
        pod.phase == "Running",
        pod.ready,
        math.inf if pod.sessions is None else float(pod.sessions),
        math.inf if pod.queue_messages is None else float(pod.queue_messages),
        -pod.created_at,
        pod.name,
    )


def choose_victims(pods: Sequence[PodState], count: int) -> tuple[str, ...]:
    """Up to `count` pods to remove: pending/not running first, then not ready, then the fewest
    sessions, then the shortest queue (unknown load last), then the youngest. Pods that are already
    draining or being deleted are never chosen."""
    if count <= 0:
        return ()
    candidates = [p for p in pods if not p.deleting and not p.draining]
    return tuple(p.name for p in sorted(candidates, key=_victim_key)[:count])


TERMINAL_PHASES = ("Succeeded", "Failed")


def _replica_pods(pods: Sequence[PodState]) -> list[PodState]:
    """The pods the ReplicaSet counts as replicas: not being deleted and not terminated. An evicted
    (Failed) pod has already been replaced; counting it would make a lowered replica count remove a
    relay the plan did not choose. Such pods are left to the pod garbage collector."""
    return [p for p in pods if not p.deleting and p.phase not in TERMINAL_PHASES]


def serving_replicas(deployment_replicas: int, pods: Sequence[PodState], maintenance: bool) -> int:
    """The `current` to give policy.decide: the Deployment's replicas minus the relays being drained.

    In maintenance, and right after it (every relay still carries a drain annotation, so nothing would
    be serving), it is the Deployment's replicas: maintenance drains are not scale-in, and the pool
    must come back at its size instead of shrinking to the minimum before the load is measured again.
    """
    if deployment_replicas < 0:
        raise ValueError("replica counts must not be negative")
    draining = sum(1 for p in _replica_pods(pods) if p.draining)
    serving = deployment_replicas - draining
    if maintenance or serving <= 0:
        return deployment_replicas
    return serving


@dataclass(frozen=True)
class Deletion:
    """One step of the finalizer's drain of a deleted MailRelay."""

    start_drain: tuple[str, ...]  # running relays not marked yet: annotate, then POST /drain
    drain: tuple[str, ...]  # every relay to POST /drain to: those above, and marked ones whose relay is not
    # draining (it restarted)
    done: bool  # every running relay is marked and reports drained: release the finalizer


def deletion_step(pods: Sequence[PodState]) -> Deletion:
    """What the finalizer does next for a MailRelay being deleted: every relay drains, none is removed
    here (garbage collection removes the Deployment once the finalizer is released)."""
    live = [p for p in pods if not p.deleting]
    running = [p for p in live if p.phase == "Running"]
    fresh = tuple(p.name for p in running if not p.draining)
    again = tuple(p.name for p in live if p.relay_draining is False and p.name not in fresh)
    return Deletion(start_drain=fresh, drain=fresh + again,
                    done=not fresh and all(p.drained is True for p in running))


def all_finished(pods: Sequence[PodState], now: float, drain_timeout: float) -> bool:
    """For the finalizer: every live running pod is draining and its drain is over (drained or timed out)."""
    for pod in pods:
        if pod.deleting or pod.phase != "Running":
            continue
        if outcome(pod, now, drain_timeout) is None:
            return False
    return True


def _maintenance(running: Sequence[PodState], redrain: tuple[str, ...], operator_deletes: bool) -> Plan:
    """Maintenance: every running relay drains and stays, drained; nothing completes or is removed."""
    return Plan(start_drain=choose_victims(running, len(running)), resume=(), completed=(),
                deployment_replicas=None, delete_pods=(), redrain=redrain, operator_deletes=operator_deletes)


def plan(
    desired: int,
    deployment_replicas: int,
    pods: Sequence[PodState],
    now: float,
    drain_timeout: float,
    maintenance: bool,
    keep_queued: bool = False,
) -> Plan:
    """The next drain step.

    `desired`: serving relays wanted (policy.Decision.desired). `deployment_replicas`: the Deployment's
    .spec.replicas now, which counts the pods being drained. `pods`: every pod of the MailRelay; pods
    being deleted and terminated (evicted) pods are not replicas and are ignored.
    The Deployment's replicas are only ever lowered by the pods this plan deletes (drained, timed out,
    or never served); draining pods keep counting until they are gone.
    With `maintenance`, every running relay drains and stays, drained, until maintenance ends.
    With `keep_queued`, a drain past its timeout completes only once its relay's queue is empty; until then
    it is listed in `held` (in maintenance no drain completes, so none is held).
    """
    if desired < 0 or deployment_replicas < 0:
        raise ValueError("replica counts must not be negative")
    live = _replica_pods(pods)
    draining = sorted(
        (p for p in live if p.draining),
        key=lambda p: (-(p.drain_started or 0.0), p.name),
    )
    redrain = tuple(p.name for p in draining if p.relay_draining is False)

    if maintenance:
        return _maintenance([p for p in live if not p.draining and p.phase == "Running"], redrain, True)

    replicas = deployment_replicas
    serving = replicas - len(draining)
    resume: tuple[str, ...] = ()
    resumable = [p for p in draining if p.phase == "Running"]
    if desired > serving and resumable:
        # Demand rose mid-drain: put the most recently drained relays back into service first.
        resume = tuple(p.name for p in resumable[: desired - serving])
        draining = [p for p in draining if p.name not in resume]
        serving = replicas - len(draining)
    redrain = tuple(name for name in redrain if name not in resume)

    completed: list[tuple[str, str]] = []
    for pod in draining:
        result = outcome(pod, now, drain_timeout, keep_queued)
        # Only a pod that is not Ready completes. Lowering the replicas leaves the choice to the
        # ReplicaSet, which removes a not-ready pod before a ready one whatever its deletion cost: a
        # finished drain whose relay restarted (ready again, redrained below) would let it pick another
        # draining relay that still holds mail. It completes once the redrain has made it not ready.
        if result is not None and not pod.ready:
            completed.append((pod.name, result))
    held = tuple(sorted(p.name for p in draining if _held(p, now, drain_timeout, keep_queued)))

    start: tuple[str, ...] = ()
    delete: tuple[str, ...] = ()
    freed = 0
    excess = serving - desired
    if excess > 0:
        not_created = max(0, replicas - len(live))
        from_replicas = min(excess, not_created)
        inactive = [p for p in live if not p.draining and p.phase != "Running"]
        delete = choose_victims(inactive, excess - from_replicas)
        freed = from_replicas + len(delete)
        running = [p for p in live if not p.draining and p.phase == "Running"]
        start = choose_victims(running, excess - freed)
        new_replicas = replicas - len(completed) - freed
    else:
        new_replicas = replicas - len(completed) + (desired - serving)
    return Plan(
        start_drain=start,
        resume=resume,
        completed=tuple(completed),
        deployment_replicas=None if new_replicas == deployment_replicas else new_replicas,
        delete_pods=delete,
        redrain=tuple(name for name in redrain if name not in {n for n, _ in completed}),
        held=held,
    )


# ---------------------------------------------------------------------------------------------------
# A StatefulSet (spec.spool.persistent): the highest ordinals go
# ---------------------------------------------------------------------------------------------------


def ordinal(set_name: str, pod_name: str) -> int | None:
    """The ordinal of pod `<set_name>-<n>` of StatefulSet `set_name`; None for any other name."""
    prefix = f"{set_name}-"
    if not pod_name.startswith(prefix):
        return None
    rest = pod_name[len(prefix):]
    if not rest.isascii() or not rest.isdigit() or (len(rest) > 1 and rest.startswith("0")):
        return None
    return int(rest)


def set_members(set_name: str, set_replicas: int, pods: Sequence[PodState]) -> list[PodState]:
    """The pods of StatefulSet `set_name` at ordinals below its replicas (the others are being removed)."""
    return [p for p in pods if (n := ordinal(set_name, p.name)) is not None and n < set_replicas]


def claimed_ordinals(claim_prefix: str, claims: Sequence[kubetypes.PersistentVolumeClaim]) -> frozenset[int]:
    """The ordinals whose spool claim (`<claim_prefix>-<n>`, e.g. spool-outbound-2) may hold mail: it
    exists and is not Pending (a claim never bound to a volume was never written). For `plan_ordinals`."""
    found: set[int] = set()
    for claim in claims:
        n = ordinal(claim_prefix, (claim.get("metadata") or {}).get("name", ""))
        if n is not None and (claim.get("status") or {}).get("phase") != "Pending":
            found.add(n)
    return frozenset(found)


def orphaned_claims(
    set_name: str,
    claim_prefix: str,
    set_replicas: int,
    claims: Sequence[kubetypes.PersistentVolumeClaim],
    pod_names: Collection[str],
) -> tuple[tuple[int, str], ...]:
    """The spool claims left outside the StatefulSet that may still hold mail, as (ordinal, claim name),
    lowest ordinal first: a bound claim `<claim_prefix>-<n>` with n at or above `set_replicas`, no pod
    `<set_name>-<n>` (in any state), not being deleted, and not owned by a Pod.

    The StatefulSet controller never leaves such a claim behind on its own: when it removes an ordinal
    (whenScaled: Delete) it first makes the claim owned by the ordinal's pod, so the garbage collector
    deletes the claim after the pod. What is left are the claims of a deleted MailRelay (whenDeleted:
    Retain) found by its successor, claims left by a StatefulSet scaled by hand on a cluster that
    ignores the retention policy, or claims made by hand. The operator cannot read a volume, so a claim
    that is bound counts as holding mail.
    """
    found: list[tuple[int, str]] = []
    for claim in claims:
        meta = claim.get("metadata") or {}
        name = meta.get("name", "")
        n = ordinal(claim_prefix, name)
        if n is None or n < set_replicas or f"{set_name}-{n}" in pod_names:
            continue
        if (claim.get("status") or {}).get("phase") != "Bound" or meta.get("deletionTimestamp"):
            continue
        if any(ref.get("kind") == "Pod" for ref in meta.get("ownerReferences") or ()):
            continue  # condemned by the controller: the garbage collector removes it after its pod
        found.append((n, name))
    return tuple(sorted(found))


def recovers_orphans(stateful_set: kubetypes.StatefulSet) -> bool:
    """Whether bringing an orphaned claim's ordinal back ends by itself: only where the stored
    StatefulSet keeps `whenScaled: Delete` (a cluster that ignores the retention policy drops the field),
    so that the ordinal's claim goes once its drain is over. Elsewhere the claim would be left again
    after each drain and brought back again, forever."""
    policy = (stateful_set.get("spec") or {}).get("persistentVolumeClaimRetentionPolicy") or {}
    return policy.get("whenScaled") == "Delete"


def plan_ordinals(
    set_name: str,
    desired: int,
    set_replicas: int,
    pods: Sequence[PodState],
    now: float,
    drain_timeout: float,
    maintenance: bool,
    keep_queued: bool = False,
    claimed: Collection[int] | None = None,
    orphans: Collection[int] = (),
) -> Plan:
    """The next drain step for relays run by StatefulSet `set_name` with `.spec.replicas` `set_replicas`.

    The ordinals below `desired` serve: a draining one among them is resumed (demand rose). Every
    running ordinal from `desired` up is drained, highest first. The replicas are then lowered past
    the highest ordinals that are removable, and no further: an ordinal is removable when its relay's
    drain is over (as `outcome` decides, with `keep_queued`, and the relay not ready, as in `plan`), or
    when no relay runs there and its spool claim is known to hold nothing (`claimed`: the ordinals whose
    claim exists and is bound; None: unknown, so none is). A held drain therefore keeps its ordinal and
    its claim, and so does every ordinal below it that is still above `desired` (the StatefulSet cannot
    remove a middle ordinal). A pod that is not running (a replacement after a lost node, still Pending)
    or is being deleted may sit on a claim full of mail, so its ordinal waits too.
    Pods at ordinals at or above `set_replicas` are already being removed by the controller: ignored.
    `orphans`: ordinals beyond the set whose claim may hold mail (`orphaned_claims`). The replicas rise
    to cover the highest, so that a relay starts on each claim and delivers what it holds; being at or
    above `desired`, those ordinals are then drained and removed as any other (their claims with them).
    With `maintenance`, every running relay drains and stays; the replicas do not change.
    """
    if desired < 0 or set_replicas < 0:
        raise ValueError("replica counts must not be negative")
    by_ordinal: dict[int, PodState] = {}
    for pod in _replica_pods(pods):
        n = ordinal(set_name, pod.name)
        if n is not None and n < set_replicas:
            by_ordinal[n] = pod
    live = [by_ordinal[n] for n in sorted(by_ordinal)]
    draining = [p for p in live if p.draining]
    redrain = tuple(p.name for p in draining if p.relay_draining is False)
    running = [p for p in live if not p.draining and p.phase == "Running"]

    if maintenance:
        return _maintenance(running, redrain, False)

    ordinal_of = {p.name: n for n, p in by_ordinal.items()}
    resume = tuple(p.name for p in draining if ordinal_of[p.name] < desired and p.phase == "Running")
    start = tuple(p.name for p in reversed(running) if ordinal_of[p.name] >= desired)
    still_draining = [p for p in draining if p.name not in resume]
    held = tuple(sorted(p.name for p in still_draining if _held(p, now, drain_timeout, keep_queued)))

    completed: list[tuple[str, str]] = []
    new_replicas = set_replicas
    if desired >= set_replicas:
        new_replicas = desired
    else:
        for n in range(set_replicas - 1, desired - 1, -1):
            relay = by_ordinal.get(n)
            if relay is None or relay.phase != "Running":
                if claimed is None or n in claimed:
                    break  # a claim that may hold mail, with no relay delivering it yet
                new_replicas = n
                continue
            result = outcome(relay, now, drain_timeout, keep_queued)
            if result is None or relay.ready:
                break
            completed.append((relay.name, result))
            new_replicas = n
    if orphans and max(orphans) + 1 > new_replicas:
        new_replicas = max(orphans) + 1  # bring them back; no ordinal goes while the set grows
        completed = []
    done = {name for name, _ in completed}
    return Plan(
        start_drain=start,
        resume=resume,
        completed=tuple(completed),
        deployment_replicas=None if new_replicas == set_replicas else new_replicas,
        delete_pods=(),
        redrain=tuple(name for name in redrain if name not in resume and name not in done),
        held=held,
        operator_deletes=False,
    )
