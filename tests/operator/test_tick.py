"""One scaling tick (`reconcile.tick`) against the emulated API server, on pod sets the control plane
rarely produces on cue: every relay still marked draining right after maintenance, and an evicted
(Failed) pod next to a draining one. No relay listens on the pods' addresses, so every /status scrape
fails (partial metrics: the policy must not scale down on them)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from mailrelay_operator import cache, drain, kube, manifests, reconcile, relayclient
from mailrelay_sandbox import controlplane, kubeemu, scenario

from tests.operator.conftest import NAMESPACE, eventually

NAME = "tick"


@pytest.fixture(params=["api", "cache"])
async def runtime(api: kubeemu.Running, request: pytest.FixtureRequest) -> AsyncIterator[reconcile.Runtime]:
    """Each test runs twice: reading Deployments and pods from the API server, and through the operator's
    watch-fed cache. With the cache, the test ends by checking that every cached object still equals the
    server's: the cache hands out its own objects, so a tick that changed one would show here."""
    client = await kube.Kube.connect(str(api.kubeconfig), None, kube.RetryPolicy(attempts=2, timeout=5))
    relays = relayclient.RelayClient(timeout=0.5)
    reads = None
    if request.param == "cache":
        reads = cache.Cache.of(client, (kube.DEPLOYMENTS, kube.PODS), (NAMESPACE,),
                               {manifests.NAME_LABEL: manifests.APP_NAME},
                               index_label=manifests.INSTANCE_LABEL)
        reads.start()
        await eventually(lambda: reads is not None and reads.synced, within=20, what="the cache in sync")
    try:
        yield reconcile.Runtime(kube=client, relays=relays, config=reconcile.Config(resync_seconds=3600),
                                read_cache=reads)
        if reads is not None:
            await eventually(lambda: reads is not None and cache_equals_server(api, reads), within=10,
                             what="every cached object equal to the server's")
    finally:
        if reads is not None:
            await reads.stop()
        await relays.close()
        await client.close()


def cache_equals_server(api: kubeemu.Running, reads: cache.Cache) -> bool:
    for informer in reads.informers:
        resource = {kube.PODS: kubeemu.PODS, kube.DEPLOYMENTS: kubeemu.DEPLOYMENTS}[informer.res]
        served = {(o["metadata"]["namespace"], o["metadata"]["name"]): o
                  for o in api.emulator.peek_all(resource, NAMESPACE)
                  if cache.matches(o["metadata"].get("labels"), informer.selector)}
        if informer.store.objects != served:
            return False
    return True


async def setup(api: kubeemu.Running, runtime: reconcile.Runtime, http: controlplane.Api,
                pods: list[dict[str, Any]], replicas: int) -> reconcile.Memory:
    """A MailRelay (min 1, max 4) whose owned objects exist, its Deployment at `replicas`, and `pods`."""
    await http.request("POST", scenario.mailrelay_path(NAMESPACE), scenario.mailrelay(NAME, NAMESPACE))
    memory = reconcile.Memory()
    await reconcile.tick(runtime, mailrelay(api), memory)  # creates the owned objects
    deployment = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{NAME}"
    await http.patch(deployment, {"spec": {"replicas": replicas}})
    for i, pod in enumerate(pods):
        name = pod["name"]
        await http.request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": manifests.selector_labels(NAME),
                         "annotations": pod.get("annotations", {})},
            "spec": {"containers": [{"name": "relay", "image": "img"}]},
        })
        ready = "True" if pod.get("ready") else "False"
        await http.patch(f"/api/v1/namespaces/{NAMESPACE}/pods/{name}/status", {"status": {
            "phase": pod["phase"], "podIP": f"127.0.0.{200 + i}",
            "conditions": [{"type": "Ready", "status": ready}],
        }})
    return memory


def mailrelay(api: kubeemu.Running) -> dict[str, Any]:
    obj = api.emulator.peek(kubeemu.MAILRELAYS, NAMESPACE, NAME)
    assert obj is not None
    return obj


def deployment_replicas(api: kubeemu.Running) -> int:
    dep = api.emulator.peek(kubeemu.DEPLOYMENTS, NAMESPACE, NAME)
    assert dep is not None
    return int(dep["spec"]["replicas"])


