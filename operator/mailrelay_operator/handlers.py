"""Kopf handlers of the MailRelay resource, registered on an explicit registry (so tests can run several
operators, or restart one, in one process).

- create / update / resume: ensure the owned objects (`reconcile.ensure_owned`);
- a daemon per MailRelay: the scaling loop, one `reconcile.tick` every `spec.scaling.intervalSeconds`;
- delete (through Kopf's finalizer): `reconcile.drain_all`, bounded by the drain timeout.

Handlers stay thin: parse, call `reconcile`, count errors. They must not make API calls of their own
(that is `kube`) nor decisions (that is `policy` and `drain`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any

import kopf

from mailrelay_operator import kube, metrics, reconcile, spec

GROUP, VERSION, PLURAL = kube.MAILRELAYS.group, kube.MAILRELAYS.version, kube.MAILRELAYS.plural
FINALIZER = "mailrelay.dev/finalizer"
ANNOTATION_PREFIX = "mailrelay.dev"


def _memory(memo: Any) -> reconcile.Memory:
    """The per-MailRelay memory kept in Kopf's per-object memo."""
    mem = getattr(memo, "mailrelay", None)
    if not isinstance(mem, reconcile.Memory):
        mem = reconcile.Memory()
        memo.mailrelay = mem
    return mem


async def until_stopped(stopped: kopf.DaemonStopped, work: Awaitable[object]) -> bool:
    """Run `work` until it ends (True; its exception propagates) or `stopped` is set (False: `work` is
    cancelled and awaited). If the caller itself is cancelled, `work` is cancelled with it."""
    task = asyncio.ensure_future(work)
    flag = asyncio.ensure_future(_flag(stopped))
    try:
        await asyncio.wait({task, flag}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        flag.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


async def _flag(stopped: kopf.DaemonStopped) -> None:
    await stopped.wait()


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


def register(registry: kopf.OperatorRegistry, rt: reconcile.Runtime) -> None:
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

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, registry=registry, field="spec")
    async def owned(body: kopf.Body, memo: Any, logger: Any, **_: Any) -> None:
        try:
            parsed = spec.parse(body.get("spec") or {})
        except spec.SpecError as exc:
            metrics.RECONCILE_ERRORS.labels(metrics.HANDLER_OWNED).inc()
            raise kopf.PermanentError(f"invalid spec: {exc}") from exc
        memory = _memory(memo)
        try:
            actions = await reconcile.ensure_owned(rt, body, parsed, memory)
        except kube.ApiError as exc:
            metrics.RECONCILE_ERRORS.labels(metrics.HANDLER_OWNED).inc()
            raise kopf.TemporaryError(str(exc), delay=2) from exc
        memory.observed_generation = body.get("metadata", {}).get("generation")
        # Not returned: Kopf would store a handler's result in .status, which the CRD's schema prunes.
        logger.info("owned objects: %s", ", ".join(f"{kind} {action}" for kind, action in actions.items()))

    # Kopf sets `stopped` (deletion, operator exit) and waits up to `cancellation_backoff` for the daemon
    # to return on its own before it cancels it: the daemon watches the flag during a tick too, so it
    # returns at once, and an operator with hundreds of MailRelays stops promptly.
    @kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, cancellation_backoff=5.0,
                 cancellation_timeout=10.0, initial_delay=0.5)
    async def scaling(body: kopf.Body, memo: Any, stopped: kopf.DaemonStopped, logger: Any, **_: Any) -> None:
        memory = _memory(memo)
        while not stopped:
            if body.get("metadata", {}).get("deletionTimestamp"):
                return  # the finalizer takes over
            try:
                if not await until_stopped(stopped, reconcile.tick(rt, body, memory)):
                    return  # stopped mid-tick: the tick is cancelled (each step is restart-safe)
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
    async def deleted(body: kopf.Body, memo: Any, logger: Any, **_: Any) -> None:
        try:
            drained = await reconcile.drain_all(rt, body, _memory(memo), bound=rt.config.delete_wait_seconds)
        except kube.ApiError as exc:
            metrics.RECONCILE_ERRORS.labels(metrics.HANDLER_DELETE).inc()
            raise kopf.TemporaryError(str(exc), delay=2) from exc
        logger.info("relays %s before deletion", "drained" if drained else "timed out draining")
