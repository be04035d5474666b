"""Wiring and the process model: spool + delivery + SMTP server + admin API, signals and the drain.

What it is for: `run(cfg)` starts the relay and returns the exit code.

- `--workers 1`: one process (uvloop) runs everything; `Node` implements admin.Control.
- `--workers N`: a supervisor process recovers the spool once, creates the pod-wide shared counters
  (podstate: sessions, in-flight bytes, drain flag, per-worker queue figures) and forks N worker processes
  (before it starts any event loop or thread). Each worker binds the SMTP port with SO_REUSEPORT and runs
  its own spool writer (group commit), delivery queue and upstream pool for the messages it accepted plus
  its share of the recovered ones (whole files, so that the messages of one group file stay in one
  process). The supervisor runs the admin API: /status sums the shared counters,
  /drain and /resume flip the shared flag (workers see it at once at the greeting and before each command,
  and within 0.1 s for idle-session 421s and retry_now), /metrics aggregates every worker through
  prometheus_client's multiprocess mode (cli.py sets PROMETHEUS_MULTIPROC_DIR before anything imports
  prometheus_client). A worker that dies unexpectedly makes the supervisor stop the others and exit 1 (its
  queued mail is in the spool; the restart recovers it).

Drain: POST /drain (or SIGTERM) sets the flag: new connections get 421 at the greeting (the listener
stays open), a session's next command outside a transaction gets 421 4.3.2, idle sessions get an
unprompted 421 after --drain-grace, deferred deliveries are retried now, /readyz answers 503. SIGTERM
then waits until no session is open and the queue is empty, or --drain-timeout, and exits 0; whatever
is still queued stays in the spool and is logged. POST /resume ends a drain (not after SIGTERM).

What it must not do: decide SMTP replies (policy.py) or delivery retries (delivery.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import pathlib
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from mailrelay_relay import __version__, admin, config, delivery, logs, metrics, podstate, policy, smtp, spool

log = logging.getLogger("mailrelay.app")

POLL_INTERVAL = 0.1


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _upstream(cfg: config.Config, password: str | None) -> delivery.UpstreamConfig:
    tls: Any = cfg.upstream_tls
    return delivery.UpstreamConfig(
        host=cfg.upstream_host, port=cfg.upstream_port, tls=tls, user=cfg.upstream_user,
        password=password if cfg.upstream_user else None, connections=cfg.upstream_connections,
        local_hostname=cfg.hostname, cafile=str(cfg.upstream_ca_file) if cfg.upstream_ca_file else None,
    )


class Node:
    """One relay process's SMTP side (server, spool, delivery); with `serve_admin` also the admin API."""

    def __init__(self, cfg: config.Config, *, state: podstate.PodState, worker: int,
                 upstream_password: str | None, token: str | None, serve_admin: bool,
                 recovered: Callable[[spool.Spool], list[spool.QueuedMessage]],
                 reuse_port: bool, spool_usage: spool.Usage | None = None) -> None:
        self.cfg = cfg
        self.spool_usage = spool_usage
        self.state = state
        self.worker = worker
        self.password = upstream_password
        self.token = token
        self.serve_admin = serve_admin
        self.recovered = recovered
        self.reuse_port = reuse_port
        self.terminating = False
        self.stop_now = asyncio.Event()
        self.drain_requested = asyncio.Event()
        self._was_draining = False

    # -- admin.Control ----------------------------------------------------------------------------------
    def status(self) -> admin.Status:
        stats = self.delivery.stats()
        sessions = self.state.sessions
        draining = self.state.draining
        return {
            "draining": draining,
            "drained": draining and sessions == 0 and stats.messages == 0,
            "sessions": sessions,
            "max_sessions": self.cfg.max_sessions,
            "inflight_bytes": self.state.inflight,
            "queue": {"messages": stats.messages, "bytes": stats.bytes,
                      "oldest_age_seconds": round(stats.oldest_age_seconds, 3)},
            "dead_letter": {"messages": self.spool.dead_letter_count()},
            "hostname": self.cfg.hostname,
            "version": __version__,
        }

    def ready(self) -> bool:
        return not self.state.draining

    async def drain(self) -> None:
        self.state.set(podstate.DRAINING, 1)
        self._on_drain_flag()

    async def resume(self) -> None:
        if self.terminating:
            return
        self.state.set(podstate.DRAINING, 0)
        self._on_drain_flag()

    def _on_drain_flag(self) -> None:
        draining = self.state.draining
        if draining != self._was_draining:
            self._was_draining = draining
            metrics.DRAINING.set(1 if draining else 0)
            self.server.note_draining(draining, asyncio.get_running_loop().time())
            logs.event(log, "drain.start" if draining else "drain.resume")
            if draining:
                self.delivery.retry_now()

    # -- life cycle -------------------------------------------------------------------------------------
    def _on_queued(self, msg: spool.QueuedMessage) -> None:
        self.delivery.submit(msg)
        self.state.bump_worker_queue(self.worker, messages=1, nbytes=msg.size)

    def _publish_queue(self) -> None:
        stats = self.delivery.stats()
        oldest = int((time.time() - stats.oldest_age_seconds) * 1_000_000) if stats.messages else 0
        self.state.set_worker(self.worker, messages=stats.messages, nbytes=stats.bytes,
                              oldest_received_us=oldest)

    async def main(self) -> int:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        self.spool = spool.Spool(cfg.spool, max_bytes=cfg.spool_max_bytes, usage=self.spool_usage)
        sender = delivery.make_sender(_upstream(cfg, self.password))
        self.delivery = delivery.Delivery(self.spool, sender, queue_lifetime=cfg.queue_lifetime,
                                          concurrency=cfg.upstream_connections,
                                          deferral_log_interval=cfg.deferral_log_interval,
                                          hostname=cfg.hostname, notify=cfg.notify_senders,
                                          delay_warning=cfg.delay_warning_time)
        recovered = self.recovered(self.spool)
        for msg in recovered:
            self.delivery.submit(msg)
        if recovered or self.spool.held_bytes:
            logs.event(log, "spool.recovered", messages=len(recovered), spool_bytes=self.spool.held_bytes,
                       spool_max_bytes=cfg.spool_max_bytes)
        await self.delivery.start()
        metrics.MAX_SESSIONS.set(cfg.max_sessions)
        metrics.DRAINING.set(0)
        self.server = smtp.Server(cfg, self.state, self.spool, self._on_queued,
                                  upstream_lacks=self.delivery.upstream_lacks,
                                  tls_context=smtp.tls_context(cfg), worker=self.worker)
        await self.server.start(reuse_port=self.reuse_port)
        runner = None
        if self.serve_admin:
            app = admin.build_app(self, self.token)
            runner = await admin.serve(app, cfg.admin_host, cfg.admin_port)
        logs.event(log, "relay.started", smtp=f"{cfg.listen_host}:{self.server.bound_port()}",
                   admin=f"{cfg.admin_host}:{cfg.admin_port}" if self.serve_admin else None,
                   version=__version__)
        self._install_signals(loop)
        poller = loop.create_task(self._poll())
        try:
            await self.stop_now.wait()
        finally:
            poller.cancel()
            await self._shutdown(runner)
        return 0

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.serve_admin:  # single process: SIGTERM/SIGINT drain then exit
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_sigterm)
        else:  # a worker: the supervisor drains; SIGTERM means stop now
            loop.add_signal_handler(signal.SIGTERM, self.stop_now.set)
            loop.add_signal_handler(signal.SIGINT, lambda: None)

    def _on_sigterm(self) -> None:
        if self.terminating:
            logs.event(log, "relay.signal_again")
            self.stop_now.set()
            return
        self.terminating = True
        logs.event(log, "relay.sigterm", drain_timeout=self.cfg.drain_timeout)
        self.state.set(podstate.TERMINATING, 1)
        asyncio.get_running_loop().create_task(self._drain_then_stop())

    async def _drain_then_stop(self) -> None:
        await self.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.drain_timeout
        while loop.time() < deadline:
            if self.status()["drained"]:
                logs.event(log, "drain.complete")
                break
            await asyncio.sleep(POLL_INTERVAL)
        else:
            logs.event(log, "drain.timeout", level=logging.WARNING, sessions=self.state.sessions,
                       queued=self.delivery.stats().messages)
        self.stop_now.set()

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._on_drain_flag()
            self.server.kick_idle(loop.time())
            self._publish_queue()
            smtp.publish_reply_counts()
            await asyncio.sleep(POLL_INTERVAL)

    async def _shutdown(self, runner: Any) -> None:
        self.server.close_all(policy.shutting_down(self.cfg.hostname), "shutdown")
        await self.server.stop_listening()
        self.server.close_all(policy.shutting_down(self.cfg.hostname), "shutdown")
        await self.delivery.stop()
        self._publish_queue()
        smtp.publish_reply_counts()
        left = self.spool.queue_count() if self.serve_admin else self.delivery.stats().messages
        if left:
            logs.event(log, "relay.stopped_with_queue", level=logging.WARNING, queued=left,
                       spool=str(self.cfg.spool))
        else:
            logs.event(log, "relay.stopped")
        if runner is not None:
            await runner.cleanup()
        self.spool.close()


