"""A small simulated control plane for the sandbox: a ReplicaSet, a kubelet and Service endpoints.

It talks to the emulated API server over HTTP, as a real controller does, and plays the parts of a
cluster that the operator relies on:
- ReplicaSet: keeps as many live pods as each Deployment's `spec.replicas`; on scale-down it deletes
  pods in Kubernetes' order (`podorder`: pending, NotReady, lowest deletion cost, youngest).
- kubelet: runs each pod as a real `mailrelay-relay` process on its own loopback address 127.A.B.x,
  with the ports of the container ports named `smtp` and `admin` and the env/args of the pod template
  (MAILRELAY_*), secret and emptyDir volumes materialised in a per-pod folder, the upstream pointed at
  the sandbox sink. It sets `status.podIP`, phase and the Ready condition from `/readyz`, and ends a
  deleted pod with SIGTERM, the grace period, then SIGKILL; the pod's emptyDir (its spool) goes with it,
  as in a cluster, and what was left in it is recorded.
- Service endpoints: `endpoints()` lists the ready, non-terminating pods (for the load generator).

It must not make scaling or drain decisions (that is the operator's job) and must not be imported by
`relay/` or `operator/`. It is not a full kubelet or ReplicaSet: no rolling updates of a changed pod
template, no probes other than readiness, no resource limits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import random
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from mailrelay_sandbox import loadgen, podorder

log = logging.getLogger("mailrelay_sandbox.controlplane")

MERGE_PATCH = "application/merge-patch+json"
DRAIN_STARTED = "mailrelay.dev/drain-started"
# Flags the sandbox sets itself (the pod's network and upstream are the sandbox's, not the template's).
_OVERRIDDEN_FLAGS = ("--listen", "--admin-listen", "--upstream", "--upstream-tls", "--upstream-user",
                     "--upstream-password-file", "--hostname")
_OVERRIDDEN_ENV = ("MAILRELAY_UPSTREAM_USER", "MAILRELAY_UPSTREAM_PASSWORD_FILE")

Obj = dict[str, Any]


def now_iso() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> float:
    if not value:
        return 0.0
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def is_ready(pod: Mapping[str, Any]) -> bool:
    for cond in pod.get("status", {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def pod_facts(pod: Mapping[str, Any]) -> podorder.PodFacts:
    meta = pod.get("metadata", {})
    return podorder.PodFacts(
        name=str(meta.get("name")),
        phase=str(pod.get("status", {}).get("phase") or "Pending"),
        ready=is_ready(pod),
        deletion_cost=podorder.parse_cost(meta.get("annotations")),
        created_at=parse_time(meta.get("creationTimestamp")),
    )


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


class ApiError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"{status}: {text[:200]}")
        self.status = status


class Api:
    """The few API calls the control plane makes, over HTTP (JSON, merge patches)."""

    def __init__(self, base_url: str, token: str = "emulated-token") -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        self._session = aiohttp.ClientSession(headers=self._headers,
                                              timeout=aiohttp.ClientTimeout(total=10))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path: str, body: Any = None, *,
                      content_type: str = "application/json") -> Obj:
        assert self._session is not None
        data = None if body is None else json.dumps(body)
        async with self._session.request(method, self.base_url + path, data=data,
                                         headers={"Content-Type": content_type}) as response:
            text = await response.text()
            if response.status >= 400:
                raise ApiError(response.status, text)
            result: Obj = json.loads(text) if text else {}
            return result

    async def items(self, path: str) -> list[Obj]:
        return list((await self.request("GET", path)).get("items") or [])

    async def patch(self, path: str, body: Obj) -> Obj:
        return await self.request("PATCH", path, body, content_type=MERGE_PATCH)


@dataclasses.dataclass
class Termination:
    """How a pod ended, for the tests and the demo."""

    pod: str
    signalled_at: float
    exited_at: float
    returncode: int | None
    killed: bool                  # SIGKILL after the grace period
    spool_left: int               # spool files still there when the pod's emptyDir went away
    was_drained: bool | None      # the relay's last /status said drained before SIGTERM
    last_status: Obj | None
    served: bool = False          # the pod was Ready at some point (it took traffic)
    finalized_at: float = 0.0     # the pod object was removed from the API


@dataclasses.dataclass
class PodRuntime:
    name: str
    ip: str
    smtp_port: int
    admin_port: int
    workdir: Path
    spool: Path
    token_file: Path | None
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    terminating: bool = False
    restarts: int = 0
    served: bool = False
    started_at: float = 0.0
    last_status: Obj | None = None
    task: asyncio.Task[None] | None = None

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


def _count_files(folder: Path) -> int:
    if not folder.exists():
        return 0
    return sum(1 for p in folder.rglob("*") if p.is_file())


class ControlPlane:
    """Run `async with ControlPlane(...)`; it reconciles every `sync_period` seconds until closed."""

    def __init__(
        self,
        api_url: str,
        namespace: str,
        workdir: Path,
        upstream: str,
        *,
        sync_period: float = 0.3,
        readiness_period: float = 0.5,
        extra_env: Mapping[str, str] | None = None,
        relay_command: Sequence[str] | None = None,
        subnet: tuple[int, int] | None = None,
        max_grace_seconds: float | None = None,
    ) -> None:
        self.api = Api(api_url)
        self.namespace = namespace
        self.workdir = workdir
        self.upstream = upstream
        self.sync_period = sync_period
        self.readiness_period = readiness_period
        self.extra_env = dict(extra_env or {})
        self.relay_command = list(relay_command or [str(Path(sys.executable).parent / "mailrelay-relay")])
        a, b = subnet or (random.randint(100, 250), random.randint(0, 255))
        self._subnet = f"127.{a}.{b}"
        self._next_host = 2
        self.max_grace_seconds = max_grace_seconds
        self.runtimes: dict[str, PodRuntime] = {}
        self.terminations: list[Termination] = []
        self.deleted_by_replicaset: list[str] = []
        self.pods: list[Obj] = []
        self.deployments: list[Obj] = []
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self.errors = 0
        self._background: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------------
    async def __aenter__(self) -> ControlPlane:
        await self.api.__aenter__()
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
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
        self.runtimes.clear()
        if self._http is not None:
            await self._http.close()
        await self.api.__aexit__()

    # -- views -------------------------------------------------------------------------------------
    def endpoints(self) -> list[loadgen.Endpoint]:
        """The Service's endpoints: ready pods that are not terminating."""
        return [loadgen.Endpoint(r.ip, r.smtp_port) for r in self.runtimes.values()
                if r.ready and not r.terminating]

    def pod(self, name: str) -> Obj | None:
        for pod in self.pods:
            if pod.get("metadata", {}).get("name") == name:
                return pod
        return None

    # -- the loop ----------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep reconciling, as a controller does
                self.errors += 1
                log.warning("control plane sync failed: %s", exc)
            await asyncio.sleep(self.sync_period)

    async def sync(self) -> None:
        ns = self.namespace
        self.deployments = await self.api.items(f"/apis/apps/v1/namespaces/{ns}/deployments")
        self.pods = await self.api.items(f"/api/v1/namespaces/{ns}/pods")
        for deployment in self.deployments:
            await self._replicaset(deployment)
        self.pods = await self.api.items(f"/api/v1/namespaces/{ns}/pods")
        await self._kubelet()
        for deployment in self.deployments:
            await self._deployment_status(deployment)

    def _owned(self, deployment: Obj) -> list[Obj]:
        uid = deployment["metadata"].get("uid")
        return [p for p in self.pods
                if any(ref.get("uid") == uid for ref in p["metadata"].get("ownerReferences") or [])]

    async def _replicaset(self, deployment: Obj) -> None:
        want = int(deployment.get("spec", {}).get("replicas", 1))
        active = [p for p in self._owned(deployment) if not p["metadata"].get("deletionTimestamp")]
        if len(active) < want:
            for _ in range(want - len(active)):
                await self._create_pod(deployment)
        elif len(active) > want:
            victims = podorder.victims([pod_facts(p) for p in active], len(active) - want)
            for name in victims:
                with contextlib.suppress(ApiError):
                    await self.api.request("DELETE", f"/api/v1/namespaces/{self.namespace}/pods/{name}")
                    self.deleted_by_replicaset.append(name)
                    log.info("replicaset deleted %s", name)

    async def _create_pod(self, deployment: Obj) -> None:
        meta = deployment["metadata"]
        template = deployment["spec"]["template"]
        name = f"{meta['name']}-{secrets.token_hex(4)}"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": dict(template.get("metadata", {}).get("labels") or {}),
                "annotations": dict(template.get("metadata", {}).get("annotations") or {}),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"],
                                     "uid": meta["uid"], "controller": True}],
            },
            "spec": template.get("spec", {}),
            "status": {"phase": "Pending"},
        }
        await self.api.request("POST", f"/api/v1/namespaces/{self.namespace}/pods", pod)

    async def _deployment_status(self, deployment: Obj) -> None:
        owned = [p for p in self._owned(deployment) if not p["metadata"].get("deletionTimestamp")]
        ready = sum(1 for p in owned if is_ready(p))
        status = {"replicas": len(owned), "readyReplicas": ready, "availableReplicas": ready,
                  "updatedReplicas": len(owned),
                  "observedGeneration": deployment["metadata"].get("generation", 1)}
        current = deployment.get("status") or {}
        if any(current.get(k) != v for k, v in status.items()):
            name = deployment["metadata"]["name"]
            with contextlib.suppress(ApiError):
                await self.api.patch(f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{name}/status",
                                     {"status": status})

    # -- kubelet -----------------------------------------------------------------------------------
    async def _kubelet(self) -> None:
        seen: set[str] = set()
        for pod in self.pods:
            name = pod["metadata"]["name"]
            seen.add(name)
            runtime = self.runtimes.get(name)
            if pod["metadata"].get("deletionTimestamp"):
                if runtime is None:
                    await self._finalize(name)
                elif not runtime.terminating:
                    runtime.terminating = True
                    grace = float(pod["metadata"].get("deletionGracePeriodSeconds")
                                  or pod["spec"].get("terminationGracePeriodSeconds", 30))
                    self._spawn(self._terminate(runtime, grace, finalize=True))
            elif runtime is None:
                await self._start_pod(pod)
        for name, runtime in list(self.runtimes.items()):
            if name not in seen and not runtime.terminating:
                # removed without grace (garbage collection): stop the process anyway
                runtime.terminating = True
                self._spawn(self._terminate(runtime, 30.0, finalize=False))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _allocate_ip(self) -> str:
        host = self._next_host
        self._next_host = 2 if self._next_host >= 254 else self._next_host + 1
        return f"{self._subnet}.{host}"

    async def _start_pod(self, pod: Obj) -> None:
        name = pod["metadata"]["name"]
        spec = pod["spec"]
        containers = spec.get("containers") or []
        container = next((c for c in containers
                          if any(p.get("name") == "smtp" for p in c.get("ports") or [])),
                         containers[0] if containers else {})
        ports = {p.get("name"): int(p["containerPort"]) for p in container.get("ports") or []}
        workdir = self.workdir / name
        workdir.mkdir(parents=True, exist_ok=True)
        mounts = await self._volumes(pod, container, workdir)
        ip = self._allocate_ip()
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            value = await self._env_value(pod, item, ip)
            if value is not None:
                env[item["name"]] = rewrite_path(value, mounts)
        for key in _OVERRIDDEN_ENV:
            env.pop(key, None)
        smtp_port = ports.get("smtp", 2525)
        admin_port = ports.get("admin", 8025)
        spool = Path(rewrite_path(env.get("MAILRELAY_SPOOL", "/var/spool/mailrelay"), mounts))
        if not str(spool).startswith(str(workdir)):
            spool = workdir / "spool"
        accept = env.get("MAILRELAY_ACCEPT_FROM", "")
        env.update({
            "MAILRELAY_LISTEN": f"{ip}:{smtp_port}",
            "MAILRELAY_ADMIN_LISTEN": f"{ip}:{admin_port}",
            "MAILRELAY_UPSTREAM": self.upstream,
            "MAILRELAY_UPSTREAM_TLS": "none",
            "MAILRELAY_HOSTNAME": name,
            "MAILRELAY_SPOOL": str(spool),
            # the sandbox's pod network is loopback: clients come from 127.0.0.0/8
            "MAILRELAY_ACCEPT_FROM": ",".join(x for x in (accept, "127.0.0.0/8") if x),
        })
        env.update(self.extra_env)
        args = [rewrite_path(a, mounts) for a in strip_flags(container.get("args") or [], _OVERRIDDEN_FLAGS)]
        token_file = env.get("MAILRELAY_ADMIN_TOKEN_FILE")
        runtime = PodRuntime(name=name, ip=ip, smtp_port=smtp_port, admin_port=admin_port, workdir=workdir,
                             spool=spool, token_file=Path(token_file) if token_file else None)
        self.runtimes[name] = runtime
        runtime.task = asyncio.create_task(self._run(runtime, pod, env, args))

    async def _volumes(self, pod: Obj, container: Obj, workdir: Path) -> dict[str, Path]:
        folders: dict[str, Path] = {}
        for volume in pod["spec"].get("volumes") or []:
            folder = workdir / "volumes" / volume["name"]
            folder.mkdir(parents=True, exist_ok=True)
            folders[volume["name"]] = folder
            source = volume.get("secret") or volume.get("configMap")
            if source is None:
                continue  # emptyDir and anything else: an empty folder
            kind = "secrets" if "secret" in volume else "configmaps"
            name = source.get("secretName") or source.get("name")
            try:
                obj = await self.api.request("GET", f"/api/v1/namespaces/{self.namespace}/{kind}/{name}")
            except ApiError:
                continue
            data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
            data.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
            items = source.get("items")
            paths = {i["key"]: i["path"] for i in items} if items else {k: k for k in data}
            for key, rel in paths.items():
                if key in data:
                    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                    (folder / rel).write_bytes(data[key])
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or []:
            if mount["name"] in folders:
                host = folders[mount["name"]]
                if mount.get("subPath"):
                    host = host / mount["subPath"]
                mounts[mount["mountPath"]] = host
        return mounts

    async def _env_value(self, pod: Obj, item: Obj, ip: str) -> str | None:
        if "value" in item:
            return str(item["value"])
        source = item.get("valueFrom") or {}
        if "fieldRef" in source:
            path = str(source["fieldRef"].get("fieldPath"))
            fields: dict[str, str] = {"metadata.name": pod["metadata"]["name"],
                                      "metadata.namespace": self.namespace, "status.podIP": ip}
            return fields.get(path, "")
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            try:
                obj = await self.api.request(
                    "GET", f"/api/v1/namespaces/{self.namespace}/secrets/{ref['name']}")
            except ApiError:
                return None
            raw = (obj.get("data") or {}).get(ref["key"])
            return base64.b64decode(raw).decode() if raw is not None else None
        return None

    async def _run(self, runtime: PodRuntime, pod: Obj, env: dict[str, str], args: list[str]) -> None:
        """Start the relay, keep its status in the API, restart it if it dies (restartPolicy Always)."""
        full_env = {**os.environ, **env}
        path = f"/api/v1/namespaces/{self.namespace}/pods/{runtime.name}/status"
        runtime.started_at = time.time()
        started_iso = now_iso()
        reported: tuple[bool, int] | None = None
        while not runtime.terminating:
            if runtime.process is None or runtime.process.returncode is not None:
                if runtime.process is not None:
                    runtime.restarts += 1
                    log.warning("relay %s exited with %s; restarting", runtime.name,
                                runtime.process.returncode)
                    await asyncio.sleep(min(5.0, 0.5 * runtime.restarts))
                    if runtime.terminating:
                        break
                with (runtime.workdir / "relay.log").open("ab") as logfile:
                    runtime.process = await asyncio.create_subprocess_exec(
                        *self.relay_command, *args, env=full_env, stdout=logfile, stderr=logfile,
                        stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
            ready = await self._probe(runtime)
            if not runtime.terminating:
                runtime.ready = ready
                runtime.served = runtime.served or ready
            state = (ready, runtime.restarts)
            if state != reported and not runtime.terminating:
                with contextlib.suppress(ApiError, aiohttp.ClientError):
                    await self.api.patch(path, {"status": self._pod_status(runtime, ready, started_iso)})
                    reported = state
            await asyncio.sleep(self.readiness_period)

    def _pod_status(self, runtime: PodRuntime, ready: bool, started: str) -> Obj:
        flag = "True" if ready else "False"
        return {
            "phase": "Running",
            "podIP": runtime.ip,
            "podIPs": [{"ip": runtime.ip}],
            "hostIP": "127.0.0.1",
            "startTime": started,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": now_iso()},
                {"type": "Ready", "status": flag, "lastTransitionTime": now_iso()},
            ],
            "containerStatuses": [{"name": "relay", "ready": ready, "started": True,
                                   "restartCount": runtime.restarts,
                                   "state": {"running": {"startedAt": started}}}],
        }

    async def _probe(self, runtime: PodRuntime) -> bool:
        assert self._http is not None
        try:
            async with self._http.get(f"{runtime.admin_url}/readyz") as response:
                ok = response.status == 200
            token = runtime.token()
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with self._http.get(f"{runtime.admin_url}/status", headers=headers) as response:
                if response.status == 200:
                    runtime.last_status = await response.json()
            return ok
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return False

    async def _terminate(self, runtime: PodRuntime, grace: float, *, finalize: bool) -> None:
        runtime.ready = False
        if self.max_grace_seconds is not None:
            grace = min(grace, self.max_grace_seconds)
        with contextlib.suppress(ApiError, aiohttp.ClientError):
            await self.api.patch(f"/api/v1/namespaces/{self.namespace}/pods/{runtime.name}/status",
                                 {"status": {"conditions": [{"type": "Ready", "status": "False"}]}})
        if runtime.task is not None:
            runtime.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runtime.task
        last = runtime.last_status
        termination = await self._stop_process(runtime, grace)
        termination.was_drained = bool(last.get("drained")) if last else None
        termination.last_status = last
        termination.served = runtime.served
        self.terminations.append(termination)
        log.info("pod %s ended: %s", runtime.name, termination)
        # The pod's volumes (its spool, an emptyDir) go with it; the relay's log is kept for debugging.
        shutil.rmtree(runtime.workdir / "volumes", ignore_errors=True)
        shutil.rmtree(runtime.spool, ignore_errors=True)
        self.runtimes.pop(runtime.name, None)
        if finalize:
            await self._finalize(runtime.name)
        termination.finalized_at = time.time()

    async def _finalize(self, name: str) -> None:
        with contextlib.suppress(ApiError):
            await self.api.request("DELETE",
                                   f"/api/v1/namespaces/{self.namespace}/pods/{name}?gracePeriodSeconds=0")

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
        queue = runtime.spool / "queue"
        return Termination(pod=runtime.name, signalled_at=signalled, exited_at=time.time(),
                           returncode=process.returncode if process else None, killed=killed,
                           spool_left=_count_files(queue if queue.exists() else runtime.spool),
                           was_drained=None, last_status=None)
