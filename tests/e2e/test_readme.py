"""The README's install section, run as written against a real control plane of its own.

Every `kubectl` and `helm` command of README.md's ```sh blocks runs here, in order, with the real
binaries, in a folder that holds `crds/`, `charts/` and the README's `outbound.yaml`. A process kubelet
runs the relays; the operator runs cluster-wide, as the chart installs it, with a token of the
ServiceAccount the README's `helm install` made (its own pod, from the image the README names, is not
run: the process kubelet runs relays only), and RBAC must refuse it nothing. Then
`kubectl get mailrelays -n mail` must print the README's columns, with the numbers of this pool; and
`kubectl scale mr`, as docs/operator.md shows it, must reach the relays' Deployment.

A second check installs the chart with helm alone, on a cluster without the CRD: the chart's `crds/`
copy is accepted by the real API server.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mailrelay_operator import kube as k
from mailrelay_operator import manifests
from mailrelay_sandbox import kubecluster, kubelet, scenario

from tests.conftest import REPO_ROOT, TOOLS_BIN, eventually, require_tool

README = REPO_ROOT / "README.md"


def blocks(text: str, language: str) -> list[str]:
    """The fenced blocks of `text` whose info string is `language` ("" for a bare fence)."""
    found: list[str] = []
    current: list[str] | None = None
    current_language = ""
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, current_language = [], line[3:].strip()
            else:
                if current_language == language:
                    found.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return found


def readme_commands() -> list[str]:
    """Every kubectl and helm command of the README's sh blocks, continuation lines joined."""
    commands: list[str] = []
    for block in blocks(README.read_text(), "sh"):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith(("kubectl ", "helm ")):
                commands.append(" ".join(line.split()))
    return commands


def readme_table() -> tuple[str, list[str]]:
    """The README's `kubectl get mailrelays` console example: (command, header columns)."""
    for block in blocks(README.read_text(), ""):
        lines = block.strip().splitlines()
        if lines and lines[0].startswith("$ kubectl get mailrelays"):
            return lines[0][2:], lines[1].split()
    raise AssertionError("README.md shows no `$ kubectl get mailrelays` example")


def outbound_yaml() -> str:
    for block in blocks(README.read_text(), "yaml"):
        if "kind: MailRelay" in block and "name: outbound" in block:
            return block
    raise AssertionError("README.md shows no MailRelay named outbound")


def test_the_readme_names_its_commands() -> None:
    commands = readme_commands()
    assert commands[:2] == [
        "kubectl apply -f crds/",
        "helm install mailrelay charts/mailrelay-operator -n mailrelay-system --create-namespace "
        "--set image.repository=registry.example.com/mailrelay-operator "
        "--set relayImage.repository=registry.example.com/mailrelay-relay",
    ]
    assert "kubectl apply -f outbound.yaml" in commands


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[kubecluster.Cluster]:
    """A control plane of this test's own: the README installs cluster-wide things under fixed names."""
    if kubecluster.find_binaries() is None:
        require_tool("kube-apiserver")  # fails in CI, skips locally, with the usual message
    with kubecluster.running(tmp_path / "kube") as cluster:
        yield cluster


def run(command: str, cwd: Path, cluster: kubecluster.Cluster) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig),
           "PATH": f"{TOOLS_BIN}{os.pathsep}{cluster.binaries}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(shlex.split(command), cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"`{command}` failed:\n{result.stdout}\n{result.stderr}"
    return result