def _run_loop(coro_factory: Callable[[], Any]) -> int:
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        result: int = runner.run(coro_factory())
        return result


def run(cfg: config.Config, *, token: str | None, upstream_password: str | None) -> int:
    logs.setup(cfg.log_level)
    if cfg.workers == 1:
        state = podstate.PodState(1)
        node = Node(cfg, state=state, worker=0, upstream_password=upstream_password, token=token,
                    serve_admin=True, recovered=lambda s: s.recover(), reuse_port=False)
        try:
            return _run_loop(node.main)
        except OSError as error:
            logs.event(log, "relay.failed", level=logging.ERROR, error=str(error))
            return 1
    return Supervisor(cfg, token=token, upstream_password=upstream_password).run()


# --- workers > 1 -------------------------------------------------------------------------------------------

def _die_with_parent(parent_pid: int) -> None:
    """A worker must not outlive its supervisor (e.g. SIGKILLed by the OOM killer): it would keep serving
    SMTP on the shared port with no admin API, and a restarted relay would recover the spool files it
    still delivers. Linux: PR_SET_PDEATHSIG; then re-check, in case the parent died before the prctl."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent_pid:
        os._exit(1)


def _worker_entry(cfg: config.Config, worker: int, upstream_password: str | None, array: Any, lock: Any,
                  paths: list[str], parent_pid: int, spool_usage: spool.Usage) -> None:
    _die_with_parent(parent_pid)
    logs.setup(cfg.log_level, worker=worker)
    state = podstate.PodState(cfg.workers, array=array, lock=lock)

    def recovered(s: spool.Spool) -> list[spool.QueuedMessage]:
        messages = []
        for path in paths:
            try:
                messages.extend(s.load_file(pathlib.Path(path)))
            except FileNotFoundError:
                continue
            except (OSError, spool.CorruptRecord) as error:
                logs.event(log, "spool.unreadable", level=logging.ERROR, path=path, error=str(error))
        return messages

    node = Node(cfg, state=state, worker=worker, upstream_password=upstream_password, token=None,
                serve_admin=False, recovered=recovered, reuse_port=True, spool_usage=spool_usage)
    sys.exit(_run_loop(node.main))


class Supervisor:
    """Runs the admin API over the shared counters and keeps N workers alive (or stops them all)."""

    def __init__(self, cfg: config.Config, *, token: str | None, upstream_password: str | None) -> None:
        self.cfg = cfg
        self.token = token
        self.password = upstream_password
        self.state = podstate.PodState(cfg.workers, shared=True)
        # Made before the fork: its Usage counter is shared with (and moved by) every worker.
        self.spool = spool.Spool(cfg.spool, max_bytes=cfg.spool_max_bytes)
        self.processes: list[Any] = []
        self.terminating = False
        self.stop_now: asyncio.Event | None = None
        self.exit_code = 0

    # admin.Control
    def status(self) -> admin.Status:
        messages, nbytes, oldest_us = self.state.queue_totals()
        sessions = self.state.sessions
        draining = self.state.draining
        age = max(0.0, time.time() - oldest_us / 1_000_000) if oldest_us and messages else 0.0
        return {
            "draining": draining,
            "drained": draining and sessions == 0 and messages == 0,
            "sessions": sessions,
            "max_sessions": self.cfg.max_sessions,
            "inflight_bytes": self.state.inflight,
            "queue": {"messages": messages, "bytes": nbytes, "oldest_age_seconds": round(age, 3)},
            "dead_letter": {"messages": self.spool.dead_letter_count()},
            "hostname": self.cfg.hostname,
            "version": __version__,
        }

    def ready(self) -> bool:
        return not self.state.draining and self.state.workers_ready()

    async def drain(self) -> None:
        if not self.state.draining:
            logs.event(log, "drain.start")
        self.state.set(podstate.DRAINING, 1)
        metrics.DRAINING.set(1)

    async def resume(self) -> None:
        if self.terminating:
            return
        if self.state.draining:
            logs.event(log, "drain.resume")
        self.state.set(podstate.DRAINING, 0)
        metrics.DRAINING.set(0)

    def run(self) -> int:
        recovered = self.spool.recover()
        if recovered or self.spool.held_bytes:
            logs.event(log, "spool.recovered", messages=len(recovered), spool_bytes=self.spool.held_bytes,
                       spool_max_bytes=self.cfg.spool_max_bytes)
        # Whole files to each worker: the messages of one group file are removed by one process.
        shares: list[list[str]] = [[] for _ in range(self.cfg.workers)]
        for index, path in enumerate(sorted({str(msg.path) for msg in recovered})):
            shares[index % self.cfg.workers].append(path)
        # Fail early and clearly when the SMTP address cannot be bound (workers would each fail).
        try:
            with socket.create_server((self.cfg.listen_host, self.cfg.listen_port), reuse_port=True):
                pass
        except OSError as error:
            logs.event(log, "relay.failed", level=logging.ERROR, error=str(error))
            return 1
        ctx = multiprocessing.get_context("fork")
        array, lock = self.state.handles()
        for worker in range(self.cfg.workers):
            process = ctx.Process(target=_worker_entry, name=f"mailrelay-worker-{worker}",
                                  args=(self.cfg, worker, self.password, array, lock, shares[worker],
                                        os.getpid(), self.spool.usage))
            process.start()
            self.processes.append(process)
        try:
            return _run_loop(self._main)
        finally:
            self._stop_workers()
            directory = metrics.multiprocess_dir()
            if directory and os.environ.get("MAILRELAY_OWN_METRICS_DIR") == directory:
                shutil.rmtree(directory, ignore_errors=True)

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self.stop_now = asyncio.Event()
        metrics.MAX_SESSIONS.set(self.cfg.max_sessions)
        metrics.DRAINING.set(0)
        app = admin.build_app(self, self.token)
        try:
            runner = await admin.serve(app, self.cfg.admin_host, self.cfg.admin_port)
        except OSError as error:
            logs.event(log, "relay.failed", level=logging.ERROR, error=str(error))
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_sigterm)
        logs.event(log, "supervisor.started", workers=self.cfg.workers,
                   admin=f"{self.cfg.admin_host}:{self.cfg.admin_port}")
        watcher = loop.create_task(self._watch())
        try:
            await self.stop_now.wait()
        finally:
            watcher.cancel()
            await runner.cleanup()
        return self.exit_code

    def _on_sigterm(self) -> None:
        assert self.stop_now is not None
        if self.terminating:
            self.stop_now.set()
            return
        self.terminating = True
        self.state.set(podstate.TERMINATING, 1)
        logs.event(log, "relay.sigterm", drain_timeout=self.cfg.drain_timeout)
        asyncio.get_running_loop().create_task(self._drain_then_stop())

    async def _drain_then_stop(self) -> None:
        assert self.stop_now is not None
        await self.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.drain_timeout
        # Workers publish their queue figures every POLL_INTERVAL: require two quiet polls in a row.
        quiet = 0
        while loop.time() < deadline:
            quiet = quiet + 1 if self.status()["drained"] else 0
            if quiet >= 3:
                logs.event(log, "drain.complete")
                break
            await asyncio.sleep(POLL_INTERVAL)
        else:
            messages, _, _ = self.state.queue_totals()
            logs.event(log, "drain.timeout", level=logging.WARNING, sessions=self.state.sessions,
                       queued=messages)
        self.stop_now.set()

    async def _watch(self) -> None:
        assert self.stop_now is not None
        while True:
            for process in self.processes:
                if process.exitcode is not None:
                    metrics.mark_process_dead(process.pid)
                    logs.event(log, "worker.died", level=logging.ERROR, worker=process.name,
                               exitcode=process.exitcode)
                    self.exit_code = 1
                    self.stop_now.set()
                    return
            await asyncio.sleep(0.2)

    def _stop_workers(self) -> None:
        for process in self.processes:
            if process.exitcode is None and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in self.processes:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.exitcode is None:
                process.kill()
                process.join(5)
            if process.pid is not None:
                metrics.mark_process_dead(process.pid)
        left = self.spool.queue_count()
        if left:
            logs.event(log, "relay.stopped_with_queue", level=logging.WARNING, queued=left,
                       spool=str(self.cfg.spool))
        else:
            logs.event(log, "relay.stopped")
