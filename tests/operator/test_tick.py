"""One scaling tick (`scaling.tick`) against the real API server, with the operator's ServiceAccount
token, on pod sets the control plane rarely produces on cue: every relay still marked draining right
after maintenance, and an evicted (Failed) pod next to a draining one.

The test writes those pods itself (and their status, as a kubelet would). The MailRelay's Deployment is
created paused, so the real Deployment and ReplicaSet controllers make no pods of their own, and the
pods name a scheduler that does not exist, so nothing binds, runs or changes them. No relay listens on
their addresses, so every /status scrape fails (partial metrics: the policy must not scale down on them).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from mailrelay_operator import cache, drain, manifests, relayclient, runtime, scaling, spec
from mailrelay_operator import kube as k
from mailrelay_sandbox import apiclient, scenario

from tests import kubeenv
from tests.operator.conftest import eventually

NAME = "tick"
NO_SCHEDULER = "mailrelay-test-no-scheduler"


@pytest.fixture(params=["api", "cache"])
async def rt(kube: kubeenv.KubeEnv, request: pytest.FixtureRequest) -> AsyncIterator[runtime.Runtime]:
    """Each test runs twice: reading Deployments and pods from the API server, and through the operator's
    watch-fed cache. With the cache, the test ends by checking that every cached object still equals the
    server's: the cache hands out its own objects, so a tick that changed one would show here."""
    client = await k.Kube.connect(str(kube.operator_kubeconfig), None, k.RetryPolicy(attempts=2, timeout=5))
    relays = relayclient.RelayClient(timeout=0.5)
    reads = None
    if request.param == "cache":
        reads = cache.Cache.of(client, (k.DEPLOYMENTS, k.PODS), (kube.namespace,),
                               {manifests.NAME_LABEL: manifests.APP_NAME},
                               index_label=manifests.INSTANCE_LABEL)
        reads.start()
        await eventually(lambda: reads is not None and reads.synced, within=30, what="the cache in sync")
    try:
        yield runtime.Runtime(kube=client, relays=relays, config=runtime.Config(resync_seconds=3600),
                                read_cache=reads)
        if reads is not None:
            await eventually(lambda: reads is not None and cache_equals_server(kube, reads), within=30,
                             what="every cached object equal to the server's")
    finally:
        if reads is not None:
            await reads.stop()
        await relays.close()
        await client.close()


def cache_equals_server(kube: kubeenv.KubeEnv, reads: cache.Cache) -> bool:
    for informer in reads.informers:
        selector = ",".join(f"{key}={value}" for key, value in informer.selector.items())
        served = {}
        for obj in kube.list(informer.res, selector):
            meta = {key: value for key, value in obj["metadata"].items() if key != "managedFields"}
            served[(meta["namespace"], meta["name"])] = {
                "apiVersion": informer.res.api_version, "kind": informer.res.kind, **obj, "metadata": meta}
        if not served or informer.store.objects != served:
            return False
    return True


async def setup(kube: kubeenv.KubeEnv, rt: runtime.Runtime, http: apiclient.Api,
                pods: list[dict[str, Any]], replicas: int) -> runtime.Memory:
    """A MailRelay (min 1, max 4) whose owned objects exist, its Deployment at `replicas`, and `pods`."""
    await http.request("POST", kube.path(k.MAILRELAYS), scenario.mailrelay(NAME, kube.namespace))
    parsed = spec.parse(mailrelay(kube)["spec"])
    deployment: dict[str, Any] = dict(manifests.deployment(
        NAME, kube.namespace, parsed, image="mailrelay-relay:test", replicas=parsed.replicas.min,
        token_secret=manifests.admin_secret_name(NAME)))
    deployment["spec"] = {**deployment["spec"], "paused": True}
    await http.request("POST", kube.path(k.DEPLOYMENTS), deployment)
    memory = runtime.Memory()
    await scaling.tick(rt, mailrelay(kube), memory)  # creates the other owned objects, adopts all
    assert kube.get(k.SERVICES, NAME) is not None
    await http.patch(kube.path(k.DEPLOYMENTS, NAME), {"spec": {"replicas": replicas}})
    for i, pod in enumerate(pods):
        name = pod["name"]
        await http.request("POST", kube.path(k.PODS), {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": kube.namespace, "labels": manifests.selector_labels(NAME),
                         "annotations": pod.get("annotations", {})},
            "spec": {"schedulerName": NO_SCHEDULER, "containers": [{"name": "relay", "image": "img"}]},
        })
        ip = f"127.0.0.{200 + i}"
        await http.patch(kube.path(k.PODS, name, "status"), {"status": {
            "phase": pod["phase"], "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True" if pod.get("ready") else "False"}],
        }})
    return memory


