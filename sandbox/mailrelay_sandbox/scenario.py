"""Building blocks shared by `make demo` and the end-to-end tests: the upstream sink, manifests, the operator.

- `upstream_sink()`: the relay engineers' `sink.Sink` (an in-process aiosmtpd upstream), plus the
  Message-IDs of what it received (the load generator's "delivered"); it can answer 4xx for a while.
- `mailrelay()`: a MailRelay object with the knobs the scenarios turn.
- `relay_deployment()`: a Deployment shaped like the operator's (ports `smtp`/`admin`, token Secret
  volume, spool emptyDir), for control-plane tests that run without the operator.
- `OperatorProcess`: the real `mailrelay-operator` as a subprocess with the sandbox's kubeconfig.
- `install()`: the README's install on a real control plane (`kubectl apply -f crds/`, `helm install` of
  the chart) and a token of the chart's ServiceAccount, which the operator runs with; `platform()`: a
  control plane started and installed, for the demo and the benchmarks.
- `create_naive()`: the owned objects applied by hand with no operator (plain HPA-style scaling).

It holds no verdicts (tests and demo decide) and is never imported by `relay/` or `operator/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.parser
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from mailrelay_sandbox import apiclient, kubecluster, netutil, sink

GROUP = "mailrelay.dev"
VERSION = "v1alpha1"
REPO_ROOT = Path(__file__).resolve().parents[2]
RELEASE, OPERATOR_NAMESPACE = "mailrelay", "mailrelay-system"


@dataclasses.dataclass
class Platform:
    """A control plane with the CRD and the chart installed, and the operator's own kubeconfig."""

    cluster: kubecluster.Cluster
    operator_account: str
    operator_token: str
    operator_kubeconfig: Path


def helm_binary() -> str:
    search = f"{REPO_ROOT / '.tools' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    found = shutil.which("helm", path=search)
    if found is None:
        raise RuntimeError("helm is not installed (run `make tools`)")
    return found


def _served(cluster: kubecluster.Cluster, path: str) -> bool:
    try:
        cluster.request("GET", path)
    except kubecluster.ApiStatus as exc:
        if exc.status in (404, 429, 503):
            return False
        raise
    return True


def install(cluster: kubecluster.Cluster, workdir: Path, *, release: str = RELEASE,
            namespace: str = OPERATOR_NAMESPACE) -> Platform:
    """`kubectl apply -f crds/` and `helm install` of the chart, as the README's install section does,
    then a token of the chart's ServiceAccount. The chart's operator Deployment is installed with
    replicaCount 0: the sandbox runs the operator as a local process (no image is built here)."""
    applied = cluster.kubectl("apply", "-f", str(REPO_ROOT / "crds"))
    if "mailrelays.mailrelay.dev" not in applied.stdout:
        raise RuntimeError(f"kubectl apply -f crds/ said: {applied.stdout} {applied.stderr}")
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/mailrelays.mailrelay.dev")
    # Established is not yet served: the new resource's watch cache answers 429 for a moment.
    cluster.wait(lambda: _served(cluster, f"/apis/{GROUP}/{VERSION}/mailrelays?limit=1"),
                 what="the MailRelay resource served")
    subprocess.run([helm_binary(), "install", release, str(REPO_ROOT / "charts" / "mailrelay-operator"),
                    "-n", namespace, "--create-namespace", "--set", "replicaCount=0"],
                   env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}, check=True,
                   capture_output=True, text=True, timeout=120)
    account = f"{release}-mailrelay-operator"
    cluster.wait(lambda: cluster.exists(f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}"),
                 what="the chart's ServiceAccount")
    token = cluster.service_account_token(namespace, account)
    kubeconfig = cluster.kubeconfig_for(workdir / "operator.kubeconfig", token,
                                        user=f"system:serviceaccount:{namespace}:{account}")
    return Platform(cluster, account, token, kubeconfig)


free_port = netutil.free_port  # kept for tests/operator, which calls it by this name


@dataclasses.dataclass
class Upstream:
    """The sandbox smarthost (`sink.Sink`), with the Message-IDs of what it received."""

    sink: sink.Sink
    _seen: int = 0
    _ids: set[str] = dataclasses.field(default_factory=set)

    @property
    def address(self) -> str:
        return self.sink.address

    def delivered_ids(self) -> set[str]:
        messages = self.sink.messages
        parser = email.parser.BytesHeaderParser()
        for received in messages[self._seen:]:
            msgid = parser.parsebytes(received.content).get("Message-ID")
            if msgid:
                self._ids.add(str(msgid).strip())
        self._seen = len(messages)
        return set(self._ids)

    @property
    def delivered(self) -> int:
        return self.sink.count

    def defer(self, code: int | None) -> None:
        """Answer every end of DATA with `code` (a 4xx) until called with None: a throttling upstream."""
        self.sink.clear_failures()
        if code is not None:
            self.sink.fail("data", code)


@contextlib.asynccontextmanager
async def upstream_sink(host: str = "127.0.0.1") -> AsyncIterator[Upstream]:
    server = sink.Sink(host)
    await asyncio.to_thread(server.start)
    try:
        yield Upstream(server)
    finally:
        await asyncio.to_thread(server.stop)


