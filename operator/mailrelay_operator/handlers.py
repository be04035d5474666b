"""Kopf handlers of the MailRelay resource, registered on an explicit registry (so tests can run several
operators, or restart one, in one process).

- a daemon per MailRelay: the scaling loop, one `scaling.tick` every `spec.scaling.intervalSeconds`; the
  tick also ensures the owned objects (at its first run, after a spec change, every `--resync-seconds`),
  so they have one writer;
- delete (through Kopf's finalizer): one `finalizer.step` per call, until every relay drained or the
  drain timeout passed since the first call; `finalizer.Pending` makes Kopf call again.

Handlers stay thin: call the step, count errors, log. They must not make API calls of their own (that is
`kube`) nor decisions (that is `policy`, `drain` and `status`).
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any

import kopf

from mailrelay_operator import finalizer, kube, metrics, runtime, scaling, spec

GROUP, VERSION, PLURAL = kube.MAILRELAYS.group, kube.MAILRELAYS.version, kube.MAILRELAYS.plural
FINALIZER = "mailrelay.dev/finalizer"
ANNOTATION_PREFIX = "mailrelay.dev"


def _memory(memo: Any) -> runtime.Memory:
    """The per-MailRelay memory kept in Kopf's per-object memo."""
    mem = getattr(memo, "mailrelay", None)
    if not isinstance(mem, runtime.Memory):
        mem = runtime.Memory()
        memo.mailrelay = mem
    return mem


class QuietPending(logging.Filter):
    """Kopf logs every TemporaryError at error level, and posts it as an Event: a finalizer that waits
    for relays to drain is not failing, so its `finalizer.Pending` rounds are left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith(f"failed temporarily: {finalizer.PENDING}")


def configure(settings: kopf.OperatorSettings) -> None:
    """Kopf settings: our finalizer name, state in our own annotations, quiet event posting."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=ANNOTATION_PREFIX)
    settings.posting.level = logging.WARNING
    settings.networking.request_timeout = 30
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.reconnect_backoff = 0.5
    settings.queueing.error_delays = [1, 2, 5, 10, 30]
    objects = logging.getLogger("kopf.objects")
    if not any(isinstance(f, QuietPending) for f in objects.filters):
        objects.addFilter(QuietPending())


def register(registry: kopf.OperatorRegistry, rt: runtime.Runtime) -> None:
    """Register every handler of the operator on `registry`, bound to the shared runtime `rt`."""

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)

    @kopf.on.login(registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        return await rt.kube.kopf_connection()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await rt.relays.close()

    # On deletion or operator exit Kopf sets `stopped`: the daemon returns at once between ticks (it waits
    # on the flag), and a tick still running after `cancellation_backoff` is cancelled by Kopf (each step
    # is restart-safe).
    @kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, id="scaling", cancellation_backoff=1.0,
                 cancellation_timeout=10.0, initial_delay=0.5)
    async def scaling_loop(body: kopf.Body, memo: Any, stopped: kopf.DaemonStopped, logger: Any,
                           **_: Any) -> None:
        memory = _memory(memo)
        while not stopped:
            if body.get("metadata", {}).get("deletionTimestamp"):
                return  # the finalizer takes over
            try:
                await scaling.tick(rt, body, memory)
            except (TimeoutError, kube.ApiError, OSError) as exc:
                metrics.RECONCILE_ERRORS.labels(metrics.HANDLER_SCALING).inc()
                logger.warning("scaling tick failed: %s", exc)
            except Exception:
                metrics.RECONCILE_ERRORS.labels(metrics.HANDLER_SCALING).inc()
                logger.exception("scaling tick crashed")
            try:
                interval = spec.parse(body.get("spec") or {}).scaling.interval_seconds
            except spec.SpecError:
                interval = spec.DEFAULT_INTERVAL_SECONDS
            await stopped.wait(interval)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    async def deleted(body: kopf.Body, memo: Any, logger: Any, retry: int, runtime: datetime.timedelta,
                      **_: Any) -> None:
        try:
            drained = await finalizer.step(rt, body, _memory(memo), elapsed=runtime.total_seconds(),
                                           first=retry == 0, now=time.time())
        except kube.ApiError as exc:
            metrics.RECONCILE_ERRORS.labels(metrics.HANDLER_DELETE).inc()
            raise kopf.TemporaryError(str(exc), delay=2) from exc
        logger.info("relays %s before deletion", "drained" if drained else "timed out draining")
