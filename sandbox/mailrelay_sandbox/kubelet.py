"""The sandbox's process kubelet: the one simulated part of the sandbox's Kubernetes.

A `ProcessKubelet` is one Node of the real control plane (`kubecluster`). It registers its Node, and
runs each pod the real scheduler binds to it as real processes:
- the relay container as a `mailrelay-relay` process on the pod's own address in POD_CIDR (its pod IP,
  a local address of this host), with the ports of the container ports named `smtp` and `admin`, and
  the pod template's env/args (MAILRELAY_*); the upstream is pointed at the sandbox's sink;
- volumes as folders under the pod's work folder: emptyDir (gone with the pod, as in a cluster), Secret
  and ConfigMap (their keys as files), projected service-account tokens (TokenRequest), and
  persistentVolumeClaim (one folder per claim that outlives its pods; the node's `provisioner` binds
  each claim of its pinned namespaces to a PersistentVolume at that folder, so that the real scheduler
  places the pod, and removes the folder when the volume is reclaimed);
- probes from the pod spec (startup, readiness, liveness; httpGet and tcpSocket): Ready comes from the
  readiness probe, a failed liveness or startup probe restarts the container;
- container states, restarts (restartPolicy Always, with a short back-off) and the pod IP in the pod's
  status;
- graceful deletion as the real kubelet does it: SIGTERM, then the pod's deletion grace period, then
  SIGKILL, then the final DELETE (grace 0, with the pod's uid as precondition). What the relay left in
  its spool is recorded (`terminations`).

`ServiceEndpoints` is the node's view of a Service, as kube-proxy has it: the ready endpoints of the
Service's EndpointSlices, which the real EndpointSlice controller writes.

With `images=True`, a pod whose container image is in podman's local storage (`make images` builds
the project's two) runs from that image instead: `podman run` on the host's network, with the pod's
volumes mounted (the projected service-account token, the API server's CA and the namespace at
/var/run/secrets/kubernetes.io/serviceaccount, as a real kubelet mounts them),
KUBERNETES_SERVICE_HOST/PORT pointing at the API server, and the container's securityContext's
read-only root. That is how the operator runs from its image, in-cluster. Relays keep running as
processes (faster to start, and what every test of the drain measures).

It must not make scaling or drain decisions (the operator's job), nor do any controller's work (the
real controllers do). It is never imported by `relay/` or `operator/`. Not simulated: image pulls,
resource limits, exec probes, networking rules (NetworkPolicy has no effect on loopback).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from mailrelay_relay import spool as relay_spool

from mailrelay_sandbox import apiclient, containers, kubecluster, loadgen, provisioner

log = logging.getLogger("mailrelay_sandbox.kubelet")

Obj = dict[str, Any]
# Flags the sandbox sets itself (the pod's network and upstream are the sandbox's, not the template's).
_OVERRIDDEN_FLAGS = ("--listen", "--admin-listen", "--upstream", "--upstream-tls", "--upstream-user",
                     "--upstream-password-file", "--hostname")
_OVERRIDDEN_ENV = ("MAILRELAY_UPSTREAM_USER", "MAILRELAY_UPSTREAM_PASSWORD_FILE")
# The pod network: 198.18.0.0/15, the range set aside for network benchmarks (RFC 2544), routed as
# local addresses on the loopback interface, so that a process can listen on any address in it. Not
# 127.0.0.0/8: the API server refuses loopback addresses in EndpointSlices.
POD_CIDR = "198.18.0.0/15"
NODE_CAPACITY = {"cpu": "1000", "memory": "1Ti", "pods": "5000", "ephemeral-storage": "1Ti"}


def ensure_pod_network() -> None:
    """Route POD_CIDR locally (`ip route add local POD_CIDR dev lo`) unless it already is. Needs root or
    CAP_NET_ADMIN once per boot; raises with the command to run when it cannot."""
    with socket.socket() as probe:
        try:
            probe.bind((pod_ip(0, 0, 0), 0))
            return
        except OSError:
            pass
    command = ["ip", "route", "add", "local", POD_CIDR, "dev", "lo"]
    if os.geteuid() != 0 and shutil.which("sudo"):
        command = ["sudo", "-n", *command]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 and "File exists" not in result.stderr:
        raise RuntimeError(f"the sandbox's pod network needs `{' '.join(command[-7:])}` as root "
                           f"(it failed: {result.stderr.strip()})")


def pod_ip(a: int, b: int, index: int) -> str:
    """The index-th pod address of subnet (a, b) in POD_CIDR: 198.(18 + a % 2).(b + index // 253).x"""
    return f"198.{18 + a % 2}.{(b + index // 253) % 256}.{2 + index % 253}"


def now_iso() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_ready(pod: Mapping[str, Any]) -> bool:
    for cond in pod.get("status", {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def strip_flags(args: Sequence[str], flags: Sequence[str]) -> list[str]:
    """Remove `--flag value` and `--flag=value` for each of `flags` (pure)."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in flags:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def rewrite_path(value: str, mounts: Mapping[str, Path]) -> str:
    """Map a container path onto its host folder, longest mount path first (pure)."""
    for mount_path in sorted(mounts, key=len, reverse=True):
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(mounts[mount_path]) + value[len(mount_path.rstrip("/")):]
    return value


@dataclasses.dataclass
class Termination:
    """How a pod ended, for the tests and the demo."""

    pod: str
    signalled_at: float
    exited_at: float
    returncode: int | None
    killed: bool                  # SIGKILL after the grace period
    spool_left: int               # messages still queued in its spool when the pod's emptyDir went away
    was_drained: bool | None      # the relay's /status, asked just before the signal, said drained
    last_status: Obj | None
    served: bool = False          # the pod was Ready at some point (it took traffic)
    finalized_at: float = 0.0     # the pod object was removed from the API


@dataclasses.dataclass
class Probe:
    """One probe of the container spec and its running tally."""

    spec: Obj
    successes: int = 0
    failures: int = 0
    due: float = 0.0

    @property
    def period(self) -> float:
        return float(self.spec.get("periodSeconds", 10))

    def record(self, ok: bool) -> None:
        if ok:
            self.successes, self.failures = self.successes + 1, 0
        else:
            self.successes, self.failures = 0, self.failures + 1

    @property
    def failed(self) -> bool:
        return self.failures >= int(self.spec.get("failureThreshold", 3))

    @property
    def passed(self) -> bool:
        return self.successes >= int(self.spec.get("successThreshold", 1))


@dataclasses.dataclass
class PodRuntime:
    name: str
    namespace: str
    uid: str
    ip: str
    ports: dict[str, int]
    workdir: Path
    spool: Path
    token_file: Path | None
    grace: float
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    started: bool = False
    terminating: bool = False
    restarts: int = 0
    served: bool = False
    started_at: float = 0.0
    last_exit: Obj | None = None
    last_status: Obj | None = None
    task: asyncio.Task[None] | None = None
    command: list[str] | None = None  # a container's `podman run` (None: the relay process)
    container: str | None = None  # its podman name
    image: str = "mailrelay-relay"

    @property
    def smtp_port(self) -> int:
        return self.ports.get("smtp", 2525)

    @property
    def admin_port(self) -> int:
        return self.ports.get("admin", 8025)

    @property
    def admin_url(self) -> str:
        return f"http://{self.ip}:{self.admin_port}"

    def token(self) -> str | None:
        if self.token_file is None:
            return None
        try:
            return self.token_file.read_text().strip()
        except OSError:
            return None


class ProcessKubelet:
    """`async with ProcessKubelet(...)`: registers Node `node` and runs the pods bound to it until closed."""

    def __init__(
        self,
        api_url: str,
        token: str,
        ca_file: Path,
        node: str,
        workdir: Path,
        upstream: str,
        *,
        sync_period: float = 0.3,
        probe_period: float = 0.5,
        extra_env: Mapping[str, str] | None = None,
        relay_command: Sequence[str] | None = None,
        subnet: tuple[int, int] | None = None,
        max_grace_seconds: float | None = None,
        observe_status: bool = True,
        images: bool = False,
        provision_period: float = 1.0,
    ) -> None:
        self.api = apiclient.Api(api_url, token, ca_file)
        self.provisioner = provisioner.Provisioner(self.api, node, workdir)
        self.provision_period = provision_period
        self.node = node
        self.workdir = workdir
        self.upstream = upstream
        self.sync_period = sync_period
        self.probe_period = probe_period
        self.extra_env = dict(extra_env or {})
        self.relay_command = list(relay_command or [str(Path(sys.executable).parent / "mailrelay-relay")])
        a, b = subnet or (random.randint(0, 1), random.randint(0, 200))
        self._subnet = (a, b)
        self._next_host = 0
        self.max_grace_seconds = max_grace_seconds
        self.observe_status = observe_status
        self.images = images  # run pods whose image is in podman's local storage from that image
        self.runtimes: dict[str, PodRuntime] = {}
        self.terminations: list[Termination] = []
        self.pods: list[Obj] = []
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self.errors = 0
        self._refused: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    def on(cls, cluster: kubecluster.Cluster, node: str, workdir: Path, upstream: str,
           **options: Any) -> ProcessKubelet:
        """A kubelet for `cluster` with its own identity (the sandbox-kubelet token)."""
        return cls(cluster.url, cluster.kubelet_token, cluster.ca_file, node, workdir, upstream, **options)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def __aenter__(self) -> ProcessKubelet:
        await asyncio.to_thread(ensure_pod_network)
        await self.api.__aenter__()
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        self.workdir.mkdir(parents=True, exist_ok=True)
        await self.register()
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def register(self) -> None:
        """Create (or take over) this kubelet's Node, Ready, with room for every sandbox pod."""
        labels = {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64", "sandbox.mailrelay.dev/process-kubelet": "true"}
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node, "labels": labels}}
        with contextlib.suppress(apiclient.ApiError):
            await self.api.request("POST", "/api/v1/nodes", node)
        await self.heartbeat()

    async def heartbeat(self) -> None:
        """Node status and the node's Lease, as a kubelet renews them: the node lifecycle controller
        takes the not-ready taint off a Ready node, and would mark it unreachable without them."""
        await self.api.patch(f"/api/v1/nodes/{self.node}/status", {"status": self._node_status()})
        now = datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}"
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": self.node, "namespace": "kube-node-lease"},
                 "spec": {"holderIdentity": self.node, "leaseDurationSeconds": 40, "renewTime": now}}
        try:
            await self.api.patch(path, {"spec": lease["spec"]})
        except apiclient.ApiError as exc:
            if exc.status != 404:
                raise
            await self.api.request("POST", path.rsplit("/", 1)[0], lease)

    def _node_status(self) -> Obj:
        now = now_iso()
        return {
            "capacity": NODE_CAPACITY, "allocatable": NODE_CAPACITY,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "the sandbox's process kubelet is running",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.node}],
            "nodeInfo": {"machineID": self.node, "systemUUID": self.node, "bootID": self.node,
                         "kernelVersion": os.uname().release, "osImage": "sandbox",
                         "containerRuntimeVersion": "process://sandbox", "kubeletVersion": "sandbox",
                         "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
        }

    async def close(self, *, delete_node: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=10)
        for runtime in list(self.runtimes.values()):
            if runtime.task is not None:
                runtime.task.cancel()
            await self._stop_process(runtime, grace=3.0)
            with contextlib.suppress(apiclient.ApiError, aiohttp.ClientError, TimeoutError):
                await self._finalize(runtime.namespace, runtime.name, runtime.uid)
        self.runtimes.clear()
        if delete_node:
            with contextlib.suppress(apiclient.ApiError, aiohttp.ClientError, TimeoutError):
                await self.api.request("DELETE", f"/api/v1/nodes/{self.node}")
        if self._http is not None:
            await self._http.close()
        await self.api.__aexit__()

    # -- views -------------------------------------------------------------------------------------
    def pod(self, name: str) -> Obj | None:
        for pod in self.pods:
            if pod.get("metadata", {}).get("name") == name:
                return pod
        return None

    def running_endpoints(self) -> list[loadgen.Endpoint]:
        """Ready, non-terminating pods as this kubelet knows them (no Service needed)."""
        return [loadgen.Endpoint(r.ip, r.smtp_port) for r in self.runtimes.values()
                if r.ready and not r.terminating]

    # -- the loop ----------------------------------------------------------------------------------
    async def _loop(self) -> None:
        beat = 0.0
        provisioned = 0.0
        while True:
            try:
                if time.monotonic() - provisioned > self.provision_period:
                    provisioned = time.monotonic()
                    await self.provisioner.sync()
                await self.sync()
                if time.monotonic() - beat > 10:
                    await self.heartbeat()
                    beat = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep going, as a kubelet does
                self.errors += 1
                log.warning("kubelet %s sync failed: %s", self.node, exc)
            await asyncio.sleep(self.sync_period)

    async def sync(self) -> None:
        self.pods = await self.api.items(f"/api/v1/pods?fieldSelector=spec.nodeName%3D{self.node}")
        seen: set[str] = set()
        for pod in self.pods:
            meta = pod["metadata"]
            name = meta["name"]
            seen.add(name)
            runtime = self.runtimes.get(name)
            if runtime is not None and runtime.uid != meta.get("uid"):
                if not runtime.terminating:
                    # The older pod of this name is gone from the API without grace (force-deleted) and
                    # its name already belongs to a new pod (a StatefulSet's ordinal): stop it first.
                    runtime.terminating = True
                    self._spawn(self.stop_pod(runtime, runtime.grace, finalize=False))
                continue  # an older pod of the same name is still being torn down
            if meta.get("deletionTimestamp"):
                if runtime is None:
                    await self._finalize(meta["namespace"], name, meta.get("uid"))
                elif not runtime.terminating:
                    runtime.terminating = True
                    grace = float(meta.get("deletionGracePeriodSeconds")
                                  or pod["spec"].get("terminationGracePeriodSeconds", 30))
                    self._spawn(self.stop_pod(runtime, grace, finalize=True))
            elif runtime is None and pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
                await self.start_pod(pod)
        for name, runtime in list(self.runtimes.items()):
            if name not in seen and not runtime.terminating:
                # gone from the API without grace (force deletion): the process is stopped anyway
                runtime.terminating = True
                self._spawn(self.stop_pod(runtime, runtime.grace, finalize=False))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _allocate_ip(self) -> str:
        a, b = self._subnet
        used = {r.ip for r in self.runtimes.values()}
        while True:
            index = self._next_host
            self._next_host = (self._next_host + 1) % (253 * 50)
            ip = pod_ip(a, b, index)
            if ip not in used:
                return ip

    async def start_pod(self, pod: Obj) -> None:
        meta = pod["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        spec = pod["spec"]
        pod_containers = spec.get("containers") or []
        container = next((c for c in pod_containers
                          if any(p.get("name") == "smtp" for p in c.get("ports") or [])), None)
        if container is None:
            local = next((c for c in pod_containers
                          if self.images and containers.has_image(str(c.get("image")))), None)
            if local is not None:
                await self._start_container(pod, local)
            else:
                await self._cannot_run(pod)
            return
        ports = {str(p.get("name")): int(p["containerPort"]) for p in container.get("ports") or []}
        workdir, mounts, ip, env = await self._prepare(pod, container)
        env = {key: rewrite_path(value, mounts) for key, value in env.items()}
        for key in _OVERRIDDEN_ENV:
            env.pop(key, None)
        smtp_port = ports.get("smtp", 2525)
        admin_port = ports.get("admin", 8025)
        # env is rewritten already: rewriting it again would move a spool whose host folder happens to
        # lie under a mounted path (such as /tmp) into that volume
        spool = Path(env.get("MAILRELAY_SPOOL") or rewrite_path("/var/spool/mailrelay", mounts))
        if not str(spool).startswith(str(workdir)) and not str(spool).startswith(str(self.workdir)):
            spool = workdir / "spool"
        tmp = mounts.get("/tmp")
        accept = env.get("MAILRELAY_ACCEPT_FROM", "")
        env.update({
            "MAILRELAY_LISTEN": f"{ip}:{smtp_port}",
            "MAILRELAY_ADMIN_LISTEN": f"{ip}:{admin_port}",
            "MAILRELAY_UPSTREAM": self.upstream,
            "MAILRELAY_UPSTREAM_TLS": "none",
            "MAILRELAY_HOSTNAME": name,
            "MAILRELAY_SPOOL": str(spool),
            # the sandbox's clients come from the host: loopback or the pod network
            "MAILRELAY_ACCEPT_FROM": ",".join(x for x in (accept, "127.0.0.0/8", POD_CIDR) if x),
        })
        if tmp is not None:
            env["TMPDIR"] = str(tmp)
        env.update(self.extra_env)
        args = [rewrite_path(a, mounts) for a in strip_flags(container.get("args") or [], _OVERRIDDEN_FLAGS)]
        token_file = env.get("MAILRELAY_ADMIN_TOKEN_FILE")
        runtime = PodRuntime(name=name, namespace=namespace, uid=str(meta.get("uid")), ip=ip, ports=ports,
                             workdir=workdir, spool=spool,
                             token_file=Path(token_file) if token_file else None,
                             grace=float(spec.get("terminationGracePeriodSeconds", 30)))
        self.runtimes[name] = runtime
        runtime.task = asyncio.create_task(self._run(runtime, container, env, args))

    async def _prepare(self, pod: Obj, container: Obj) -> tuple[Path, dict[str, Path], str, dict[str, str]]:
        """What any container of a pod needs first: its work folder, its volumes (mount path -> host
        folder), its pod IP and the env of its spec (values, fields, Secret and ConfigMap keys)."""
        meta = pod["metadata"]
        workdir = self.workdir / meta["namespace"] / meta["name"]
        workdir.mkdir(parents=True, exist_ok=True)
        mounts = await self._volumes(pod, container, workdir)
        ip = self._allocate_ip()
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            value = await self._env_value(pod, item, ip)
            if value is not None:
                env[item["name"]] = value
        return workdir, mounts, ip, env

    async def _start_container(self, pod: Obj, container: Obj) -> None:
        """Run `container` from its local image with podman, as a kubelet with a container runtime would."""
        meta, spec = pod["metadata"], pod["spec"]
        name, namespace = meta["name"], meta["namespace"]
        workdir, mounts, ip, env = await self._prepare(pod, container)
        api = self.api.base_url.split("://", 1)[1]
        host, _, port = api.rpartition(":")
        env.update({"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port})
        podman_name = f"k8s_{namespace}_{name}_{str(meta.get('uid'))[:8]}"
        options = ["--rm", "--name", podman_name, "--network", "host", "--hostname", name]
        security = container.get("securityContext") or {}
        if security.get("readOnlyRootFilesystem"):
            options += ["--read-only", "--read-only-tmpfs=false"]
        if security.get("runAsUser") is not None:
            group = security.get("runAsGroup", security["runAsUser"])
            options += ["--user", f"{security['runAsUser']}:{group}"]
        for mount in container.get("volumeMounts") or []:
            host_folder = mounts.get(mount["mountPath"])
            if host_folder is not None:
                host_folder.chmod(0o777)  # a folder the container's user may write (an emptyDir)
                read_only = ":ro" if mount.get("readOnly") else ""
                options += ["-v", f"{host_folder}:{mount['mountPath']}{read_only}"]
        for key, value in env.items():
            options += ["-e", f"{key}={value}"]
        if container.get("command"):
            options += ["--entrypoint", str(container["command"][0])]
        args = [str(a) for a in [*(container.get("command") or [])[1:], *(container.get("args") or [])]]
        ports = {str(p.get("name")): int(p["containerPort"]) for p in container.get("ports") or []}
        runtime = PodRuntime(name=name, namespace=namespace, uid=str(meta.get("uid")), ip=ip, ports=ports,
                             workdir=workdir, spool=workdir / "no-spool", token_file=None,
                             grace=float(spec.get("terminationGracePeriodSeconds", 30)),
                             command=containers.run_command(str(container["image"]), options, args),
                             container=podman_name, image=str(container["image"]))
        self.runtimes[name] = runtime
        runtime.task = asyncio.create_task(self._run(runtime, container, {}, []))

    async def _cannot_run(self, pod: Obj) -> None:
        """A pod without a relay container (one with an `smtp` port): this kubelet runs relays only, so it
        says so in the pod's status, once, as a kubelet that cannot pull an image would."""
        uid = str(pod["metadata"].get("uid"))
        if uid in self._refused:
            return
        self._refused.add(uid)
        statuses = [{"name": c.get("name", ""), "ready": False, "restartCount": 0,
                     "image": c.get("image", ""), "imageID": "", "state": {"waiting": {
                         "reason": "SandboxCannotRun",
                         "message": "the sandbox's process kubelet runs mailrelay-relay containers only"}}}
                    for c in pod["spec"].get("containers") or []]
        with contextlib.suppress(apiclient.ApiError, aiohttp.ClientError, TimeoutError):
            await self.api.patch(
                f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods/{pod['metadata']['name']}/status",
                {"status": {"phase": "Pending", "containerStatuses": statuses}})

    async def _volumes(self, pod: Obj, container: Obj, workdir: Path) -> dict[str, Path]:
        namespace = pod["metadata"]["namespace"]
        folders: dict[str, Path] = {}
        for volume in pod["spec"].get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            folder = (self.workdir / "claims" / namespace / claim if claim
                      else workdir / "volumes" / volume["name"])
            folder.mkdir(parents=True, exist_ok=True)
            folders[volume["name"]] = folder
            for source in [volume, *((volume.get("projected") or {}).get("sources") or [])]:
                await self._fill(namespace, pod, source, folder)
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or []:
            if mount["name"] in folders:
                host = folders[mount["name"]]
                if mount.get("subPath"):
                    host = host / mount["subPath"]
                mounts[mount["mountPath"]] = host
        return mounts

    async def _fill(self, namespace: str, pod: Obj, source: Obj, folder: Path) -> None:
        """Write the files of one Secret, ConfigMap or service-account token volume source."""
        if "serviceAccountToken" in source:
            sa = pod["spec"].get("serviceAccountName") or "default"
            spec = source["serviceAccountToken"]
            answer = await self.api.request(
                "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                 "spec": {"expirationSeconds": int(spec.get("expirationSeconds", 3600))}})
            (folder / spec.get("path", "token")).write_text(answer["status"]["token"])
            return
        ref = source.get("secret") or source.get("configMap")
        if ref is None:
            items = (source.get("downwardAPI") or {}).get("items") or []
            fields = {"metadata.namespace": namespace, "metadata.name": pod["metadata"]["name"],
                      "metadata.uid": str(pod["metadata"].get("uid"))}
            for item in items:
                path = (item.get("fieldRef") or {}).get("fieldPath")
                if path in fields:
                    (folder / item["path"]).write_text(fields[path])
            return  # emptyDir, a claim and anything else: a folder
        kind = "secrets" if "secret" in source else "configmaps"
        name = ref.get("secretName") or ref.get("name")
        obj = await self.api.get_or_none(f"/api/v1/namespaces/{namespace}/{kind}/{name}")
        if obj is None:
            return
        if kind == "secrets":
            data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        else:
            data = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        items = ref.get("items")
        paths = {i["key"]: i["path"] for i in items} if items else {k: k for k in data}
        for key, rel in paths.items():
            if key in data:
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / rel).write_bytes(data[key])

    async def _env_value(self, pod: Obj, item: Obj, ip: str) -> str | None:
        if "value" in item:
            return str(item["value"])
        namespace = pod["metadata"]["namespace"]
        source = item.get("valueFrom") or {}
        if "fieldRef" in source:
            path = str(source["fieldRef"].get("fieldPath"))
            fields: dict[str, str] = {"metadata.name": pod["metadata"]["name"],
                                      "metadata.namespace": namespace, "status.podIP": ip,
                                      "spec.nodeName": self.node, "status.hostIP": "127.0.0.1",
                                      "metadata.uid": str(pod["metadata"].get("uid"))}
            return fields.get(path, "")
        ref = source.get("secretKeyRef") or source.get("configMapKeyRef")
        if ref is not None:
            kind = "secrets" if "secretKeyRef" in source else "configmaps"
            obj = await self.api.get_or_none(f"/api/v1/namespaces/{namespace}/{kind}/{ref['name']}")
            if obj is None:
                return None
            if kind == "configmaps":
                value = (obj.get("data") or {}).get(ref["key"])
                return None if value is None else str(value)
            raw = (obj.get("data") or {}).get(ref["key"])
            return base64.b64decode(raw).decode() if raw is not None else None
        return None

    # -- one pod: its container, probes and status ---------------------------------------------------
    async def _run(self, runtime: PodRuntime, container: Obj, env: dict[str, str], args: list[str]) -> None:
        """Start the container, probe it, keep its status in the API, restart it when it dies."""
        full_env = {**os.environ, **env}
        runtime.started_at = time.time()
        started_iso = now_iso()
        container_started = started_iso
        reported: tuple[Any, ...] | None = None
        probes = {kind: Probe(container[kind]) for kind in ("startupProbe", "readinessProbe", "livenessProbe")
                  if isinstance(container.get(kind), dict)}
        while not runtime.terminating:
            if runtime.process is None or runtime.process.returncode is not None:
                if runtime.process is not None:
                    runtime.restarts += 1
                    runtime.last_exit = {"terminated": {"exitCode": runtime.process.returncode,
                                                        "startedAt": container_started,
                                                        "finishedAt": now_iso(), "reason": "Error"}}
                    runtime.ready = runtime.started = False
                    log.warning("relay %s exited with %s; restarting", runtime.name,
                                runtime.process.returncode)
                    await self._report(runtime, started_iso, container_started, waiting=True)
                    await asyncio.sleep(min(5.0, 0.5 * runtime.restarts))
                    if runtime.terminating:
                        break
                    probes = {kind: Probe(p.spec) for kind, p in probes.items()}
                command = runtime.command or [*self.relay_command, *args]
                with (runtime.workdir / "relay.log").open("ab") as logfile:
                    runtime.process = await asyncio.create_subprocess_exec(
                        *command, env=full_env, stdout=logfile, stderr=logfile,
                        stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
                container_started = now_iso()
                now = time.monotonic()
                for probe in probes.values():
                    probe.due = now + float(probe.spec.get("initialDelaySeconds", 0))
            restart = await self._probe_all(runtime, probes)
            if restart and not runtime.terminating:
                log.warning("relay %s failed its %s probe; restarting", runtime.name, restart)
                await self._stop_process(runtime, runtime.grace)
                continue
            if self.observe_status and runtime.command is None:
                await self._observe(runtime)
            state = (runtime.ready, runtime.started, runtime.restarts)
            if (state != reported and not runtime.terminating
                    and await self._report(runtime, started_iso, container_started)):
                reported = state
            await asyncio.sleep(self.probe_period)

    async def _probe_all(self, runtime: PodRuntime, probes: dict[str, Probe]) -> str | None:
        """Run the probes that are due; returns the kind of a probe that calls for a restart."""
        now = time.monotonic()
        startup = probes.get("startupProbe")
        if startup is not None and not runtime.started:
            if now >= startup.due:
                startup.due = now + startup.period
                startup.record(await self._check(runtime, startup.spec))
                if startup.passed:
                    runtime.started = True
                elif startup.failed:
                    return "startup"
            if not runtime.started:
                return None
        runtime.started = True
        liveness = probes.get("livenessProbe")
        if liveness is not None and now >= liveness.due:
            liveness.due = now + liveness.period
            liveness.record(await self._check(runtime, liveness.spec))
            if liveness.failed:
                return "liveness"
        readiness = probes.get("readinessProbe")
        if readiness is None:
            runtime.ready = True
        elif now >= readiness.due:
            readiness.due = now + readiness.period
            readiness.record(await self._check(runtime, readiness.spec))
            if readiness.passed:
                runtime.ready = True
            elif readiness.failed:
                runtime.ready = False
        runtime.served = runtime.served or runtime.ready
        return None

    async def _check(self, runtime: PodRuntime, spec: Obj) -> bool:
        timeout = float(spec.get("timeoutSeconds", 1))
        try:
            if "httpGet" in spec:
                action = spec["httpGet"]
                port = self._port(runtime, action.get("port"))
                assert self._http is not None
                async with self._http.get(f"http://{runtime.ip}:{port}{action.get('path', '/')}",
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                    return 200 <= response.status < 400
            if "tcpSocket" in spec:
                port = self._port(runtime, spec["tcpSocket"].get("port"))
                _, writer = await asyncio.wait_for(asyncio.open_connection(runtime.ip, port), timeout)
                writer.close()
                return True
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return False
        return True  # exec and grpc probes are not simulated: they pass

    @staticmethod
    def _port(runtime: PodRuntime, port: Any) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        return runtime.ports[str(port)]

    async def _observe(self, runtime: PodRuntime) -> None:
        """The relay's own /status, kept for the record of how the pod ended (not a kubelet's job)."""
        token = runtime.token()
        if not token or self._http is None:
            return
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError):
            async with self._http.get(f"{runtime.admin_url}/status",
                                      headers={"Authorization": f"Bearer {token}"}) as response:
                if response.status == 200:
                    runtime.last_status = await response.json()

    async def _report(self, runtime: PodRuntime, started: str, container_started: str, *,
                      waiting: bool = False) -> bool:
        try:
            await self.api.patch(f"/api/v1/namespaces/{runtime.namespace}/pods/{runtime.name}/status",
                                 {"status": self._pod_status(runtime, started, container_started,
                                                             waiting=waiting)})
            return True
        except (apiclient.ApiError, aiohttp.ClientError, TimeoutError):
            return False

    def _pod_status(self, runtime: PodRuntime, started: str, container_started: str, *,
                    waiting: bool = False) -> Obj:
        ready = runtime.ready and not waiting
        flag = "True" if ready else "False"
        state: Obj = ({"waiting": {"reason": "CrashLoopBackOff"}} if waiting
                      else {"running": {"startedAt": container_started}})
        status: Obj = {"name": "relay" if runtime.command is None else "operator", "ready": ready,
                       "started": runtime.started and not waiting, "restartCount": runtime.restarts,
                       "state": state, "image": runtime.image, "imageID": "",
                       "containerID": (f"podman://{runtime.container}" if runtime.container
                                       else f"process://{runtime.uid}")}
        if runtime.last_exit is not None:
            status["lastState"] = runtime.last_exit
        return {
            "phase": "Running",
            "podIP": runtime.ip,
            "podIPs": [{"ip": runtime.ip}],
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": started,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": now_iso()},
                {"type": "Ready", "status": flag, "lastTransitionTime": now_iso()},
            ],
            "containerStatuses": [status],
        }

    # -- the end of a pod ----------------------------------------------------------------------------
    async def stop_pod(self, runtime: PodRuntime, grace: float, *, finalize: bool) -> None:
        runtime.ready = False
        if self.max_grace_seconds is not None:
            grace = min(grace, self.max_grace_seconds)
        with contextlib.suppress(apiclient.ApiError, aiohttp.ClientError, TimeoutError):
            await self.api.patch(f"/api/v1/namespaces/{runtime.namespace}/pods/{runtime.name}/status",
                                 {"status": {"conditions": [{"type": "Ready", "status": "False"},
                                                            {"type": "ContainersReady", "status": "False"},
                                                            {"type": "PodScheduled", "status": "True"},
                                                            {"type": "Initialized", "status": "True"}]}})
        if runtime.task is not None:
            runtime.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runtime.task
        if runtime.process is not None and runtime.process.returncode is None:
            await self._observe(runtime)  # the record says how the relay was at the signal, not a probe ago
        last = runtime.last_status
        termination = await self._stop_process(runtime, grace)
        termination.was_drained = bool(last.get("drained")) if last else None
        termination.last_status = last
        termination.served = runtime.served
        self.terminations.append(termination)
        log.info("pod %s ended: %s", runtime.name, termination)
        # The pod's own volumes (its spool, an emptyDir) go with it; claims and the relay's log stay.
        shutil.rmtree(runtime.workdir / "volumes", ignore_errors=True)
        if str(runtime.spool).startswith(str(runtime.workdir)):
            shutil.rmtree(runtime.spool, ignore_errors=True)
        if finalize:
            with contextlib.suppress(apiclient.ApiError, aiohttp.ClientError, TimeoutError):
                await self._finalize(runtime.namespace, runtime.name, runtime.uid)
        self.runtimes.pop(runtime.name, None)
        termination.finalized_at = time.time()

    async def _finalize(self, namespace: str, name: str, uid: str | None) -> None:
        """The kubelet's last word on a pod: DELETE with grace 0, for this uid only."""
        options: Obj = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0}
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            await self.api.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", options)
        except apiclient.ApiError as exc:
            if exc.status not in (404, 409):
                raise

    async def _stop_process(self, runtime: PodRuntime, grace: float) -> Termination:
        signalled = time.time()
        process = runtime.process
        killed = False
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=grace)
            except TimeoutError:
                killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        if process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # workers left behind, if any
        if runtime.container is not None:  # `podman run` gone: make sure its container is too
            remove = await asyncio.create_subprocess_exec(
                containers.podman() or "podman", "rm", "-f", "-t", "0", runtime.container,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            await remove.wait()
        return Termination(pod=runtime.name, signalled_at=signalled, exited_at=time.time(),
                           returncode=process.returncode if process else None, killed=killed,
                           spool_left=len(relay_spool.read_queue(runtime.spool)),
                           was_drained=None, last_status=None)


class ServiceEndpoints:
    """The ready endpoints of one Service, from its EndpointSlices, refreshed in the background:
    what kube-proxy would send new connections to. `endpoints()` is the load generator's callable."""

    def __init__(self, api: apiclient.Api, namespace: str, service: str, *, port_name: str = "smtp",
                 period: float = 0.3) -> None:
        self.api = api
        self.namespace = namespace
        self.service = service
        self.port_name = port_name
        self.period = period
        self._current: list[loadgen.Endpoint] = []
        self._task: asyncio.Task[None] | None = None

    def endpoints(self) -> list[loadgen.Endpoint]:
        return list(self._current)

    async def refresh(self) -> list[loadgen.Endpoint]:
        slices = await self.api.items(
            f"/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices"
            f"?labelSelector=kubernetes.io%2Fservice-name%3D{self.service}")
        found: list[loadgen.Endpoint] = []
        for item in slices:
            ports = [p for p in item.get("ports") or [] if p.get("name") == self.port_name]
            if not ports:
                continue
            for endpoint in item.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready") is True:
                    found.extend(loadgen.Endpoint(address, int(ports[0]["port"]))
                                 for address in endpoint.get("addresses") or [])
        self._current = sorted(found, key=lambda e: (e.host, e.port))
        return self.endpoints()

    async def __aenter__(self) -> ServiceEndpoints:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(apiclient.ApiError, aiohttp.ClientError, TimeoutError):
                await self.refresh()
            await asyncio.sleep(self.period)
