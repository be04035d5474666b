"""Emulated Kubernetes API server for tests and the demo: kmock's KubernetesEmulator, extended.

It serves, on a loopback port, every resource the mailrelay operator touches, writes a kubeconfig that
points at it (dummy token), and adds the few API-server behaviours the operator and a simulated control
plane rely on and that plain kmock 0.8 lacks. Each extension below is deliberate and small:

1. Metadata on create: `metadata.uid`, `creationTimestamp`, `generation: 1`, `resourceVersion`, the
   namespace from the URL, and `generateName` turned into a name (kmock stores exactly what was posted,
   so two nameless Events would otherwise collide with a 409).
2. `resourceVersion`: a global counter, bumped on every write and carried in watch events. A merge patch
   that names `metadata.resourceVersion` different from the stored one is answered 409 Conflict, as the
   real API server does (optimistic concurrency); a JSON patch whose `test` of `/metadata/resourceVersion`
   fails is answered 422, as there. `metadata.generation` grows when a write changes `spec`.
3. Label selectors (`?labelSelector=`) on list and watch: equality (`=`, `==`, `!=`), set-based (`in`,
   `notin`), existence (`key`, `!key`). kmock ignores them. A watch filters events by the object's labels
   at the time of the event (the real server would also send a synthetic DELETED when an object stops
   matching; this one does not).
4. Garbage collection by `ownerReferences`: when an object is finally removed, every object that names its
   uid as an owner is deleted too (or marked for deletion when it has finalizers), recursively, as the
   garbage collector does with background propagation.
5. Graceful pod deletion (`graceful_pod_deletion=True`): `DELETE` of a pod only sets
   `deletionTimestamp`/`deletionGracePeriodSeconds`; the simulated kubelet removes it for good with a second
   `DELETE ...?gracePeriodSeconds=0` (or `Emulator.remove`). Off by default: then pods vanish at once.
6. Namespace URLs: kmock 0.8 parses `/api/v1/namespaces` and `/api/v1/namespaces/NAME` as a namespace
   prefix and fails with 500. Importing this module wraps kmock's path parser so that those paths mean the
   `namespaces` resource itself (all other paths are parsed by kmock unchanged).

7. Lean mode (`lean=True`, for the demo and benchmarks): kmock keeps every request and matches each new
   request against the whole request log, so a long run slows down quadratically (measured: 30 ms per
   GET after a few thousand requests, 140 ms later). Lean mode keeps only the request being served and
   the latest version of each object. Then `emulator.requests`/history-based assertions and sliced
   reactions (`kmock[...][:2] << 500`) no longer count past requests: use it only without those.

Not emulated (kmock limits that remain): strategic-merge semantics (lists in a patch replace the stored
list, like a JSON merge patch; JSON patches are supported), PUT (replace) requests, field selectors,
server-side apply, admission (CRD schema, defaults, CEL) and the `/scale` subresource's Scale object.

This module is a test/demo harness: it must never be imported by `relay/` or `operator/`, and it never
talks to anything but loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime
import itertools
import json
import re
import secrets
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import attrs
import kmock
from kmock._internal import dicts as kmock_dicts
from kmock._internal import parsing as kmock_parsing
from mailrelay_operator import kube

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class Resource(kube.Resource):
    """One API resource served by the emulator: the operator's own `kube.Resource` (its URL paths), plus
    what discovery announces about it."""

    subresources: tuple[str, ...] = ()

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def key(self) -> str:
        """The kmock resource key: `group/version/plural`, or `v1/plural` for the core group."""
        return f"{self.group}/{self.version}/{self.plural}" if self.group else f"{self.version}/{self.plural}"


NAMESPACES = Resource("", "v1", "namespaces", "Namespace", False)
PODS = Resource("", "v1", "pods", "Pod", True, subresources=("status",))
SECRETS = Resource("", "v1", "secrets", "Secret", True)
SERVICES = Resource("", "v1", "services", "Service", True, subresources=("status",))
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap", True)
EVENTS = Resource("", "v1", "events", "Event", True)
EVENTS_V1 = Resource("events.k8s.io", "v1", "events", "Event", True)
DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment", True, subresources=("status", "scale"))
REPLICASETS = Resource("apps", "v1", "replicasets", "ReplicaSet", True, subresources=("status", "scale"))
PDBS = Resource("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True, subresources=("status",))
NETWORKPOLICIES = Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True)
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease", True)
CRDS = Resource(
    "apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False,
    subresources=("status",),
)
MAILRELAYS = Resource(
    "mailrelay.dev", "v1alpha1", "mailrelays", "MailRelay", True, subresources=("status", "scale")
)

RESOURCES: tuple[Resource, ...] = (
    NAMESPACES, PODS, SECRETS, SERVICES, CONFIGMAPS, EVENTS, EVENTS_V1, DEPLOYMENTS, REPLICASETS, PDBS,
    NETWORKPOLICIES, LEASES, CRDS, MAILRELAYS,
)
SHORT_NAMES = {"mailrelays": {"mr"}, "pods": {"po"}, "services": {"svc"}, "deployments": {"deploy"},
               "namespaces": {"ns"}, "poddisruptionbudgets": {"pdb"}, "networkpolicies": {"netpol"}}


def _now_iso() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- extension 6: namespace URLs ------------------------------------------------------------------

_kmock_parse_path = kmock_parsing.parse_path


def _parse_path(path: str) -> Any:
    parts = path.strip("/").split("/")
    rest: list[str] | None = None
    group = version = ""
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    if rest and rest[0] == "namespaces" and (
            len(rest) <= 2 or (len(rest) == 3 and rest[2] in ("status", "finalize"))):
        return kmock_parsing.ParsedPath(group=group, version=version, plural="namespaces", namespace=None,
                                        name=rest[1] if len(rest) >= 2 else None,
                                        subresource=rest[2] if len(rest) == 3 else None)
    return _kmock_parse_path(path)


if getattr(kmock_parsing.parse_path, "__module__", "") != __name__:
    kmock_parsing.parse_path = _parse_path


# --- label selectors -------------------------------------------------------------------------------

_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(selector: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts: list[str] = []
    depth = 0
    current = ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part.strip() for part in parts if part.strip()]


def selector_matches(selector: str, labels: Mapping[str, str] | None) -> bool:
    """Whether `labels` satisfy a Kubernetes label selector string. Raises ValueError when malformed."""
    labels = labels or {}
    for requirement in _split_selector(selector):
        set_match = _SET_RE.match(requirement)
        if set_match:
            key, operator, raw_values = set_match.groups()
            values = {value.strip() for value in raw_values.split(",") if value.strip()}
            if operator == "in" and labels.get(key) not in values:
                return False
            if operator == "notin" and key in labels and labels[key] in values:
                return False
        elif "!=" in requirement:
            key, value = (side.strip() for side in requirement.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in requirement:
            key, value = (side.strip() for side in re.split(r"==?", requirement, maxsplit=1))
            if labels.get(key) != value:
                return False
        elif requirement.startswith("!"):
            if requirement[1:].strip() in labels:
                return False
        elif re.fullmatch(r"[A-Za-z0-9./_-]+", requirement):
            if requirement not in labels:
                return False
        else:
            raise ValueError(f"unparsable label selector requirement: {requirement!r}")
    return True


# --- the emulator ----------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator with the extensions listed in the module docstring."""

    graceful_pod_deletion: bool = False
    lean: bool = False  # extension 7: forget request and object histories (long runs, benchmarks)
    _rv_counter: Any = attrs.field(factory=lambda: itertools.count(1), init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for res in RESOURCES:
            self.resources[res.key] = kmock.ResourceInfo(
                kind=res.kind, singular=res.singular, namespaced=res.namespaced, verbs=set(ALL_VERBS),
                subresources=set(res.subresources), shortnames=SHORT_NAMES.get(res.plural, set()),
            )

    # -- helpers usable by tests and the simulated control plane --

    def peek(self, resource: Resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The stored object (a deep copy), or None when absent or deleted."""
        objects: Any = self.objects
        key = (kmock.resource(resource.key), namespace if resource.namespaced else None, name)
        if key not in objects or objects[key].deleted:
            return None
        result: dict[str, Any] = copy.deepcopy(objects[key].raw)
        return result

    def peek_all(self, resource: Resource, namespace: str | None = None,
                 selector: str | None = None) -> list[dict[str, Any]]:
        """Stored objects of a resource (deep copies), optionally by namespace and label selector."""
        wanted = kmock.resource(resource.key)
        result: list[dict[str, Any]] = []
        objects: Any = self.objects
        for (res, ns, _name), obj in list(objects.items()):
            if res != wanted or obj.deleted or (namespace is not None and ns != namespace):
                continue
            raw = obj.raw
            if selector and not selector_matches(selector, raw.get("metadata", {}).get("labels")):
                continue
            result.append(copy.deepcopy(raw))
        return result

    async def remove(self, resource: Resource, namespace: str | None, name: str) -> bool:
        """Remove an object for good at once (ignoring finalizers and grace), with a DELETED event."""
        res = kmock.resource(resource.key)
        key = (res, namespace if resource.namespaced else None, name)
        objects: Any = self.objects
        async with self._lock:
            if key not in objects or objects[key].deleted:
                return False
            raw: dict[str, Any] = objects[key].raw
            objects[key].delete()
            await self._buses[res].put({"type": "DELETED", "object": raw})
        await self._collect_garbage(raw.get("metadata", {}).get("uid"))
        return True

    # -- request handling --

    def _next_rv(self) -> str:
        return str(next(self._rv_counter))

    def _namespaced(self, request: kmock.Request) -> bool:
        for res in RESOURCES:
            if request.resource == kmock.resource(res.key):
                return res.namespaced
        return request.namespace is not None

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        gone_uid: str | None = None
        watched_key: Any = None
        objects: Any = self.objects
        if self.lean:
            del self._requests[:-1]  # only the request being served: reactions match in O(1)
        if request.resource is not None and request.action is not None:
            action = request.action
            if action == kmock.action.CREATE and isinstance(request.data, dict):
                self._prepare_create(request)
            elif action == kmock.action.UPDATE and request.name is not None:
                self._prepare_update(request)
            elif action == kmock.action.DELETE and request.name is not None:
                response = await self._graceful_delete(request)
                if response is not None:
                    return response
            if action in (kmock.action.UPDATE, kmock.action.DELETE) and request.name is not None:
                watched_key = (request.resource, request.namespace, request.name)
                if watched_key in objects and not objects[watched_key].deleted:
                    gone_uid = objects[watched_key].raw.get("metadata", {}).get("uid")
        response = await super()._handle(request)
        if self.lean and request.resource is not None and request.action in (
                kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE):
            self._trim_history(request)
        if gone_uid is not None and watched_key is not None and objects[watched_key].deleted:
            await self._collect_garbage(gone_uid)
        return response

    def _prepare_create(self, request: kmock.Request) -> None:
        data: dict[str, Any] = request.data
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{secrets.token_hex(3)}"
        if request.namespace and self._namespaced(request):
            meta.setdefault("namespace", request.namespace)
        objects: Any = self.objects
        key = (request.resource, request.namespace or meta.get("namespace"), meta.get("name"))
        if key in objects and not objects[key].deleted:
            return  # kmock answers 409; keep the stored object's metadata untouched
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now_iso()
        meta["generation"] = 1
        meta["resourceVersion"] = self._next_rv()
        meta.pop("deletionTimestamp", None)

    def _prepare_update(self, request: kmock.Request) -> None:
        objects: Any = self.objects
        key = (request.resource, request.namespace, request.name)
        if key not in objects or objects[key].deleted:
            return  # kmock answers 404
        current = objects[key].raw
        plural = request.resource.plural if request.resource is not None else "objects"
        meta = current.get("metadata", {})
        data = request.data
        rv = self._next_rv()
        if isinstance(data, dict):
            wanted_rv = (data.get("metadata") or {}).get("resourceVersion")
            if wanted_rv is not None and str(wanted_rv) != str(meta.get("resourceVersion")):
                raise kmock.KubernetesError(
                    status=409, reason="Conflict",
                    message=(f'Operation cannot be fulfilled on {plural} "{request.name}": '
                             "the object has been modified; please apply your changes to the latest version "
                             "and try again"))
            new_meta: dict[str, Any] = {"resourceVersion": rv}
            if "spec" in data and not request.subresource:
                merged = kmock_dicts.patch_dict(current, {"spec": data["spec"]})
                if merged.get("spec") != current.get("spec"):
                    new_meta["generation"] = int(meta.get("generation", 1)) + 1
            data.setdefault("metadata", {})
            if isinstance(data["metadata"], dict):
                data["metadata"].update(new_meta)
        elif isinstance(data, list):
            for op in data:
                if (isinstance(op, dict) and op.get("op") == "test"
                        and op.get("path") == "/metadata/resourceVersion"
                        and str(op.get("value")) != str(meta.get("resourceVersion"))):
                    # As the real API server: a failed JSON-patch `test` is 422 (Kopf relies on it).
                    raise kmock.KubernetesError(status=422, reason="Invalid",
                                                message="testing value /metadata/resourceVersion failed")
            touches_spec = any(isinstance(op, dict) and str(op.get("path", "")).startswith("/spec")
                               for op in data)
            data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
            if touches_spec and not request.subresource:
                data.append({"op": "add", "path": "/metadata/generation",
                             "value": int(meta.get("generation", 1)) + 1})

    def _trim_history(self, request: kmock.Request) -> None:
        objects: Any = self.objects
        name = request.name
        if name is None and isinstance(request.data, dict):
            name = (request.data.get("metadata") or {}).get("name")
        key = (request.resource, request.namespace, name)
        if key in objects and not objects[key].deleted and len(objects[key].history) > 1:
            objects[key].history = objects[key].history[-1:]

    async def _graceful_delete(self, request: kmock.Request) -> aiohttp.web.StreamResponse | None:
        """Handle pod deletion with a grace period; None lets kmock delete as usual."""
        if request.resource != kmock.resource(PODS.key):
            return None
        objects: Any = self.objects
        key = (request.resource, request.namespace, request.name)
        if key not in objects or objects[key].deleted:
            return None  # kmock answers 404
        body = request.data if isinstance(request.data, dict) else {}
        grace_raw = request.params.get("gracePeriodSeconds", body.get("gracePeriodSeconds"))
        current = objects[key].raw
        meta = current.get("metadata", {})
        immediate = grace_raw is not None and int(grace_raw) == 0
        if immediate or not self.graceful_pod_deletion:
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                await self.remove(PODS, request.namespace, request.name or "")
                return aiohttp.web.json_response(current)
            return None
        if meta.get("deletionTimestamp"):
            return aiohttp.web.json_response(current)
        grace = int(grace_raw) if grace_raw is not None else int(
            current.get("spec", {}).get("terminationGracePeriodSeconds", 30))
        async with self._lock:
            objects[key].patch({"metadata": {
                "deletionTimestamp": _now_iso(), "deletionGracePeriodSeconds": grace,
                "resourceVersion": self._next_rv()}})
            raw = objects[key].raw
            await self._buses[request.resource].put({"type": "MODIFIED", "object": raw})
        return aiohttp.web.json_response(raw)

    async def _collect_garbage(self, owner_uid: str | None) -> None:
        """Delete (recursively) every object owned by `owner_uid`."""
        if not owner_uid:
            return
        pending = [owner_uid]
        while pending:
            uid = pending.pop()
            async with self._lock:
                objects: Any = self.objects
                for (res, _ns, _name), obj in list(objects.items()):
                    if obj.deleted:
                        continue
                    raw = obj.raw
                    meta = raw.get("metadata", {})
                    refs = meta.get("ownerReferences") or []
                    if not any(ref.get("uid") == uid for ref in refs):
                        continue
                    if meta.get("finalizers"):
                        if not meta.get("deletionTimestamp"):
                            obj.patch({"metadata": {"deletionTimestamp": _now_iso(),
                                                    "resourceVersion": self._next_rv()}})
                            await self._buses[res].put({"type": "MODIFIED", "object": obj.raw})
                        continue
                    obj.delete()
                    await self._buses[res].put({"type": "DELETED", "object": raw})
                    if meta.get("uid"):
                        pending.append(meta["uid"])

    async def _serve_list(self, request: kmock.Request) -> Any:
        result: Any = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            result["items"] = [item for item in result["items"]
                               if selector_matches(selector, item.get("metadata", {}).get("labels"))]
        result["metadata"] = {"resourceVersion": str(next(self._rv_counter))}
        return result

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        selector = request.params.get("labelSelector")
        async for item in super()._serve_watch(request):
            if selector and isinstance(item, dict) and isinstance(item.get("object"), dict):
                labels = item["object"].get("metadata", {}).get("labels")
                if not selector_matches(selector, labels):
                    continue
            yield item


# --- running it ------------------------------------------------------------------------------------


def write_kubeconfig(path: Path, url: str, *, namespace: str = "default",
                     token: str = "emulated-token") -> Path:
    """Write a kubeconfig (JSON is valid YAML) whose only context points at `url` with a dummy token."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubeemu", "cluster": {"server": url}}],
        "users": [{"name": "kubeemu", "user": {"token": token}}],
        "contexts": [{"name": "kubeemu", "context": {"cluster": "kubeemu", "user": "kubeemu",
                                                      "namespace": namespace}}],
        "current-context": "kubeemu",
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


