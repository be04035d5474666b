"""Every Kubernetes API call the operator makes, and all their error handling, in one place.

The scaling tick, the finalizer and the owned objects' step call `Kube` methods with raw JSON dicts (see
`kubetypes`). This module turns API answers into `None`/exceptions the callers understand: a missing
object is `None` on read and `NotFound` on write, a 409 is `Conflict`, and transient failures (connection
errors, timeouts, 429 and 5xx) are retried with capped exponential backoff and jitter before `ApiError` is
raised. Every request has a timeout. It uses kubernetes_asyncio's ApiClient (never a blocking client),
with JSON in and out, so no call blocks Kopf's event loop. The list of verbs per resource in RBAC_RULES is
what docs/operator-runtime.md and the chart's ClusterRole derive from: add a call here, add its verb
there.

It must not decide anything: no scaling, no drain logic, no manifest building.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import logging
import os
import random
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import aiohttp
import aiohttp.helpers
import kopf
import yarl
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from mailrelay_common import backoff

import mailrelay_operator

logger = logging.getLogger("mailrelay_operator.kube")

JSON = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    """An API resource: group ('' for core), version, plural, and whether it is namespaced."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
            if subresource:
                base += f"/{subresource}"
        return base


PODS = Resource("", "v1", "pods", "Pod")
SECRETS = Resource("", "v1", "secrets", "Secret")
SERVICES = Resource("", "v1", "services", "Service")
EVENTS = Resource("", "v1", "events", "Event")
DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment")
STATEFULSETS = Resource("apps", "v1", "statefulsets", "StatefulSet")
PVCS = Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
PDBS = Resource("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget")
NETWORKPOLICIES = Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy")
MAILRELAYS = Resource("mailrelay.dev", "v1alpha1", "mailrelays", "MailRelay")

BY_KIND: dict[str, Resource] = {
    res.kind: res
    for res in (PODS, SECRETS, SERVICES, EVENTS, DEPLOYMENTS, STATEFULSETS, PVCS, PDBS, NETWORKPOLICIES,
                MAILRELAYS)
}

# What the operator calls, per resource (this module's own calls plus Kopf's watching and patching).
# docs/operator-runtime.md lists the same table; the chart's ClusterRole is derived from it. Kopf (1.45)
# never GETs one object: it lists and watches, then patches. The namespaces rule serves Kopf's namespace
# observer, which lists and watches namespaces only with --namespace (not cluster-wide).
RBAC_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("mailrelay.dev", "mailrelays", ("list", "watch", "patch")),
    ("mailrelay.dev", "mailrelays/status", ("patch",)),
    ("", "pods", ("list", "watch", "patch", "delete")),
    ("", "secrets", ("get", "create", "patch")),
    ("", "services", ("get", "create", "patch")),
    ("", "events", ("create",)),
    ("apps", "deployments", ("get", "list", "watch", "create", "patch")),
    ("apps", "statefulsets", ("get", "list", "watch", "create", "patch")),
    ("", "persistentvolumeclaims", ("list", "watch")),
    ("policy", "poddisruptionbudgets", ("get", "create", "patch")),
    ("networking.k8s.io", "networkpolicies", ("get", "create", "patch")),
    ("", "namespaces", ("list", "watch")),
    ("apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch")),
)

USER_AGENT = f"mailrelay-operator/{mailrelay_operator.__version__}"
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
FIELD_MANAGER = "mailrelay-operator"  # server-side apply of the owned objects
JSON_PATCH = "application/json-patch+json"
RETRYABLE_STATUSES = frozenset({0, 408, 429, 500, 502, 503, 504})


