"""End-to-end scenarios on the sandbox: the real operator (a `mailrelay-operator` process with the
sandbox's kubeconfig) scales real relay processes run by the simulated control plane, under MTA-like load.

Each test asserts one promise of the project: nothing lost and no session reset while scaling up and in,
scale-up within two intervals of a load step, a relay removed only after it reported drained, a scale-in
cancelled mid-drain resumes the relay, an operator restarted mid-drain finishes the drain, and
maintenance answers new sessions with 421 and loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mailrelay_sandbox import controlplane, kubeemu, loadgen, scenario

from tests.e2e.conftest import NAMESPACE, eventually

pytestmark = pytest.mark.slow

NAME = "outbound"
DRAIN_STARTED = "mailrelay.dev/drain-started"
DEPLOYMENT = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{NAME}"
RELAY = scenario.mailrelay_path(NAMESPACE, NAME)


@pytest.fixture
async def operator(emulator: kubeemu.Running, tmp_path: Path) -> AsyncIterator[scenario.OperatorProcess]:
    port = scenario.free_port()
    process = scenario.OperatorProcess(emulator.kubeconfig, NAMESPACE, tmp_path / "operator.log",
                                       "--liveness", "", "--metrics-port", str(port),
                                       "--metrics-host", "127.0.0.1")
    process.metrics_url = f"http://127.0.0.1:{port}/metrics"  # type: ignore[attr-defined]
    await process.start()
    try:
        yield process
    finally:
        await process.stop()


async def create_relay(plane: controlplane.ControlPlane, operator: scenario.OperatorProcess,
                       **knobs: Any) -> None:
    manifest = scenario.mailrelay(NAME, NAMESPACE, **knobs)
    await plane.api.request("POST", scenario.mailrelay_path(NAMESPACE), manifest)
    want = int(knobs.get("min_replicas", 1))

    def ready() -> bool:
        if not operator.running:
            raise AssertionError(f"the operator exited:\n{operator.log_tail()}")
        return len(plane.endpoints()) >= want

    await eventually(ready, within=90, what=f"{want} ready relays")


async def replicas(plane: controlplane.ControlPlane) -> int:
    return int((await plane.api.request("GET", DEPLOYMENT))["spec"]["replicas"])


def draining_pods(plane: controlplane.ControlPlane) -> list[str]:
    return [p["metadata"]["name"] for p in plane.pods
            if DRAIN_STARTED in (p["metadata"].get("annotations") or {})]


def live_pods(plane: controlplane.ControlPlane) -> list[str]:
    return [p["metadata"]["name"] for p in plane.pods if not p["metadata"].get("deletionTimestamp")]


def served_terminations(plane: controlplane.ControlPlane) -> list[controlplane.Termination]:
    """Ended pods that took traffic. A replacement the ReplicaSet creates while a drained pod is being
    deleted (and removes again when the operator lowers replicas) never served, and is left out."""
    return [t for t in plane.terminations if t.served]


def assert_removed_only_when_drained(plane: controlplane.ControlPlane) -> None:
    for ended in served_terminations(plane):
        detail = f"{ended.pod}: last /status before SIGTERM {ended.last_status}"
        assert ended.was_drained is True, detail
        assert ended.last_status is not None and ended.last_status["sessions"] == 0, detail
        assert ended.last_status["queue"]["messages"] == 0, detail
        assert not ended.killed, detail
        assert ended.spool_left == 0, detail


class HeldTransaction:
    """An SMTP transaction left open in the middle of DATA: it keeps its relay from finishing a drain."""

    def __init__(self, endpoint: loadgen.Endpoint) -> None:
        self.endpoint = endpoint
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _reply(self) -> str:
        assert self.reader is not None
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 30)).decode()
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "".join(lines)

    async def _send(self, line: str, code: str) -> None:
        assert self.writer is not None
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        reply = await self._reply()
        assert reply.startswith(code), f"{line!r} -> {reply!r}"

    async def open(self, msgid: str) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.endpoint.host, self.endpoint.port)
        assert (await self._reply()).startswith("220")
        await self._send("EHLO held.test", "250")
        await self._send("MAIL FROM:<held@example.test>", "250")
        await self._send("RCPT TO:<someone@example.net>", "250")
        await self._send("DATA", "354")
        self.writer.write(f"Message-ID: {msgid}\r\nSubject: held\r\n\r\nfirst half\r\n".encode())
        await self.writer.drain()

    async def finish(self) -> str:
        assert self.writer is not None
        self.writer.write(b"second half\r\n.\r\n")
        await self.writer.drain()
        reply = await self._reply()
        with contextlib.suppress(Exception):
            self.writer.write(b"QUIT\r\n")
            await self.writer.drain()
            self.writer.close()
        return reply


async def record_ticks(url: str, ticks: set[float]) -> None:
    """Collect the operator's scaling ticks: each sets mailrelay_operator_last_reconcile_timestamp_seconds."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url) as response:
                    for line in (await response.text()).splitlines():
                        if line.startswith("mailrelay_operator_last_reconcile_timestamp_seconds{"):
                            ticks.add(float(line.rsplit(" ", 1)[1]))
            await asyncio.sleep(0.1)