@dataclass
class Running:
    """A started emulator: the kmock handler (with its objects), its URL and the kubeconfig written."""

    emulator: Emulator
    url: str
    port: int
    kubeconfig: Path

    async def ensure_namespace(self, name: str) -> None:
        """Create a Namespace object (idempotent): watchers of all namespaces see it."""
        if self.emulator.peek(NAMESPACES, None, name) is None:
            async with aiohttp.ClientSession() as session, session.post(
                f"{self.url}{NAMESPACES.path()}",
                json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
            ) as response:
                if response.status not in (200, 201, 409):
                    raise RuntimeError(f"cannot create namespace {name}: {response.status}")


@contextlib.asynccontextmanager
async def serve(*, host: str = "127.0.0.1", port: int = 0, kubeconfig: Path | None = None,
                namespaces: Iterable[str] = ("default",),
                graceful_pod_deletion: bool = False, lean: bool = False) -> AsyncIterator[Running]:
    """Start the emulator on `host:port` (0 = any free port) and write a kubeconfig for it.

    `kubeconfig` defaults to a temporary file removed on exit. The listed namespaces are created.
    """
    with contextlib.ExitStack() as stack:
        if kubeconfig is None:
            tmpdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="kubeemu-"))
            kubeconfig = Path(tmpdir) / "kubeconfig"
        emulator = Emulator(graceful_pod_deletion=graceful_pod_deletion, lean=lean)
        async with emulator, kmock.Server(emulator, host=host, port=port or None) as server:
            url = f"http://{host}:{server.port}"
            write_kubeconfig(kubeconfig, url)
            running = Running(emulator=emulator, url=url, port=server.port, kubeconfig=kubeconfig)
            for namespace in namespaces:
                await running.ensure_namespace(namespace)
            yield running


async def _main_async(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with serve(host=args.host, port=args.port, kubeconfig=Path(args.kubeconfig),
                     namespaces=args.namespace or ["default"],
                     graceful_pod_deletion=args.graceful_pod_deletion, lean=args.lean) as running:
        print(json.dumps({"url": running.url, "kubeconfig": str(running.kubeconfig)}), flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """`python -m mailrelay_sandbox.kubeemu`: serve until SIGINT/SIGTERM; prints its URL as JSON."""
    parser = argparse.ArgumentParser(prog="kubeemu", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--kubeconfig", required=True, help="where to write the kubeconfig")
    parser.add_argument("--namespace", action="append", help="namespace to create (repeatable)")
    parser.add_argument("--graceful-pod-deletion", action="store_true")
    parser.add_argument("--lean", action="store_true", help="keep no request/object history (long runs)")
    args = parser.parse_args(argv)
    asyncio.run(_main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