async def test_maintenance_off_keeps_the_pool_at_its_size(
    api: kubeemu.Running, runtime: reconcile.Runtime
) -> None:
    """Right after maintenance every relay still carries its drain record: the serving count the policy
    starts from is the Deployment's, not 0, so the pool is not cut to the minimum (1)."""
    marked = drain.drain_annotations(time.time() - 5)
    pods = [
        {"name": f"{NAME}-{i}", "phase": "Running", "ready": True, "annotations": marked} for i in range(3)
    ]
    async with controlplane.Api(api.url) as http:
        memory = await setup(api, runtime, http, pods, replicas=3)
    report = await reconcile.tick(runtime, mailrelay(api), memory)
    assert report.decision is not None and report.decision.desired == 3
    assert deployment_replicas(api) == 3
    assert mailrelay(api)["status"]["desiredReplicas"] == 3


async def test_status_counts_serving_relays_and_leave_evicted_pods_out(
    api: kubeemu.Running, runtime: reconcile.Runtime
) -> None:
    """Deployment at 3: `a` and `d` serve, `b` drains, `c` was evicted mid-drain (Failed, replaced by `d`).
    status.replicas is the serving count (3 - 1 draining), as the CRD and the scale subresource say, and
    the evicted pod counts nowhere."""
    marked = drain.drain_annotations(time.time() - 5)
    pods = [
        {"name": f"{NAME}-a", "phase": "Running", "ready": True},
        {"name": f"{NAME}-b", "phase": "Running", "ready": True, "annotations": marked},
        {"name": f"{NAME}-c", "phase": "Failed", "ready": False, "annotations": marked},
        {"name": f"{NAME}-d", "phase": "Running", "ready": True},
    ]
    async with controlplane.Api(api.url) as http:
        memory = await setup(api, runtime, http, pods, replicas=3)
    report = await reconcile.tick(runtime, mailrelay(api), memory)
    status = mailrelay(api)["status"]
    assert report.decision is not None and report.decision.desired == 2  # partial metrics: hold
    assert status["replicas"] == 2
    assert status["drainingPods"] == 1
    assert status["readyReplicas"] == 3  # a, b, d: ready pods, draining or not
    assert deployment_replicas(api) == 3


def warning_reasons(api: kubeemu.Running) -> list[str]:
    return [e.get("reason", "") for e in api.emulator.peek_all(kubeemu.EVENTS, NAMESPACE)
            if e.get("type") == "Warning"]


@pytest.mark.parametrize("maintenance", [False, True])
async def test_a_drain_past_its_timeout_with_unknown_queue_is_held_except_in_maintenance(
    api: kubeemu.Running, runtime: reconcile.Runtime, maintenance: bool
) -> None:
    """`b` has drained for an hour (timeout 60 s) and its relay does not answer, so its queue is unknown:
    with the default onTimeout it is held (a DrainHeld Warning Event, once; the Draining condition), and
    the count stays. In maintenance no drain completes anyway, so nothing is announced as held."""
    marked = drain.drain_annotations(time.time() - 3600)
    pods = [
        {"name": f"{NAME}-a", "phase": "Running", "ready": True},
        {"name": f"{NAME}-b", "phase": "Running", "ready": False, "annotations": marked},
    ]
    async with controlplane.Api(api.url) as http:
        memory = await setup(api, runtime, http, pods, replicas=2)
        if maintenance:
            await http.patch(scenario.mailrelay_path(NAMESPACE, NAME), {"spec": {"maintenance": True}})
    for _ in range(2):
        await reconcile.tick(runtime, mailrelay(api), memory)
    draining = next(c for c in mailrelay(api)["status"]["conditions"] if c["type"] == "Draining")
    assert deployment_replicas(api) == 2
    assert {p["metadata"]["name"] for p in api.emulator.peek_all(kubeemu.PODS, NAMESPACE)} \
        == {f"{NAME}-a", f"{NAME}-b"}
    if maintenance:
        assert "DrainHeld" not in warning_reasons(api)
        assert draining["reason"] == "Maintenance"
    else:
        assert warning_reasons(api).count("DrainHeld") == 1
        assert draining["reason"] == "HeldByQueuedMail" and f"{NAME}-b" in draining["message"]
