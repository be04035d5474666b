"""The process kubelet on the real control plane, without the operator.

A Deployment shaped like the operator's becomes running `mailrelay-relay` processes: the real
ReplicaSet controller creates the pods, the real scheduler binds them to this test's node, the kubelet
runs them on their own pod IPs and reports Ready from the readiness probe, and the real EndpointSlice
controller lists them for the Service. On scale-down the real ReplicaSet controller picks the pod with
the lowest deletion cost, and the kubelet ends it with SIGTERM, the grace period and the final DELETE.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
from mailrelay_operator import kube as k
from mailrelay_sandbox import kubecluster, kubelet, loadgen, provisioner, scenario

from tests import kubeenv
from tests.e2e.conftest import eventually, secret

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


def test_strip_flags() -> None:
    args = ["--listen", "0.0.0.0:2525", "--max-sessions=5", "--upstream=x:1", "--workers", "2"]
    kept = kubelet.strip_flags(args, ("--listen", "--upstream"))
    assert kept == ["--max-sessions=5", "--workers", "2"]


def test_rewrite_path() -> None:
    mounts = {"/etc/mailrelay": Path("/tmp/a"), "/etc/mailrelay/admin": Path("/tmp/b")}
    assert kubelet.rewrite_path("/etc/mailrelay/admin/token", mounts) == "/tmp/b/token"
    assert kubelet.rewrite_path("/etc/mailrelay/x", mounts) == "/tmp/a/x"
    assert kubelet.rewrite_path("/etc/mailrelayx", mounts) == "/etc/mailrelayx"
    assert kubelet.rewrite_path("10", mounts) == "10"


def test_the_provisioner_serves_namespaces_pinned_to_its_node() -> None:
    def namespace(selector: str | None) -> dict[str, object]:
        annotations = {} if selector is None else {kubecluster.NODE_SELECTOR_ANNOTATION: selector}
        return {"metadata": {"name": "ns", "annotations": annotations}}

    assert provisioner.pinned_node(namespace("kubernetes.io/hostname=node-a")) == "node-a"
    assert provisioner.pinned_node(namespace("zone=z1, kubernetes.io/hostname=node-b")) == "node-b"
    assert provisioner.pinned_node(namespace("zone=z1")) is None
    assert provisioner.pinned_node(namespace(None)) is None


def test_the_provisioners_volume_is_pre_bound_to_the_claim_on_its_node(tmp_path: Path) -> None:
    claim = {"metadata": {"name": "spool-outbound-0", "namespace": "mail", "uid": "1234-abcd"},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "64Mi"}}}}
    folder = provisioner.claim_folder(tmp_path, "mail", "spool-outbound-0")
    assert folder == tmp_path / "claims" / "mail" / "spool-outbound-0"
    volume = provisioner.volume_for(claim, "node-a", folder)
    assert volume["metadata"]["name"] == "sandbox-1234-abcd"
    assert volume["metadata"]["annotations"] == {"pv.kubernetes.io/provisioned-by": provisioner.PROVISIONER}
    spec = volume["spec"]
    assert spec["claimRef"] == {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": "mail",
                                "name": "spool-outbound-0", "uid": "1234-abcd"}
    assert spec["capacity"] == {"storage": "64Mi"} and spec["storageClassName"] == ""
    assert spec["persistentVolumeReclaimPolicy"] == "Delete"
    assert spec["hostPath"]["path"] == str(folder)
    (term,) = spec["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [{"key": "kubernetes.io/hostname", "operator": "In",
                                         "values": ["node-a"]}]


def service(name: str, labels: dict[str, str]) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": labels, "ports": [{"name": "smtp", "port": 25, "targetPort": "smtp"}]}}


async def test_pods_run_as_relays_and_the_replicaset_removes_the_lowest_deletion_cost(
    kube: kubeenv.KubeEnv, sink: scenario.Upstream, node: kubelet.ProcessKubelet,
) -> None:
    deployment = scenario.relay_deployment("demo", kube.namespace, replicas=3, token_secret="demo-admin")
    labels = deployment["spec"]["selector"]["matchLabels"]
    async with kube.api() as api:
        await api.request("POST", kube.path(k.SECRETS), secret("demo-admin", "s3cret"))
        await api.request("POST", kube.path(k.DEPLOYMENTS), deployment)
        await api.request("POST", kube.path(k.SERVICES), service("demo", labels))
        async with kubelet.ServiceEndpoints(api, kube.namespace, "demo") as endpoints:
            await eventually(lambda: len(endpoints.endpoints()) == 3, what="3 ready endpoints")

            async def deployment_ready() -> bool:
                got = await api.request("GET", kube.path(k.DEPLOYMENTS, "demo"))
                return bool(got.get("status", {}).get("readyReplicas") == 3)

            await eventually(deployment_ready, what="the Deployment controller's readyReplicas 3")
            pods = await api.items(kube.path(k.PODS))
            assert len(pods) == 3
            assert {p["spec"]["nodeName"] for p in pods} == {kube.node}  # bound by the scheduler
            assert {e.host for e in endpoints.endpoints()} == {p["status"]["podIP"] for p in pods}
            assert all(kubelet.is_ready(p) for p in pods)

            gen = loadgen.LoadGenerator(endpoints.endpoints)
            gen.enqueue(60)
            gen.set_load(0, 3)
            await gen.finish(60)
            await eventually(lambda: gen.summary(sink.delivered_ids()).delivered == 60, what="delivery")
            assert gen.summary(sink.delivered_ids()).sessions_reset == 0

            # Drain the oldest pod by hand, as the operator would, and give it the lowest deletion cost.
            oldest = min(pods, key=lambda p: p["metadata"]["creationTimestamp"])["metadata"]["name"]
            runtime = node.runtimes[oldest]
            async with (aiohttp.ClientSession(headers={"Authorization": "Bearer s3cret"}) as http,
                        http.post(f"{runtime.admin_url}/drain") as response):
                assert response.status == 200
            await api.patch(kube.path(k.PODS, oldest),
                            {"metadata": {"annotations": {DELETION_COST: "-1000"}}})
            await eventually(lambda: runtime.ip not in {e.host for e in endpoints.endpoints()},
                             what="the drained pod out of the EndpointSlice (readiness probe failed)")

            await api.patch(kube.path(k.DEPLOYMENTS, "demo"), {"spec": {"replicas": 2}})
            await eventually(lambda: any(t.pod == oldest for t in node.terminations), what="termination")
            assert len(node.terminations) == 1, "the real ReplicaSet removed another pod too"
            ended = node.terminations[0]
            assert not ended.killed
            assert ended.was_drained is True
            assert ended.spool_left == 0
            await eventually(lambda: len(endpoints.endpoints()) == 2, what="2 endpoints")
            # The termination is recorded when the process ends; the kubelet's final DELETE comes after.
            await eventually(lambda: ended.finalized_at > 0, what="the kubelet's final DELETE")
            assert all(p["metadata"]["name"] != oldest for p in await api.items(kube.path(k.PODS)))


async def test_a_crashed_relay_is_restarted_and_reported(
    kube: kubeenv.KubeEnv, node: kubelet.ProcessKubelet,
) -> None:
    async with kube.api() as api:
        await api.request("POST", kube.path(k.SECRETS), secret("demo-admin", "s3cret"))
        await api.request("POST", kube.path(k.DEPLOYMENTS),
                          scenario.relay_deployment("demo", kube.namespace, replicas=1,
                                                    token_secret="demo-admin"))
        await eventually(lambda: any(r.ready for r in node.runtimes.values()), what="a ready relay")
        runtime = next(iter(node.runtimes.values()))
        assert runtime.process is not None
        runtime.process.kill()

        async def restarted() -> bool:
            pod = await api.get_or_none(kube.path(k.PODS, runtime.name))
            statuses = (pod or {}).get("status", {}).get("containerStatuses") or [{}]
            return bool(statuses[0].get("restartCount") == 1 and statuses[0].get("ready")
                        and "terminated" in statuses[0].get("lastState", {}))

        await eventually(restarted, what="restartCount 1, lastState terminated, ready again")
