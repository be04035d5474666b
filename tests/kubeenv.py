"""The real control plane as the tests see it: one per test session, one namespace and one node per test.

`start_session_cluster()` starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler
(`mailrelay_sandbox.kubecluster`), applies `crds/` with kubectl and installs the chart with helm exactly
as the README says (`scenario.install`: the chart's own operator Deployment at replicaCount 0). The
operator under test always runs with a token of the chart's ServiceAccount, so RBAC is enforced on every
call it makes.

`KubeEnv` is one test's share: a namespace of its own, pinned (PodNodeSelector) to a node of its own
that the test's process kubelet registers, and deleted at the end. Tests therefore never see each
other's objects, and the control plane starts once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import smtplib
import subprocess
import urllib.parse
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import yaml
from mailrelay_operator import kube
from mailrelay_sandbox import apiclient, kubecluster, kubelet, scenario

OPERATOR_NAMESPACE = scenario.OPERATOR_NAMESPACE


SessionCluster = scenario.Platform


def start_session_cluster(workdir: Path) -> SessionCluster:
    cluster = kubecluster.start(workdir)
    try:
        return scenario.install(cluster, workdir)
    except BaseException:
        cluster.stop()
        raise


@dataclasses.dataclass
class KubeEnv:
    """One test's namespace and node on the session's control plane."""

    session: SessionCluster
    namespace: str
    node: str

    @property
    def cluster(self) -> kubecluster.Cluster:
        return self.session.cluster

    @property
    def url(self) -> str:
        return self.cluster.url

    @property
    def kubeconfig(self) -> Path:
        """The admin's kubeconfig (for set-up and for looking; the operator never uses it)."""
        return self.cluster.kubeconfig

    @property
    def operator_kubeconfig(self) -> Path:
        return self.session.operator_kubeconfig

    @property
    def ca_file(self) -> Path:
        return self.cluster.ca_file

    def api(self) -> apiclient.Api:
        """An admin client: `async with env.api() as api`."""
        return self.cluster.api()

    def path(self, resource: kube.Resource, name: str | None = None, subresource: str | None = None) -> str:
        return resource.path(self.namespace, name, subresource)

    def get(self, resource: kube.Resource, name: str) -> dict[str, Any] | None:
        """The object as the server has it now, or None (a blocking call: quick, for assertions)."""
        try:
            result: dict[str, Any] = self.cluster.request("GET", self.path(resource, name))
        except kubecluster.ApiStatus as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def list(self, resource: kube.Resource, selector: str | None = None) -> list[dict[str, Any]]:
        query = f"?labelSelector={urllib.parse.quote(selector)}" if selector else ""
        return list(self.cluster.request("GET", self.path(resource) + query).get("items") or [])

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl("-n", self.namespace, *args, check=check)

    def events(self) -> list[dict[str, Any]]:
        return self.list(kube.EVENTS)

    def describe_failure(self) -> str:
        """What a failed test should print: the namespace's events and the state of its pods."""
        try:
            pods = [(p["metadata"]["name"], p.get("status", {}).get("phase"),
                     p["metadata"].get("deletionTimestamp")) for p in self.list(kube.PODS)]
            events = [(e.get("reason"), e.get("message")) for e in self.events()][-20:]
        except Exception as exc:  # best effort while reporting another failure
            return f"(could not read the namespace: {exc})"
        return json.dumps({"pods": pods, "events": events}, indent=1)


def plain_kubeconfig(path: Path, url: str, token: str) -> Path:
    """A kubeconfig for a plain-HTTP endpoint on loopback (the fault proxy) with a bearer token."""
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "proxy",
              "clusters": [{"name": "proxy", "cluster": {"server": url}}],
              "users": [{"name": "user", "user": {"token": token}}],
              "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "user"}}]}
    path.write_text(json.dumps(config))
    return path


def new_env(session: SessionCluster) -> KubeEnv:
    suffix = secrets.token_hex(3)
    env = KubeEnv(session, namespace=f"t-{suffix}", node=f"node-{suffix}")
    session.cluster.create_namespace(env.namespace, node=env.node)
    return env


def end_env(env: KubeEnv) -> None:
    env.cluster.delete_namespace(env.namespace)


def server_dry_run(session: SessionCluster, docs: list[dict[str, Any]],
                   namespace: str) -> subprocess.CompletedProcess[str]:
    """`kubectl apply --dry-run=server --validate=strict` of `docs` into `namespace` (created if absent):
    the real API server's admission and strict field validation judge them, and nothing is stored."""
    session.cluster.create_namespace(namespace)
    return session.cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-n", namespace,
                                   "-f", "-", input=yaml.safe_dump_all(docs), check=False)


def _send_one(ip: str, port: int, msgid: str) -> None:
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = "rcpt@example.net"
    msg["Subject"] = "to one relay"
    msg["Message-ID"] = msgid
    msg.set_content("sent to one relay pod\n")
    with smtplib.SMTP(ip, port, timeout=20) as smtp:
        smtp.ehlo("client.example")
        # send_message raises unless the end of DATA got a 2xx: returning means the relay said 250.
        refused = smtp.send_message(msg)
        assert not refused, refused


async def send_to_pod(node: kubelet.ProcessKubelet, pod: str, count: int) -> set[str]:
    """`count` messages to the relay of pod `pod`, straight to its pod IP; the Message-IDs it answered
    250 to (all of them, or it raises)."""
    runtime = node.runtimes[pod]
    accepted: set[str] = set()
    for _ in range(count):
        msgid = f"<{uuid.uuid4().hex}@{pod}.test>"
        await asyncio.to_thread(_send_one, runtime.ip, runtime.smtp_port, msgid)
        accepted.add(msgid)
    return accepted
