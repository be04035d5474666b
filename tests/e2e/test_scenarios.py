"""End-to-end scenarios on the real control plane: the real operator (a `mailrelay-operator` process with
the chart's ServiceAccount token, so RBAC applies to every call it makes) scales real relay processes
under MTA-like load.

Real: kube-apiserver, etcd, the Deployment and ReplicaSet controllers (which pick the pod to remove by its
deletion cost), the scheduler, the EndpointSlice controller, the garbage collector; the relays
(`mailrelay-relay` processes on their pod IPs) and the operator. Simulated: the kubelet (the test's
`node`: a process kubelet that runs the pods bound to it), kube-proxy (the load generator sends new
sessions to the ready endpoints of the Service's EndpointSlices, as kube-proxy would) and the MTA clients
(`loadgen`) and the smarthost (`sink`).

Each test asserts one promise of the project: nothing lost and no session reset while scaling up and in,
scale-up within two intervals of a load step, a relay removed only after it reported drained, a scale-in
cancelled mid-drain resumes the relay, an operator restarted mid-drain finishes the drain, and
maintenance answers new sessions with 421 and loses nothing. Waits are barriers on what the operator or
the cluster did (the operator's own ticks, the Service's endpoints), never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from mailrelay_operator import kube as k
from mailrelay_sandbox import apiclient, kubelet, loadgen, scenario

from tests import kubeenv
from tests.e2e.conftest import eventually
from tests.e2e.operator_harness import DRAIN_STARTED, Operator

pytestmark = pytest.mark.slow

NAME = "outbound"
@pytest.fixture
async def service(kube: kubeenv.KubeEnv, api: apiclient.Api) -> AsyncIterator[kubelet.ServiceEndpoints]:
    """The ready endpoints of the operator's Service, from the real EndpointSlices (kube-proxy's view)."""
    async with kubelet.ServiceEndpoints(api, kube.namespace, NAME) as endpoints:
        yield endpoints


async def create_relay(kube: kubeenv.KubeEnv, api: apiclient.Api, service: kubelet.ServiceEndpoints,
                       operator: Operator, **knobs: Any) -> None:
    await api.request("POST", kube.path(k.MAILRELAYS), scenario.mailrelay(NAME, kube.namespace, **knobs))
    want = int(knobs.get("min_replicas", 1))

    def ready() -> bool:
        operator.check_running()
        return len(service.endpoints()) >= want

    await eventually(ready, within=120, what=f"{want} ready relays in the Service's EndpointSlices")


async def replicas(kube: kubeenv.KubeEnv, api: apiclient.Api) -> int:
    return int((await api.request("GET", kube.path(k.DEPLOYMENTS, NAME)))["spec"]["replicas"])


def draining_pods(node: kubelet.ProcessKubelet) -> list[str]:
    return [p["metadata"]["name"] for p in node.pods
            if DRAIN_STARTED in (p["metadata"].get("annotations") or {})]


def live_pods(node: kubelet.ProcessKubelet) -> list[str]:
    return [p["metadata"]["name"] for p in node.pods if not p["metadata"].get("deletionTimestamp")]


def served_terminations(node: kubelet.ProcessKubelet) -> list[kubelet.Termination]:
    """Ended pods that took traffic. A replacement the real ReplicaSet creates while a drained pod is
    being deleted (and removes again when the operator lowers replicas) may never serve, and is left out."""
    return [t for t in node.terminations if t.served]


def assert_removed_only_when_drained(node: kubelet.ProcessKubelet) -> None:
    for ended in served_terminations(node):
        detail = f"{ended.pod}: last /status before SIGTERM {ended.last_status}"
        assert ended.was_drained is True, detail
        assert ended.last_status is not None and ended.last_status["sessions"] == 0, detail
        assert ended.last_status["queue"]["messages"] == 0, detail
        assert not ended.killed, detail
        assert ended.spool_left == 0, detail


def sessions_reported(node: kubelet.ProcessKubelet) -> int:
    return sum(int((r.last_status or {}).get("sessions", 0)) for r in node.runtimes.values())


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


async def hold_one_transaction_per_relay(service: kubelet.ServiceEndpoints) -> dict[str, HeldTransaction]:
    held = {e.host: HeldTransaction(e) for e in service.endpoints()}
    for index, transaction in enumerate(held.values()):
        await transaction.open(f"<held-{index}@e2e.test>")
    return held


async def test_load_step_scales_up_in_two_intervals_then_drains_in_and_loses_nothing(
    kube: kubeenv.KubeEnv, sink: scenario.Upstream, node: kubelet.ProcessKubelet, api: apiclient.Api,
    service: kubelet.ServiceEndpoints, operator: Operator,
) -> None:
    interval = 2
    await create_relay(kube, api, service, operator, min_replicas=1, max_replicas=3, interval=interval,
                       sessions_per_pod=3, max_sessions_per_pod=10, scale_down_stabilization=2)
    gen = loadgen.LoadGenerator(service.endpoints)
    gen.set_load(4, 2)
    await eventually(lambda: gen.counters.accepted >= 5, what="light load flowing")
    # Three ticks under a load below the target (3 sessions per relay): still one relay.
    await operator.ticks.wait(3, time.time(), "the light load runs")
    assert await replicas(kube, api) == 1

    # The load step: 8 MTA sessions (target 3 per relay -> 3 relays). Measured from the moment the relays
    # report the sessions (the operator cannot see load before that) to the Deployment's new replicas.
    gen.set_load(24, 8)
    await eventually(lambda: sessions_reported(node) >= 6, what="sessions seen")
    step_seen = time.time()

    async def scaled_up() -> bool:
        return await replicas(kube, api) > 1

    await eventually(scaled_up, within=30, every=0.1, what="scale-up")
    scaled_seen = time.time()
    # "Within two intervals" counted in the operator's own ticks (one per intervalSeconds), so that a
    # loaded machine that stretches every tick cannot fail the test, and a slow policy still does.
    after_step = [t for t in operator.ticks.since(step_seen) if t <= scaled_seen]
    assert len(operator.ticks.seen) >= 3, "the operator's tick metric was not seen"
    assert len(after_step) <= 2, f"scale-up took {len(after_step)} ticks after the load step: {after_step}"
    await eventually(lambda: len(service.endpoints()) == 3, within=60,
                     what="3 ready relays in the Service's EndpointSlices")

    # Load gone: the operator drains relays one by one and scales in to min.
    gen.set_load(1, 1)
    await eventually(lambda: len(live_pods(node)) == 1 and not node.runtimes.keys() - set(live_pods(node)),
                     within=150, what="scale-in to 1 relay")
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
    assert len(served_terminations(node)) >= 2, node.terminations
    assert_removed_only_when_drained(node)


async def test_scale_in_cancelled_mid_drain_resumes_the_relay(
    kube: kubeenv.KubeEnv, sink: scenario.Upstream, node: kubelet.ProcessKubelet, api: apiclient.Api,
    service: kubelet.ServiceEndpoints, operator: Operator,
) -> None:
    await create_relay(kube, api, service, operator, min_replicas=2, max_replicas=3, interval=1,
                       scale_down_stabilization=0)
    held = await hold_one_transaction_per_relay(service)
    assert len(held) == 2

    await api.patch(kube.path(k.MAILRELAYS, NAME), {"spec": {"replicas": {"min": 1}}})
    await eventually(lambda: len(draining_pods(node)) == 1, what="one relay draining")
    victim = draining_pods(node)[0]
    runtime = node.runtimes[victim]
    await eventually(lambda: (runtime.last_status or {}).get("draining") is True, what="relay draining")
    # The held transaction keeps the drain from finishing, tick after tick: nothing is removed.
    await operator.ticks.wait(3, time.time(), "the drain is held by an open transaction")
    assert victim in live_pods(node)
    assert await replicas(kube, api) == 2

    await api.patch(kube.path(k.MAILRELAYS, NAME), {"spec": {"replicas": {"min": 2}}})
    await eventually(lambda: not draining_pods(node), what="drain annotation cleared")
    await eventually(lambda: (runtime.last_status or {}).get("draining") is False and runtime.ready,
                     what="relay resumed and ready")
    await eventually(lambda: runtime.ip in {e.host for e in service.endpoints()},
                     what="the resumed relay back in the Service's EndpointSlices")
    assert victim in live_pods(node)
    assert node.terminations == []
    for transaction in held.values():
        assert (await transaction.finish()).startswith("250")
    await eventually(lambda: {"<held-0@e2e.test>", "<held-1@e2e.test>"} <= sink.delivered_ids(),
                     what="held messages delivered")
    assert await replicas(kube, api) == 2


async def test_operator_restarted_mid_drain_completes_the_drain(
    kube: kubeenv.KubeEnv, sink: scenario.Upstream, node: kubelet.ProcessKubelet, api: apiclient.Api,
    service: kubelet.ServiceEndpoints, operator: Operator,
) -> None:
    await create_relay(kube, api, service, operator, min_replicas=2, max_replicas=3, interval=1,
                       scale_down_stabilization=0)
    held = await hold_one_transaction_per_relay(service)
    assert len(held) == 2

    await api.patch(kube.path(k.MAILRELAYS, NAME), {"spec": {"replicas": {"min": 1}}})
    await eventually(lambda: len(draining_pods(node)) == 1, what="one relay draining")
    victim = draining_pods(node)[0]
    runtime = node.runtimes[victim]
    await eventually(lambda: (runtime.last_status or {}).get("draining") is True, what="relay draining")

    await operator.process.stop(kill=True)   # the operator dies mid-drain; its state is on the pod
    # Meanwhile the victim's last transaction ends: the relay is drained, but nobody is watching.
    assert (await held[runtime.ip].finish()).startswith("250")
    await eventually(lambda: (runtime.last_status or {}).get("drained") is True, what="relay drained")
    assert victim in live_pods(node)
    assert await replicas(kube, api) == 2

    await operator.process.start()
    await eventually(lambda: victim not in live_pods(node) and victim not in node.runtimes,
                     within=90, what="drained relay removed by the restarted operator")

    async def one_replica() -> bool:
        return await replicas(kube, api) == 1

    await eventually(one_replica, what="the Deployment lowered to 1 replica")
    assert [t.pod for t in served_terminations(node)] == [victim]
    assert_removed_only_when_drained(node)
    survivor = next(t for host, t in held.items() if host != runtime.ip)
    assert (await survivor.finish()).startswith("250")
    await eventually(lambda: {"<held-0@e2e.test>", "<held-1@e2e.test>"} <= sink.delivered_ids(),
                     what="both held messages delivered")


async def test_maintenance_refuses_new_sessions_with_421_and_loses_nothing(
    kube: kubeenv.KubeEnv, sink: scenario.Upstream, node: kubelet.ProcessKubelet, api: apiclient.Api,
    service: kubelet.ServiceEndpoints, operator: Operator,
) -> None:
    await create_relay(kube, api, service, operator, min_replicas=2, max_replicas=2, interval=1)
    endpoints = service.endpoints()
    assert len(endpoints) == 2
    gen = loadgen.LoadGenerator(service.endpoints)
    gen.set_load(10, 2)
    await eventually(lambda: gen.counters.accepted >= 20, what="mail flowing")

    await api.patch(kube.path(k.MAILRELAYS, NAME), {"spec": {"maintenance": True}})
    await eventually(lambda: len(node.runtimes) == 2 and all(
        (r.last_status or {}).get("draining") for r in node.runtimes.values()), what="every relay draining")
    for endpoint in endpoints:   # a new session on any relay: 421, then the relay closes it
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        greeting = (await asyncio.wait_for(reader.readline(), 10)).decode()
        assert greeting.startswith("421 4.3.2"), greeting
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    # The clients' own sessions are refused with 421 too (they defer and retry, as an MTA does).
    await eventually(lambda: gen.counters.refused_421 > 0, within=30,
                     what="the load generator's sessions refused with 421")
    accepted_before = gen.counters.accepted
    # The draining relays fail their readiness probe: the EndpointSlice controller takes them out of the
    # Service, and the operator keeps them (maintenance is not a scale-in) tick after tick.
    await eventually(lambda: not service.endpoints(), within=60,
                     what="no relay left in the Service's ready endpoints")
    await operator.ticks.wait(3, time.time(), "in maintenance")
    assert gen.counters.accepted == accepted_before
    assert len(live_pods(node)) == 2 and node.terminations == []
    assert await replicas(kube, api) == 2

    await api.patch(kube.path(k.MAILRELAYS, NAME), {"spec": {"maintenance": False}})
    await eventually(lambda: len(service.endpoints()) == 2, within=60, what="relays back in service")
    await eventually(lambda: gen.counters.accepted > accepted_before + 10, what="mail flowing again")
    await gen.finish(60)
    await eventually(lambda: gen.summary(sink.delivered_ids()).delivered == gen.summary([]).accepted,
                     within=60, what="every accepted message delivered")
    summary = gen.summary(sink.delivered_ids())
    assert summary.lost == 0
    assert summary.sessions_reset == 0
    assert summary.unsent == 0
    assert node.terminations == []