class ApiError(Exception):
    """The API server refused a call (after retries, for transient errors)."""

    def __init__(self, status: int, reason: str, message: str, *, method: str = "", path: str = "") -> None:
        super().__init__(f"{method} {path}: {status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message


class NotFound(ApiError):
    """404: the object (or its resource) does not exist."""


class Conflict(ApiError):
    """409: it already exists, or it changed since it was read (resourceVersion)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried: `attempts` tries in all, backoff doubling from `base`."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 5.0
    timeout: float = 10.0  # per request, seconds

    @property
    def schedule(self) -> backoff.Schedule:
        """The shared schedule: doubling from `base_delay` up to `max_delay`, jitter in its lower half."""
        return backoff.Schedule(base=self.base_delay, factor=2.0, cap=self.max_delay, jitter=0.5)

    def delay(self, attempt: int) -> float:
        """Backoff before retry number `attempt` (1-based): between half the nominal delay and all of it."""
        return backoff.delay(self.schedule, attempt, random.random())


def _error(status: int, body: bytes, method: str, path: str) -> ApiError:
    reason, message = "", body.decode("utf-8", "replace")[:500]
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict):
            reason = str(parsed.get("reason", ""))
            message = str(parsed.get("message", message))[:500]
    except ValueError:
        pass
    cls = NotFound if status == 404 else Conflict if status == 409 else ApiError
    return cls(status, reason, message, method=method, path=path)


class NoCluster(Exception):
    """No usable cluster configuration: the message says where the operator looked and what was wrong."""


async def load_configuration(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """Standard resolution: an explicit kubeconfig, else $KUBECONFIG, else in-cluster, else ~/.kube/config.
    NoCluster when none of them gives a usable configuration."""
    configuration = k8s_client.Configuration()
    explicit = kubeconfig or os.environ.get("KUBECONFIG")
    try:
        if explicit:
            where = f"the kubeconfig {explicit}"
            await k8s_config.load_kube_config(config_file=explicit, context=context,
                                              client_configuration=configuration)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            where = "the in-cluster configuration (the pod's ServiceAccount)"
            k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration)
        else:
            where = f"{Path.home() / '.kube' / 'config'} (no --kubeconfig, KUBECONFIG or in-cluster service)"
            await k8s_config.load_kube_config(config_file=str(Path.home() / ".kube" / "config"),
                                              context=context, client_configuration=configuration)
    except (k8s_config.ConfigException, OSError, ValueError, KeyError) as error:
        raise NoCluster(f"no Kubernetes cluster to talk to: {where}: {error}") from None
    return configuration


class Kube:
    """The operator's API client. One per operator process; share it between handlers."""

    def __init__(self, configuration: Any, retry: RetryPolicy | None = None) -> None:
        self.configuration = configuration
        self.retry = retry or RetryPolicy()
        self._client = k8s_client.ApiClient(configuration=configuration)
        self._client.user_agent = USER_AGENT  # how the API server's audit log names our requests
        resolve_environment_once(self._client)
        # Called with (resource, the object the server returned, whether it was a DELETE) after every
        # successful write: the read cache (`cache.Informer`) keeps its copy at least as new as our writes.
        self.write_listeners: list[Callable[[Resource, JSON, bool], None]] = []

    @classmethod
    async def connect(cls, kubeconfig: str | None = None, context: str | None = None,
                      retry: RetryPolicy | None = None) -> Kube:
        return cls(await load_configuration(kubeconfig, context), retry)

    async def close(self) -> None:
        await self._client.close()

    async def kopf_connection(self) -> kopf.ConnectionInfo:
        """The same credentials for Kopf's own watching and patching."""
        cfg = self.configuration
        header = cfg.get_api_key_with_prefix("BearerToken")
        if asyncio.iscoroutine(header):
            header = await header
        scheme, token = None, None
        if header:
            parts = str(header).split(" ", 1)
            scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
        return kopf.ConnectionInfo(
            server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
            username=cfg.username or None, password=cfg.password or None, scheme=scheme, token=token,
            certificate_path=cfg.cert_file, private_key_path=cfg.key_file,
        )

    # -- the one place where requests are made --

    async def _request(self, method: str, path: str, *, query: Sequence[tuple[str, str]] = (),
                       body: Any = None, content_type: str | None = None) -> JSON:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        last: ApiError | None = None
        for attempt in range(1, self.retry.attempts + 1):
            try:
                response = await self._client.call_api(
                    path, method, path_params={}, query_params=list(query), header_params=headers,
                    body=body, auth_settings=["BearerToken"], _preload_content=False,
                    _request_timeout=self.retry.timeout,
                )
                status = response.status
                raw = await response.read()
                response.release()
            except (TimeoutError, OSError, k8s_client.exceptions.ApiException) as exc:
                status, raw = 0, str(exc).encode()
            if 200 <= status < 300:
                return cast(JSON, json.loads(raw)) if raw else {}
            last = _error(status, raw, method, path)
            if status not in RETRYABLE_STATUSES or attempt == self.retry.attempts:
                raise last
            delay = self.retry.delay(attempt)
            logger.info("retrying %s %s after %s (attempt %d, in %.2fs)",
                        method, path, status, attempt, delay)
            await asyncio.sleep(delay)
        raise last or ApiError(0, "NoAttempt", "no attempt made", method=method, path=path)

    # -- verbs --

    async def get(self, res: Resource, namespace: str | None, name: str) -> JSON | None:
        """The object, or None when it does not exist."""
        try:
            return await self._request("GET", res.path(namespace, name))
        except NotFound:
            return None

    async def list_(self, res: Resource, namespace: str | None,
                    selector: Mapping[str, str] | None = None) -> list[JSON]:
        """Objects of a resource in a namespace (all when None), by equality label selector."""
        items, _ = await self.list_with_version(res, namespace, selector)
        return items

    async def list_with_version(self, res: Resource, namespace: str | None,
                                selector: Mapping[str, str] | None = None) -> tuple[list[JSON], str]:
        """`list_`, and the list's resourceVersion (where a watch of the same objects starts)."""
        query = [("labelSelector", selector_query(selector))] if selector else []
        result = await self._request("GET", res.path(namespace), query=query)
        items = result.get("items") or []
        for item in items:  # lists leave out apiVersion/kind per item
            item.setdefault("apiVersion", res.api_version)
            item.setdefault("kind", res.kind)
        return cast(list[JSON], items), str((result.get("metadata") or {}).get("resourceVersion") or "")

    async def watch(self, res: Resource, namespace: str | None, *, selector: Mapping[str, str] | None,
                    resource_version: str | None, timeout_seconds: int = 300) -> AsyncGenerator[JSON, None]:
        """The watch events (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR) of a resource from a
        resourceVersion, until the server ends the stream (about `timeout_seconds`).

        Not retried here: a broken or refused stream raises `ApiError` (status 0 when it broke), and the
        caller lists again (`cache.Informer`)."""
        path = res.path(namespace)
        query = [("watch", "true"), ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(timeout_seconds))]
        if selector:
            query.append(("labelSelector", selector_query(selector)))
        if resource_version:
            query.append(("resourceVersion", resource_version))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.retry.timeout,
                                        sock_read=timeout_seconds + 30)
        try:
            response = await self._client.call_api(
                path, "GET", path_params={}, query_params=query, header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"], _preload_content=False, _request_timeout=timeout,
            )
        except (TimeoutError, OSError, k8s_client.exceptions.ApiException) as exc:
            raise ApiError(0, "WatchFailed", str(exc), method="WATCH", path=path) from exc
        try:
            if response.status != 200:
                raise _error(response.status, await response.read(), "WATCH", path)
            async for line in response.content:
                if line.strip():
                    event = json.loads(line)
                    if isinstance(event, dict):
                        yield event
        except (TimeoutError, OSError, ValueError, aiohttp.ClientError) as exc:
            broken = f"{type(exc).__name__}: {exc}"
            raise ApiError(0, "WatchBroken", broken, method="WATCH", path=path) from exc
        finally:
            response.release()

    async def create(self, res: Resource, namespace: str | None, body: Mapping[str, Any]) -> JSON:
        """Create; raises Conflict when it already exists."""
        created = await self._request("POST", res.path(namespace), body=dict(body))
        self._written(res, created, deleted=False)
        return created

    async def patch(self, res: Resource, namespace: str | None, name: str,
                    patch: Mapping[str, Any] | list[Any], *, subresource: str | None = None) -> JSON:
        """JSON merge patch (a dict) or JSON patch (a list). Raises NotFound, Conflict."""
        content_type = JSON_PATCH if isinstance(patch, list) else MERGE_PATCH
        patched = await self._request("PATCH", res.path(namespace, name, subresource),
                                      body=patch if isinstance(patch, list) else dict(patch),
                                      content_type=content_type)
        self._written(res, patched, deleted=False)
        return patched

    async def delete(self, res: Resource, namespace: str | None, name: str) -> bool:
        """Delete; False when it was already gone."""
        try:
            answer = await self._request("DELETE", res.path(namespace, name))
        except NotFound:
            return False
        self._written(res, answer, deleted=True)
        return True

    def _written(self, res: Resource, answer: JSON, *, deleted: bool) -> None:
        """Tell the write listeners (the read cache) what the server answered to a write."""
        if answer.get("kind") != res.kind:  # e.g. a Status object
            return
        for listener in self.write_listeners:
            listener(res, answer, deleted)

    # -- composite, still pure I/O --

    async def apply(self, desired: Mapping[str, Any]) -> JSON:
        """Server-side apply of `desired` as field manager FIELD_MANAGER, forcing conflicts: the operator
        owns these fields, and a field it stops setting is removed by the server."""
        res = BY_KIND[str(desired["kind"])]
        meta = desired.get("metadata", {})
        applied = await self._request(
            "PATCH", res.path(meta.get("namespace"), str(meta["name"])),
            query=(("fieldManager", FIELD_MANAGER), ("force", "true")), body=dict(desired),
            content_type=APPLY_PATCH)
        self._written(res, applied, deleted=False)
        return applied

    async def ensure(self, desired: Mapping[str, Any], *, create_only: bool = False,
                     live: JSON | Literal["unknown"] | None = "unknown") -> tuple[JSON, str]:
        """Make the object match `desired` by server-side apply. Idempotent.

        An apply that would change nothing is not sent (`already_applied`): the resync of every owned
        object costs one GET then, not a GET and an apply.

        `create_only`: create the object with its content (e.g. a generated Secret), then never apply the
        content again, only its labels, annotations and owner references: the content was written by a
        create, so the apply manager never owns it and an apply without it leaves it alone. Returns (live
        object, "created"|"patched"|"unchanged"), from the resourceVersion before and after.
        """
        res = BY_KIND[str(desired["kind"])]
        meta = desired.get("metadata", {})
        namespace, name = meta.get("namespace"), str(meta["name"])
        if live == "unknown":  # the caller may pass what it has just read (None: absent)
            live = await self.get(res, namespace, name)
        if create_only:
            if live is None:
                try:
                    return await self.create(res, namespace, desired), "created"
                except Conflict:  # created meanwhile (or by our earlier attempt whose answer was lost)
                    live = await self.get(res, namespace, name)
                    if live is None:
                        raise
            desired = {"apiVersion": desired["apiVersion"], "kind": desired["kind"], "metadata": {
                k: v for k, v in meta.items()
                if k in ("name", "namespace", "labels", "annotations", "ownerReferences")}}
        desired = with_applied_digest(desired)
        if live is not None and already_applied(live, desired):
            return live, "unchanged"
        try:
            applied = await self.apply(desired)
        except ApiError as exc:
            if exc.status != 422 or live is None or "spec" not in desired:
                raise
            # Fields another manager owns stay after an apply: an edit that changed a key of a list
            # (a Service port 25 -> 2500) leaves its entry beside ours, which the server may refuse
            # (two ports named smtp). Replace the spec's top-level fields with a merge patch (lists
            # are replaced whole), then apply again, so that the apply owns the result.
            logger.info("%s %s/%s: apply refused (%s); replacing its spec", res.kind, namespace, name, exc)
            await self.patch(res, namespace, name, {"spec": dict(desired["spec"])})
            applied = await self.apply(desired)
        if live is None:
            return applied, "created"
        same = applied.get("metadata", {}).get("resourceVersion") == live["metadata"].get("resourceVersion")
        return applied, "unchanged" if same else "patched"

    async def post_event(self, involved: Mapping[str, Any], *, reason: str, message: str,
                         type_: str = "Normal", component: str = "mailrelay-operator") -> None:
        """Record a core/v1 Event about `involved`. Best effort: failures are logged, not raised."""
        meta = involved.get("metadata", {})
        now = utc_now_iso()
        namespace = meta.get("namespace") or "default"
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'mailrelay')}.", "namespace": namespace},
            "involvedObject": {"apiVersion": involved.get("apiVersion", MAILRELAYS.api_version),
                               "kind": involved.get("kind", MAILRELAYS.kind), "name": meta.get("name"),
                               "namespace": namespace, "uid": meta.get("uid")},
            "reason": reason, "message": message[:1024], "type": type_,
            "source": {"component": component}, "reportingComponent": component,
            "reportingInstance": os.environ.get("HOSTNAME", component),
            "firstTimestamp": now, "lastTimestamp": now, "eventTime": now, "count": 1, "action": reason,
        }
        try:
            await self.create(EVENTS, namespace, event)
        except ApiError as exc:
            logger.warning("cannot post event %s: %s", reason, exc)