def mailrelay(kube: kubeenv.KubeEnv) -> dict[str, Any]:
    obj = kube.get(k.MAILRELAYS, NAME)
    assert obj is not None
    return obj


def deployment_replicas(kube: kubeenv.KubeEnv) -> int:
    dep = kube.get(k.DEPLOYMENTS, NAME)
    assert dep is not None
    return int(dep["spec"]["replicas"])


def pod_names(kube: kubeenv.KubeEnv) -> set[str]:
    return {p["metadata"]["name"] for p in kube.list(k.PODS)}


async def tick_when_read(kube: kubeenv.KubeEnv, rt: runtime.Runtime, memory: runtime.Memory,
                         pods: int) -> scaling.TickReport:
    """A tick once its reader sees what the test wrote: the `pods` with their status, and the Deployment's
    count (the cache follows the server's watch; only the operator's own writes are read back at once)."""
    async def seen() -> bool:
        listed = await rt.read.list_(k.PODS, kube.namespace, manifests.selector_labels(NAME))
        deployment = await rt.read.get(k.DEPLOYMENTS, kube.namespace, NAME)
        return (len(listed) == pods and all((p.get("status") or {}).get("podIP") for p in listed)
                and deployment is not None and deployment["spec"]["replicas"] == deployment_replicas(kube))

    await eventually(seen, within=30, what=f"{pods} pods with their status and the Deployment readable")
    return await scaling.tick(rt, mailrelay(kube), memory)


async def test_maintenance_off_keeps_the_pool_at_its_size(
    kube: kubeenv.KubeEnv, rt: runtime.Runtime
) -> None:
    """Right after maintenance every relay still carries its drain record: the serving count the policy
    starts from is the Deployment's, not 0, so the pool is not cut to the minimum (1)."""
    marked = drain.drain_annotations(time.time() - 5)
    pods = [
        {"name": f"{NAME}-{i}", "phase": "Running", "ready": True, "annotations": marked} for i in range(3)
    ]
    async with kube.api() as http:
        memory = await setup(kube, rt, http, pods, replicas=3)
    report = await tick_when_read(kube, rt, memory, 3)
    assert report.decision is not None and report.decision.desired == 3
    assert deployment_replicas(kube) == 3
    assert mailrelay(kube)["status"]["desiredReplicas"] == 3


async def test_status_counts_serving_relays_and_leave_evicted_pods_out(
    kube: kubeenv.KubeEnv, rt: runtime.Runtime
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
    async with kube.api() as http:
        memory = await setup(kube, rt, http, pods, replicas=3)
    report = await tick_when_read(kube, rt, memory, 4)
    status = mailrelay(kube)["status"]
    assert report.decision is not None and report.decision.desired == 2  # partial metrics: hold
    assert status["replicas"] == 2
    assert status["drainingPods"] == 1
    assert status["readyReplicas"] == 3  # a, b, d: ready pods, draining or not
    assert deployment_replicas(kube) == 3


def warning_reasons(kube: kubeenv.KubeEnv) -> list[str]:
    return [e.get("reason", "") for e in kube.events() if e.get("type") == "Warning"]


@pytest.mark.parametrize("maintenance", [False, True])
async def test_a_drain_past_its_timeout_with_unknown_queue_is_held_except_in_maintenance(
    kube: kubeenv.KubeEnv, rt: runtime.Runtime, maintenance: bool
) -> None:
    """`b` has drained for an hour (timeout 60 s) and its relay does not answer, so its queue is unknown:
    with the default onTimeout it is held (a DrainHeld Warning Event, once; the Draining condition), and
    the count stays. In maintenance no drain completes anyway, so nothing is announced as held."""
    marked = drain.drain_annotations(time.time() - 3600)
    pods = [
        {"name": f"{NAME}-a", "phase": "Running", "ready": True},
        {"name": f"{NAME}-b", "phase": "Running", "ready": False, "annotations": marked},
    ]
    async with kube.api() as http:
        memory = await setup(kube, rt, http, pods, replicas=2)
        if maintenance:
            await http.patch(kube.path(k.MAILRELAYS, NAME), {"spec": {"maintenance": True}})
    for _ in range(2):
        await tick_when_read(kube, rt, memory, 2)
    draining = next(c for c in mailrelay(kube)["status"]["conditions"] if c["type"] == "Draining")
    assert deployment_replicas(kube) == 2
    assert pod_names(kube) == {f"{NAME}-a", f"{NAME}-b"}
    if maintenance:
        assert "DrainHeld" not in warning_reasons(kube)
        assert draining["reason"] == "Maintenance"
    else:
        assert warning_reasons(kube).count("DrainHeld") == 1
        assert draining["reason"] == "HeldByQueuedMail" and f"{NAME}-b" in draining["message"]
