"""The operator from its image, in-cluster, as every real install runs it.

`make images` builds `mailrelay-operator:<version>`; `helm install` of the chart with its defaults names
that image; the process kubelet (with `images=True`) runs the chart's operator pod from it with podman:
the ServiceAccount token from the TokenRequest API, the API server's CA (the kube-root-ca.crt ConfigMap)
and the namespace mounted where client libraries look for them, and KUBERNETES_SERVICE_HOST/PORT set.
No kubeconfig anywhere: the operator must find its cluster from inside, under the chart's RBAC, and
reconcile a MailRelay until its relays (processes, as everywhere in the sandbox) are ready.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mailrelay_operator import kube as k
from mailrelay_sandbox import containers, kubecluster, kubelet, scenario

from tests.conftest import REPO_ROOT, eventually, missing, require_tool

MAILRELAY = """\
apiVersion: mailrelay.dev/v1alpha1
kind: MailRelay
metadata:
  name: outbound
  namespace: mail
spec:
  upstream: {host: smtp.example.net, port: 25}
  acceptFrom: ["10.0.0.0/8"]
  replicas: {min: 1, max: 3}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[kubecluster.Cluster]:
    if containers.podman() is None:
        missing("podman is not installed (run `make tools`)")
    if not containers.has_image(containers.image("operator")):
        missing(f"image {containers.image('operator')} is not built (run `make images`)")
    if kubecluster.find_binaries() is None:
        require_tool("kube-apiserver")
    with kubecluster.running(tmp_path / "kube") as running:
        yield running


async def test_the_operator_image_reconciles_a_mailrelay_in_cluster(cluster: kubecluster.Cluster,
                                                                     tmp_path: Path) -> None:
    helm = require_tool("helm")
    ports = [f"operator.healthPort={free_port()}", f"operator.metricsPort={free_port()}"]
    subprocess.run([helm, "install", "mailrelay", str(REPO_ROOT / "charts" / "mailrelay-operator"),  # noqa: ASYNC221
                    "-n", "mailrelay-system", "--create-namespace", "--set", ports[0], "--set", ports[1]],
                   env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}, check=True,
                   capture_output=True, text=True, timeout=120)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/mailrelays.mailrelay.dev")
    cluster.kubectl("create", "namespace", "mail")
    (tmp_path / "outbound.yaml").write_text(MAILRELAY)
    async with (scenario.upstream_sink() as sink,
                kubelet.ProcessKubelet.on(cluster, "image-node", tmp_path / "pods", sink.address, images=True,
                                          extra_env={"MAILRELAY_LOG_LEVEL": "warning"}) as node,
                cluster.api() as api):
        async def operator_running() -> bool:
            pods = await api.items("/api/v1/namespaces/mailrelay-system/pods")
            statuses = [s for p in pods for s in (p.get("status") or {}).get("containerStatuses") or []]
            return any(str(s.get("containerID", "")).startswith("podman://")
                       and "running" in s.get("state", {}) for s in statuses)

        await eventually(operator_running, within=120, what="the operator's pod running from its image")
        applied = cluster.kubectl("apply", "-f", str(tmp_path / "outbound.yaml"), check=False)
        assert applied.returncode == 0, applied.stderr
        operator_log = next(r.workdir / "relay.log" for r in node.runtimes.values() if r.container)

        async def relay_ready() -> bool:
            relay = await api.get_or_none(k.MAILRELAYS.path("mail", "outbound")) or {}
            return bool((relay.get("status") or {}).get("readyReplicas") == 1)

        try:
            await eventually(relay_ready, within=180, what="the relay ready, reconciled in-cluster")
        except AssertionError as error:
            tail = operator_log.read_text(errors="replace")[-4000:]
            raise AssertionError(f"{error}\noperator log:\n{tail}") from None
        for kind in (k.DEPLOYMENTS, k.SERVICES):
            assert await api.get_or_none(kind.path("mail", "outbound")) is not None
        log = operator_log.read_text(errors="replace")
        assert "forbidden" not in log.lower(), log[-3000:]