async def test_load_step_scales_up_in_two_intervals_then_drains_in_and_loses_nothing(
    emulator: kubeemu.Running, sink: scenario.Upstream, control_plane: controlplane.ControlPlane,
    operator: scenario.OperatorProcess,
) -> None:
    interval = 2
    await create_relay(control_plane, operator, min_replicas=1, max_replicas=3, interval=interval,
                       sessions_per_pod=3, max_sessions_per_pod=10, scale_down_stabilization=2)
    gen = loadgen.LoadGenerator(control_plane.endpoints)
    ticks: set[float] = set()
    recorder = asyncio.create_task(record_ticks(operator.metrics_url, ticks))  # type: ignore[attr-defined]
    gen.set_load(4, 2)
    await asyncio.sleep(3 * interval)
    assert await replicas(control_plane) == 1

    # The load step: 8 MTA sessions (target 3 per relay -> 3 relays). Measured from the moment the relays
    # report the sessions (the operator cannot see load before that) to the Deployment's patch.
    gen.set_load(24, 8)
    await eventually(lambda: sum(int((r.last_status or {}).get("sessions", 0))
                                 for r in control_plane.runtimes.values()) >= 6, what="sessions seen")
    step_seen = time.time()
    await eventually(lambda: any(int(d["spec"].get("replicas", 0)) > 1 for d in control_plane.deployments),
                     within=30, what="scale-up")
    scaled_seen = time.time()
    recorder.cancel()
    # "Within two intervals" counted in the operator's own ticks (one per intervalSeconds), so that a
    # loaded machine that stretches every tick cannot fail the test, and a slow policy still does.
    after_step = sorted(t for t in ticks if step_seen < t <= scaled_seen)
    assert len(ticks) >= 3, "the operator's tick metric was not seen"
    assert len(after_step) <= 2, f"scale-up took {len(after_step)} ticks after the load step: {after_step}"
    await eventually(lambda: len(control_plane.endpoints()) == 3, what="3 ready relays")

    # Load gone: the operator drains relays one by one and scales in to min.
    gen.set_load(1, 1)
    await eventually(lambda: len(live_pods(control_plane)) == 1 and not control_plane.runtimes.keys()
                     - set(live_pods(control_plane)), within=90, what="scale-in to 1 relay")
    await gen.finish(60)
    await eventually(lambda: gen.summary(sink.delivered_ids()).delivered == gen.summary([]).accepted,
                     within=60, what="every accepted message delivered")
    summary = gen.summary(sink.delivered_ids())
    assert summary.sent > 50
    assert summary.lost == 0
    assert summary.sessions_reset == 0
    assert summary.unsent == 0
    # Two relays went (3 -> 1). A replacement the ReplicaSet starts while a drained pod is being deleted
    # may become Ready before the operator lowers the replicas; it is then judged like any other.
    assert len(served_terminations(control_plane)) >= 2, control_plane.terminations
    assert_removed_only_when_drained(control_plane)


async def test_scale_in_cancelled_mid_drain_resumes_the_relay(
    emulator: kubeemu.Running, sink: scenario.Upstream, control_plane: controlplane.ControlPlane,
    operator: scenario.OperatorProcess,
) -> None:
    await create_relay(control_plane, operator, min_replicas=2, max_replicas=3, interval=1,
                       scale_down_stabilization=0)
    held = {e.host: HeldTransaction(e) for e in control_plane.endpoints()}
    for index, transaction in enumerate(held.values()):
        await transaction.open(f"<held-{index}@e2e.test>")

    await control_plane.api.patch(RELAY, {"spec": {"replicas": {"min": 1}}})
    await eventually(lambda: len(draining_pods(control_plane)) == 1, what="one relay draining")
    victim = draining_pods(control_plane)[0]
    runtime = control_plane.runtimes[victim]
    await eventually(lambda: (runtime.last_status or {}).get("draining") is True, what="relay draining")
    await asyncio.sleep(3)  # several ticks: the held transaction keeps the drain from finishing
    assert victim in live_pods(control_plane)
    assert await replicas(control_plane) == 2

    await control_plane.api.patch(RELAY, {"spec": {"replicas": {"min": 2}}})
    await eventually(lambda: not draining_pods(control_plane), what="drain annotation cleared")
    await eventually(lambda: (runtime.last_status or {}).get("draining") is False and runtime.ready,
                     what="relay resumed and ready")
    assert victim in live_pods(control_plane)
    assert control_plane.terminations == []
    for transaction in held.values():
        assert (await transaction.finish()).startswith("250")
    await eventually(lambda: {"<held-0@e2e.test>", "<held-1@e2e.test>"} <= sink.delivered_ids(),
                     what="held messages delivered")
    assert await replicas(control_plane) == 2