async def test_the_install_section_works_as_written(
    fresh_cluster: kubecluster.Cluster, tmp_path: Path
) -> None:
    require_tool("helm")
    cluster = fresh_cluster
    work = tmp_path / "checkout"
    work.mkdir()
    for name in ("crds", "charts"):
        (work / name).symlink_to(REPO_ROOT / name)
    (work / "outbound.yaml").write_text(outbound_yaml())
    for command in readme_commands():
        run(command, work, cluster)
    cluster.kubectl("wait", "--for=condition=Established", "crd/mailrelays.mailrelay.dev")
    account = "mailrelay-mailrelay-operator"
    token = cluster.service_account_token("mailrelay-system", account)
    kubeconfig = cluster.kubeconfig_for(tmp_path / "operator.kubeconfig", token,
                                        user=f"system:serviceaccount:mailrelay-system:{account}")
    async with (scenario.upstream_sink() as sink,
                kubelet.ProcessKubelet.on(cluster, "readme-node", tmp_path / "pods", sink.address,
                                          extra_env={"MAILRELAY_LOG_LEVEL": "warning"}) as node,
                cluster.api() as api):
        # cluster-wide, as the chart installs it by default (operator.watchNamespaces empty)
        operator = scenario.OperatorProcess(kubeconfig, None, tmp_path / "operator.log",
                                            "--liveness", "", "--metrics-port", "0")
        await operator.start()
        try:
            command, header = readme_table()

            async def two_ready() -> bool:
                if not operator.running:
                    raise AssertionError(f"the operator exited:\n{operator.log_tail()}")
                relay = await api.get_or_none(k.MAILRELAYS.path("mail", "outbound")) or {}
                return bool((relay.get("status") or {}).get("readyReplicas") == 2)

            await eventually(two_ready, within=120, what="2 ready relays of the README's pool")
            printed = run(command, work, cluster).stdout.splitlines()
            assert printed[0].split() == header
            row = dict(zip(header, printed[1].split(), strict=True))
            assert (row["NAME"], row["MIN"], row["MAX"], row["DESIRED"], row["READY"]) == \
                ("outbound", "2", "20", "2", "2")
            assert row["DRAINING"] == "0" and row["SESSIONS"] == "0" and row["QUEUE"] == "0"
            # The operator's own pod is left to a real kubelet: here it waits, and says why.
            operator_pods = await api.items("/api/v1/namespaces/mailrelay-system/pods")
            assert len(operator_pods) == 1
            assert operator_pods[0]["spec"]["containers"][0]["image"].startswith(
                "registry.example.com/mailrelay-operator:")

            # docs/operator.md: the scale subresource sets spec.replicas.fixed, which reaches the relays.
            run("kubectl scale mr outbound --replicas=3 -n mail", work, cluster)

            async def three_ready() -> bool:
                deployment = await api.get_or_none(k.DEPLOYMENTS.path("mail", "outbound")) or {}
                return bool(deployment.get("spec", {}).get("replicas") == 3
                            and deployment.get("status", {}).get("readyReplicas") == 3)

            await eventually(three_ready, within=120, what="the Deployment at 3 ready relays")
            scale = await api.request("GET", k.MAILRELAYS.path("mail", "outbound", "scale"))
            assert scale["spec"]["replicas"] == 3
            assert scale["status"]["selector"] == manifests.selector("outbound")
            assert len(node.runtimes) == 3
        finally:
            await operator.stop()
        log = (tmp_path / "operator.log").read_text(errors="replace")
        assert "forbidden" not in log.lower(), "RBAC refused the cluster-wide operator:\n" + log[-3000:]


def test_helm_alone_installs_the_crd_from_the_chart(
    fresh_cluster: kubecluster.Cluster, tmp_path: Path
) -> None:
    require_tool("helm")
    assert not fresh_cluster.exists("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
                                    "mailrelays.mailrelay.dev")
    run(f"helm install mailrelay {REPO_ROOT / 'charts' / 'mailrelay-operator'} -n mailrelay-system "
        "--create-namespace", tmp_path, fresh_cluster)
    fresh_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                          "crd/mailrelays.mailrelay.dev")
    listed = fresh_cluster.kubectl("get", "crd", "mailrelays.mailrelay.dev", "-o",
                                   "jsonpath={.metadata.labels.app\\.kubernetes\\.io/component}").stdout
    assert listed == "crd"
