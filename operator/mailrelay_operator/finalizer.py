"""The deletion of a MailRelay: behind Kopf's finalizer, every relay drains (and answers 421) before the
object goes; garbage collection then removes what it owned.

One call of `step` is one round: look at the relays, mark and drain those not draining yet, and say
whether the drain is over (True) or timed out (False); while it goes on, `step` raises `Pending` (a
`kopf.TemporaryError`), and Kopf calls the delete handler again after `POLL_SECONDS`. The bound counts
from Kopf's first attempt, which Kopf keeps in the object's annotations, so an operator restart does not
reset it.

What it must not do: delete pods or lower the Deployment (the relays go with the MailRelay), or decide
which relays drain (that is `drain.deletion_step`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import kopf

from mailrelay_operator import drain, kube, metrics, observation, runtime, spec

POLL_SECONDS = 1.0
PENDING = "relays still draining; checking again"


class Pending(kopf.TemporaryError):
    """Not over yet: Kopf retries the delete handler after `POLL_SECONDS` (a normal wait, not a failure:
    `handlers` keeps it out of the logs and Events)."""

    def __init__(self, delay: float = POLL_SECONDS) -> None:
        super().__init__(PENDING, delay=delay)


def bound(body: Mapping[str, Any], delete_wait_seconds: float | None) -> float:
    """How long the finalizer waits: the MailRelay's drain timeout, at most `--delete-wait-seconds`."""
    try:
        timeout = float(spec.parse(body.get("spec") or {}).drain_timeout_seconds)
    except spec.SpecError:
        timeout = float(spec.DEFAULT_DRAIN_TIMEOUT_SECONDS)
    return timeout if delete_wait_seconds is None else min(timeout, delete_wait_seconds)


async def step(rt: runtime.Runtime, body: Mapping[str, Any], memory: runtime.Memory, *, elapsed: float,
               first: bool, now: float) -> bool:
    """One round of the deletion drain, `elapsed` seconds after its first attempt (`first`: this is it).
    True: every relay drained; False: the bound passed with relays still holding mail. Raises Pending
    while neither holds."""
    namespace, name = runtime.meta(body)
    seen = await observation.observe(rt, namespace, name, memory)
    if first:
        await rt.kube.post_event(
            body, reason="Draining",
            message=f"MailRelay deleted: draining {len(seen.states)} relays before removal",
        )
    decided = drain.deletion_step(seen.states)
    for pod_name in decided.start_drain:
        with contextlib.suppress(kube.NotFound):
            await rt.kube.patch(kube.PODS, namespace, pod_name,
                                {"metadata": {"annotations": drain.drain_annotations(now)}})
    eps = seen.endpoints(decided.drain, memory.token)
    if eps:
        await rt.relays.call_many("drain", eps)
    if decided.done:
        for state in seen.states:
            if state.drain_started is not None and not state.deleting and state.phase == "Running":
                duration = max(0.0, now - state.drain_started)
                metrics.DRAIN_DURATION.labels(drain.OUTCOME_DRAINED).observe(duration)
        await rt.kube.post_event(body, reason="DrainCompleted", message="every relay drained; removing")
        metrics.forget(namespace, name)
        return True
    limit = bound(body, rt.config.delete_wait_seconds)
    if elapsed >= limit:
        await rt.kube.post_event(
            body, reason="DrainTimedOut", type_="Warning",
            message=f"relays still held mail after {limit:.0f}s; removing anyway",
        )
        metrics.forget(namespace, name)
        return False
    raise Pending(delay=min(POLL_SECONDS, limit - elapsed))