async def test_operator_restarted_mid_drain_completes_the_drain(
    emulator: kubeemu.Running, sink: scenario.Upstream, control_plane: controlplane.ControlPlane,
    operator: scenario.OperatorProcess,
) -> None:
    await create_relay(control_plane, operator, min_replicas=2, max_replicas=3, interval=1,
                       scale_down_stabilization=0)
    held = {e.host: HeldTransaction(e) for e in control_plane.endpoints()}
    for index, transaction in enumerate(held.values()):
        await transaction.open(f"<held-{index}@e2e.test>")

    await control_plane.api.patch(RELAY, {"spec": {"replicas": {"min": 1}}})
    await eventually(lambda: len(draining_pods(control_plane)) == 1, what="one relay draining")
    victim = draining_pods(control_plane)[0]
    runtime = control_plane.runtimes[victim]
    await eventually(lambda: (runtime.last_status or {}).get("draining") is True, what="relay draining")

    await operator.stop(kill=True)   # the operator dies mid-drain; its state is on the pod
    # Meanwhile the victim's last transaction ends: the relay is drained, but nobody is watching.
    assert (await held[runtime.ip].finish()).startswith("250")
    await eventually(lambda: (runtime.last_status or {}).get("drained") is True, what="relay drained")
    await asyncio.sleep(2)
    assert victim in live_pods(control_plane)

    await operator.start()
    await eventually(lambda: victim not in live_pods(control_plane) and victim not in control_plane.runtimes,
                     within=60, what="drained relay removed by the restarted operator")

    async def one_replica() -> bool:
        return await replicas(control_plane) == 1

    await eventually(one_replica, what="the Deployment lowered to 1 replica")
    assert [t.pod for t in served_terminations(control_plane)] == [victim]
    assert_removed_only_when_drained(control_plane)
    survivor = next(t for host, t in held.items() if host != runtime.ip)
    assert (await survivor.finish()).startswith("250")
    await eventually(lambda: {"<held-0@e2e.test>", "<held-1@e2e.test>"} <= sink.delivered_ids(),
                     what="both held messages delivered")


async def test_maintenance_refuses_new_sessions_with_421_and_loses_nothing(
    emulator: kubeemu.Running, sink: scenario.Upstream, control_plane: controlplane.ControlPlane,
    operator: scenario.OperatorProcess,
) -> None:
    await create_relay(control_plane, operator, min_replicas=2, max_replicas=2, interval=1)
    endpoints = control_plane.endpoints()
    gen = loadgen.LoadGenerator(control_plane.endpoints)
    gen.set_load(10, 2)
    await eventually(lambda: gen.counters.accepted >= 20, what="mail flowing")

    await control_plane.api.patch(RELAY, {"spec": {"maintenance": True}})
    await eventually(lambda: all((r.last_status or {}).get("draining")
                                 for r in control_plane.runtimes.values()), what="every relay draining")
    for endpoint in endpoints:   # a new session on any relay: 421, then the relay closes it
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        greeting = (await asyncio.wait_for(reader.readline(), 10)).decode()
        assert greeting.startswith("421 4.3.2"), greeting
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    refused_before = gen.counters.refused_421
    accepted_before = gen.counters.accepted
    await asyncio.sleep(3)
    assert gen.counters.accepted == accepted_before
    assert len(live_pods(control_plane)) == 2 and control_plane.terminations == []

    await control_plane.api.patch(RELAY, {"spec": {"maintenance": False}})
    await eventually(lambda: len(control_plane.endpoints()) == 2, what="relays back in service")
    await eventually(lambda: gen.counters.accepted > accepted_before + 10, what="mail flowing again")
    await gen.finish(60)
    await eventually(lambda: gen.summary(sink.delivered_ids()).delivered == gen.summary([]).accepted,
                     within=60, what="every accepted message delivered")
    summary = gen.summary(sink.delivered_ids())
    assert refused_before > 0  # the clients' own new sessions were refused with 421 and retried
    assert summary.lost == 0
    assert summary.sessions_reset == 0
    assert summary.unsent == 0
