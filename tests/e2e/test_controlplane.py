"""The simulated control plane with real relay processes, without the operator.

A Deployment (shaped like the operator's) becomes running `mailrelay-relay` processes on 127.A.B.x with
podIP and Ready set from /readyz; mail sent to the endpoints reaches the sink; on scale-down the
ReplicaSet removes the NotReady pod with the lowest deletion cost, and the kubelet ends it with SIGTERM.
"""

from __future__ import annotations

import aiohttp
from mailrelay_sandbox import controlplane, kubeemu, loadgen, podorder, scenario

from tests.e2e.conftest import NAMESPACE, eventually, secret

DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"
PODS = f"/api/v1/namespaces/{NAMESPACE}/pods"


def test_strip_flags() -> None:
    args = ["--listen", "0.0.0.0:2525", "--max-sessions=5", "--upstream=x:1", "--workers", "2"]
    kept = controlplane.strip_flags(args, ("--listen", "--upstream"))
    assert kept == ["--max-sessions=5", "--workers", "2"]


def test_rewrite_path() -> None:
    from pathlib import Path

    mounts = {"/etc/mailrelay": Path("/tmp/a"), "/etc/mailrelay/admin": Path("/tmp/b")}
    assert controlplane.rewrite_path("/etc/mailrelay/admin/token", mounts) == "/tmp/b/token"
    assert controlplane.rewrite_path("/etc/mailrelay/x", mounts) == "/tmp/a/x"
    assert controlplane.rewrite_path("/etc/mailrelayx", mounts) == "/etc/mailrelayx"
    assert controlplane.rewrite_path("10", mounts) == "10"


async def test_pods_run_as_relays_and_scale_down_follows_deletion_cost(
    emulator: kubeemu.Running, sink: scenario.Upstream,
    control_plane: controlplane.ControlPlane,
) -> None:
    api = control_plane.api
    await api.request("POST", f"/api/v1/namespaces/{NAMESPACE}/secrets", secret("demo-admin", "s3cret"))
    await api.request("POST", DEPLOYMENTS, scenario.relay_deployment("demo", NAMESPACE, replicas=3,
                                                                      token_secret="demo-admin"))
    await eventually(lambda: len(control_plane.endpoints()) == 3, what="3 ready relays")

    async def deployment_ready() -> bool:
        deployment = await api.request("GET", f"{DEPLOYMENTS}/demo")
        return bool(deployment.get("status", {}).get("readyReplicas") == 3)

    await eventually(deployment_ready, what="Deployment status readyReplicas 3")
    pods = await api.items(PODS)
    assert len(pods) == 3
    for pod in pods:
        assert pod["status"]["podIP"].startswith("127.")
        assert controlplane.is_ready(pod)

    gen = loadgen.LoadGenerator(control_plane.endpoints)
    gen.enqueue(60)
    gen.set_load(0, 3)
    await gen.finish(60)
    await eventually(lambda: gen.summary(sink.delivered_ids()).delivered == 60, what="delivery")
    assert gen.summary(sink.delivered_ids()).sessions_reset == 0

    # Drain the oldest pod by hand, as the operator would, and give it the lowest deletion cost.
    oldest = min(pods, key=lambda p: p["metadata"]["creationTimestamp"])["metadata"]["name"]
    runtime = control_plane.runtimes[oldest]
    async with (aiohttp.ClientSession(headers={"Authorization": "Bearer s3cret"}) as http,
                http.post(f"{runtime.admin_url}/drain") as response):
        assert response.status == 200
    await api.patch(f"{PODS}/{oldest}", {"metadata": {"annotations": {podorder.DELETION_COST: "-1000"}}})
    await eventually(lambda: oldest not in {e.host for e in control_plane.endpoints()} and
                     not controlplane.is_ready(control_plane.pod(oldest) or {}), what="pod NotReady")

    await api.patch(f"{DEPLOYMENTS}/demo", {"spec": {"replicas": 2}})
    await eventually(lambda: any(t.pod == oldest for t in control_plane.terminations), what="termination")
    assert control_plane.deleted_by_replicaset == [oldest]
    ended = next(t for t in control_plane.terminations if t.pod == oldest)
    assert not ended.killed
    assert ended.was_drained is True
    assert ended.spool_left == 0
    await eventually(lambda: len(control_plane.endpoints()) == 2, what="2 endpoints")
    assert all(p["metadata"]["name"] != oldest for p in await api.items(PODS))