def utc_now_iso() -> str:
    """The present as the API's MicroTime text."""
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def selector_query(selector: Mapping[str, str]) -> str:
    """An equality label selector as the API's `labelSelector` parameter."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def resolve_environment_once(api_client: Any) -> None:
    """Read the proxy settings of the environment once, at start, as kubectl and client-go do.

    kubernetes_asyncio's HTTP session trusts the environment, so aiohttp looks up `HTTPS_PROXY`/`NO_PROXY`
    and reads `~/.netrc` on a worker thread for every request: two thread hand-offs per API call, about a
    fifth of the operator's CPU in the footprint benchmark. This resolves the proxy for the API server's
    address once (an explicit `configuration.proxy` wins) and turns the per-request lookups off. netrc
    credentials are never used for the API server (its requests carry their own Authorization header).
    """
    rest = api_client.rest_client
    if not rest.proxy:
        with contextlib.suppress(LookupError, ValueError):
            proxy, proxy_auth = aiohttp.helpers.get_env_proxy_for_url(yarl.URL(api_client.configuration.host))
            rest.proxy = str(proxy)
            if proxy_auth is not None:
                headers = dict(rest.proxy_headers or {})
                headers["Proxy-Authorization"] = proxy_auth.encode()
                rest.proxy_headers = headers
    # aiohttp allows this attribute to be set (it is in ClientSession.ATTRS). The tests in
    # tests/operator/test_kube_environment.py check that the session stops trusting the environment and
    # that a proxy from it is still honoured.
    rest.pool_manager._trust_env = False


APPLIED_DIGEST_ANNOTATION = "mailrelay.dev/applied-digest"


def with_applied_digest(desired: Mapping[str, Any]) -> JSON:
    """`desired` with an annotation holding a digest of itself (its resourceVersion precondition left
    out): what the operator last applied. Pure."""
    meta = dict(desired.get("metadata") or {})
    content = {**desired, "metadata": {k: v for k, v in meta.items() if k != "resourceVersion"}}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(canonical).hexdigest()[:32]
    meta["annotations"] = {**(meta.get("annotations") or {}), APPLIED_DIGEST_ANNOTATION: digest}
    return {**desired, "metadata": meta}


def already_applied(live: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Would applying `desired` (with its digest) change nothing in `live`? Yes when `live` carries the
    same digest (the operator applied exactly this, so no field it stopped setting lingers) and still
    holds every field of `desired` (nobody changed one since). Pure."""
    annotation = ((desired.get("metadata") or {}).get("annotations") or {}).get(APPLIED_DIGEST_ANNOTATION)
    live_annotation = ((live.get("metadata") or {}).get("annotations") or {}).get(APPLIED_DIGEST_ANNOTATION)
    return annotation is not None and annotation == live_annotation and contains(live, desired)


def contains(live: Any, desired: Any) -> bool:
    """Whether `live` holds `desired`: dict keys recursively, lists item by item (same length). Pure."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(
            k in live and contains(live[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        return (isinstance(live, list) and len(live) == len(desired)
                and all(contains(a, b) for a, b in zip(live, desired, strict=True)))
    return bool(live == desired)


def manager_owns(obj: Mapping[str, Any], path: Sequence[str], manager: str = FIELD_MANAGER) -> bool:
    """Whether `manager`'s Apply entry in `obj`'s managedFields owns the field at `path` (pure)."""
    for entry in (obj.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") != manager or entry.get("operation") != "Apply":
            continue
        node: Any = entry.get("fieldsV1") or {}
        for key in path:
            node = node.get(f"f:{key}") if isinstance(node, Mapping) else None
        if isinstance(node, Mapping):
            return True
    return False