def mailrelay(
    name: str,
    namespace: str,
    *,
    min_replicas: int = 1,
    max_replicas: int = 4,
    interval: int = 1,
    sessions_per_pod: int = 5,
    queue_per_pod: int = 500,
    max_sessions_per_pod: int = 10,
    scale_up_step: int = 4,
    scale_down_stabilization: int = 3,
    scale_down_step: int = 1,
    drain_timeout: int = 60,
    drain_on_timeout: str | None = None,
    maintenance: bool = False,
    spool_persistent: str | None = None,
) -> dict[str, Any]:
    """A MailRelay for the sandbox's tests and demo; `spool_persistent` (a size such as 64Mi) gives each
    relay a claim (a StatefulSet) instead of an emptyDir."""
    relay: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MailRelay",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "upstream": {"host": "upstream.sandbox.test", "port": 25, "tls": "none"},
            "acceptFrom": ["127.0.0.0/8"],
            "replicas": {"min": min_replicas, "max": max_replicas},
            "limits": {"maxSessionsPerPod": max_sessions_per_pod, "maxMessageSize": "1Mi",
                       "maxRecipients": 10},
            "scaling": {
                "intervalSeconds": interval,
                "targets": {"sessionsPerPod": sessions_per_pod, "queuePerPod": queue_per_pod},
                "scaleUp": {"stabilizationSeconds": 0, "maxPodsPerStep": scale_up_step},
                "scaleDown": {"stabilizationSeconds": scale_down_stabilization,
                              "maxPodsPerStep": scale_down_step},
            },
            "drain": {"timeoutSeconds": drain_timeout,
                      **({"onTimeout": drain_on_timeout} if drain_on_timeout else {})},
            "maintenance": maintenance,
        },
    }
    if spool_persistent is not None:
        relay["spec"]["spool"] = {"persistent": {"size": spool_persistent}}
    return relay


def mailrelay_path(namespace: str, name: str | None = None) -> str:
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/mailrelays"
    return f"{base}/{name}" if name else base


@contextlib.asynccontextmanager
async def platform(workdir: Path) -> AsyncIterator[Platform]:
    """A real control plane (kubecluster) under `workdir`, with `install()` done; stopped on exit."""
    cluster = await asyncio.to_thread(kubecluster.start, workdir / "kube")
    try:
        yield await asyncio.to_thread(install, cluster, workdir)
    finally:
        await asyncio.to_thread(cluster.stop)


async def create_naive(api: apiclient.Api, relay: dict[str, Any], *, replicas: int,
                       token: str = "naive-token") -> Any:
    """The operator's own manifests for `relay` (a MailRelay object), applied once by hand with no
    operator: the admin Secret, the Deployment at `replicas` and the Service, as plain HPA scaling has
    them (no one drains). Returns the parsed spec."""
    from mailrelay_operator import manifests
    from mailrelay_operator import spec as specmod

    name, namespace = relay["metadata"]["name"], relay["metadata"]["namespace"]
    parsed = specmod.parse(relay["spec"])
    await api.request("POST", f"/api/v1/namespaces/{namespace}/secrets",
                      dict(manifests.admin_secret(name, namespace, token)))
    deployment = manifests.deployment(name, namespace, parsed, image="mailrelay-relay:sandbox",
                                      replicas=replicas, token_secret=manifests.admin_secret_name(name))
    await api.request("POST", f"/apis/apps/v1/namespaces/{namespace}/deployments", dict(deployment))
    await api.request("POST", f"/api/v1/namespaces/{namespace}/services",
                      dict(manifests.service(name, namespace)))
    return parsed


def relay_deployment(name: str, namespace: str, *, replicas: int, token_secret: str,
                     max_sessions: int = 10, grace_seconds: int = 10) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "mailrelay", "app.kubernetes.io/instance": name,
              "app.kubernetes.io/managed-by": "mailrelay-operator"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": grace_seconds,
                    "automountServiceAccountToken": False,
                    "containers": [{
                        "name": "relay",
                        "image": "mailrelay-relay:sandbox",
                        "ports": [{"name": "smtp", "containerPort": 2525},
                                  {"name": "admin", "containerPort": 8025}],
                        "env": [
                            {"name": "MAILRELAY_UPSTREAM", "value": "smtp.example.net:587"},
                            {"name": "MAILRELAY_MAX_SESSIONS", "value": str(max_sessions)},
                            {"name": "MAILRELAY_SPOOL", "value": "/var/spool/mailrelay"},
                            {"name": "MAILRELAY_ADMIN_TOKEN_FILE", "value": "/etc/mailrelay/admin/token"},
                            {"name": "MAILRELAY_DRAIN_TIMEOUT", "value": "60"},
                        ],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "admin"},
                                           "periodSeconds": 1, "failureThreshold": 1},
                        "volumeMounts": [{"name": "spool", "mountPath": "/var/spool/mailrelay"},
                                         {"name": "admin-token", "mountPath": "/etc/mailrelay/admin"}],
                    }],
                    "volumes": [{"name": "spool", "emptyDir": {}},
                                {"name": "admin-token", "secret": {"secretName": token_secret}}],
                },
            },
        },
    }


class OperatorProcess:
    """`mailrelay-operator` as a subprocess, pointed at the sandbox's kubeconfig, as in a cluster."""

    def __init__(self, kubeconfig: Path, namespace: str | None, log_path: Path, *extra_args: str,
                 env: dict[str, str] | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_path = log_path
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def command(self) -> list[str]:
        binary = str(Path(sys.executable).parent / "mailrelay-operator")
        scope = ["--namespace", self.namespace] if self.namespace else []  # None: cluster-wide
        return [binary, "--standalone", *scope, *self.extra_args]

    async def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), **self.env}
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.command, env=env, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True)
        self.starts += 1

    async def stop(self, *, kill: bool = False, grace: float = 10.0) -> int | None:
        process = self.process
        if process is None or process.returncode is not None:
            return process.returncode if process else None
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        return process.returncode

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
