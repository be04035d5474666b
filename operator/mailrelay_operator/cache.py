"""A watch-fed read cache of the objects the scaling loop reads on every tick: the relays' Deployments and
pods. Without it, each MailRelay tick made a GET and a LIST; with 200 MailRelays at 5 s that is 80 requests
a second to the API server and about a fifth of the operator's CPU (bench/operator_footprint.py).

- `Store` holds one resource's objects, newest version of each. It is pure (no I/O, no clock): the list
  that starts a watch replaces it, watch events and our own writes (`offer`) update it, and a version
  never replaces a newer one, so a read after our write sees at least that write (a scale-in step is never
  planned from a Deployment older than the last patch we made).
- `Informer` runs list-then-watch for one resource in one namespace (or all), with a label selector, and
  lists again when the stream breaks, ends with 410 Gone, or is refused. While it is not in sync (before
  the first list, after a failure) `Cache` reads from the API instead, so a broken watch costs requests,
  never correctness.
- `Cache` is what reconcile reads through (`Reader`): `get` and `list_` with `kube.Kube`'s signatures. It
  hands out its own objects, not copies: callers must not change them (reconcile and the pure modules
  only read; tests/operator/test_tick.py checks that the cache still equals the server after each tick).

It must not decide anything (no scaling or drain logic) and makes no API call except through `kube`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from mailrelay_operator import kube, metrics

logger = logging.getLogger("mailrelay_operator.cache")

JSON = dict[str, Any]
Key = tuple[str | None, str]  # (namespace, name)


class Reader(Protocol):
    """Where reconcile reads Deployments and pods: the API (`kube.Kube`) or this cache (`Cache`)."""

    async def get(self, res: kube.Resource, namespace: str | None, name: str) -> JSON | None: ...

    async def list_(self, res: kube.Resource, namespace: str | None,
                    selector: Mapping[str, str] | None = None) -> list[JSON]: ...


def _version(obj: Mapping[str, Any]) -> int | None:
    text = (obj.get("metadata") or {}).get("resourceVersion")
    try:
        return int(str(text))
    except ValueError:
        return None


def newer_or_same(incoming: Mapping[str, Any], cached: Mapping[str, Any]) -> bool:
    """Whether `incoming` may replace `cached`. resourceVersions are opaque to clients, but every API server
    (etcd's revision) and the emulator issue them as growing integers; when either is not an integer the
    incoming one wins, as a plain informer would do."""
    new, old = _version(incoming), _version(cached)
    return new is None or old is None or new >= old


def matches(labels: Mapping[str, str] | None, selector: Mapping[str, str]) -> bool:
    """Equality label selector match."""
    labels = labels or {}
    return all(labels.get(key) == value for key, value in selector.items())


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace"), str(meta.get("name"))


def _slim(obj: JSON) -> JSON:
    """Drop what the operator never reads and that costs memory (managedFields: often half a pod)."""
    meta = obj.get("metadata")
    if isinstance(meta, dict) and "managedFields" in meta:
        obj = {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
    return obj


class Store:
    """The newest known version of each object of one resource. Pure: no I/O.

    Deletions leave a tombstone (the version of the deletion), and a list leaves its version as a floor,
    so that a late answer to one of our writes cannot bring back an object deleted after it: an object
    absent from a list made at version V, offered at a version <= V, was deleted in between.
    """

    MAX_TOMBSTONES = 4096

    def __init__(self, index_label: str | None = None) -> None:
        self.objects: dict[Key, JSON] = {}
        # Keys by (namespace, value of `index_label`): a list by that label (a MailRelay's pods, by
        # instance) reads its few objects, not the whole store.
        self.index_label = index_label
        self._index: dict[tuple[str | None, str | None], set[Key]] = {}
        self.tombstones: dict[Key, JSON] = {}  # key -> metadata of the deletion, oldest first
        self.floor: JSON = {}  # metadata with the resourceVersion of the last list

    def _current(self, key: Key) -> Mapping[str, Any] | None:
        held = self.objects.get(key)
        if held is not None:
            return held
        tombstone = self.tombstones.get(key)
        return {"metadata": tombstone} if tombstone is not None else None

    def _accepts(self, key: Key, obj: Mapping[str, Any]) -> bool:
        current = self._current(key)
        if current is not None:
            return newer_or_same(obj, current)
        # Unknown here: new, unless a list made at or after its version did not have it.
        floor, version = _version({"metadata": self.floor}), _version(obj)
        return floor is None or version is None or version > floor

    def _index_key(self, key: Key, obj: Mapping[str, Any] | None) -> tuple[str | None, str | None] | None:
        if self.index_label is None or obj is None:
            return None
        return key[0], ((obj.get("metadata") or {}).get("labels") or {}).get(self.index_label)

    def _put(self, key: Key, obj: JSON | None) -> None:
        """Store `obj` under `key` (None: remove it), keeping the index in step."""
        old = self._index_key(key, self.objects.get(key))
        if old is not None:
            keys = self._index.get(old)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._index[old]
        if obj is None:
            self.objects.pop(key, None)
            return
        self.objects[key] = obj
        new = self._index_key(key, obj)
        if new is not None:
            self._index.setdefault(new, set()).add(key)

    def _bury(self, key: Key, obj: Mapping[str, Any]) -> None:
        self._put(key, None)
        self.tombstones.pop(key, None)
        self.tombstones[key] = {"resourceVersion": (obj.get("metadata") or {}).get("resourceVersion")}
        while len(self.tombstones) > self.MAX_TOMBSTONES:
            del self.tombstones[next(iter(self.tombstones))]

    def replace(self, items: Iterable[JSON], version: str = "") -> None:
        """A fresh list made at `version`: it becomes the content, except where we hold a newer version."""
        fresh: dict[Key, JSON] = {}
        for item in items:
            key = _key(item)
            held = self.objects.get(key)
            fresh[key] = held if held is not None and not newer_or_same(item, held) else _slim(item)
        listed_at = _version({"metadata": {"resourceVersion": version}})
        for key, held in self.objects.items():  # written by us after the list was made: still there
            held_at = _version(held)
            if key not in fresh and listed_at is not None and held_at is not None and held_at > listed_at:
                fresh[key] = held
        self.objects, self._index = {}, {}
        for key, obj in fresh.items():
            self._put(key, obj)
        self.floor = {"resourceVersion": version} if version else {}
        self.tombstones = {key: meta for key, meta in self.tombstones.items() if key not in fresh}

    def apply(self, event_type: str, obj: JSON) -> None:
        """A watch event (ADDED, MODIFIED, DELETED); versions older than the one held are ignored."""
        key = _key(obj)
        current = self._current(key)
        if current is not None and not newer_or_same(obj, current):
            return
        if event_type == "DELETED":
            self._bury(key, obj)
        elif event_type in ("ADDED", "MODIFIED"):
            self.tombstones.pop(key, None)
            self._put(key, _slim(obj))

    def offer(self, obj: JSON, *, deleted: bool = False, now_iso: str = "") -> None:
        """What the API server answered to one of our writes. A DELETE's answer is kept as being deleted
        (`deletionTimestamp`, set to `now_iso` when the answer has none) until the watch says it is gone."""
        if deleted and not (obj.get("metadata") or {}).get("deletionTimestamp"):
            obj = {**obj, "metadata": {**(obj.get("metadata") or {}), "deletionTimestamp": now_iso}}
        key = _key(obj)
        if self._accepts(key, obj):
            self.tombstones.pop(key, None)
            self._put(key, _slim(obj))

    def get(self, namespace: str | None, name: str) -> JSON | None:
        return self.objects.get((namespace, name))

    def list_(self, namespace: str | None, selector: Mapping[str, str]) -> list[JSON]:
        if self.index_label is not None and namespace is not None and self.index_label in selector:
            keys = sorted(self._index.get((namespace, selector[self.index_label])) or ())
            candidates = [self.objects[key] for key in keys]
        else:
            candidates = [obj for (ns, _), obj in sorted(self.objects.items())
                          if namespace is None or ns == namespace]
        return [obj for obj in candidates if matches((obj.get("metadata") or {}).get("labels"), selector)]


class Informer:
    """List, then watch, one resource in one namespace (None: all) by label selector, into a `Store`."""

    def __init__(self, client: kube.Kube, res: kube.Resource, namespace: str | None,
                 selector: Mapping[str, str], *, index_label: str | None = None, watch_timeout: int = 300,
                 retry_delay: float = 1.0, max_retry_delay: float = 30.0) -> None:
        self.client = client
        self.res = res
        self.namespace = namespace
        self.selector = dict(selector)
        self.store = Store(index_label)
        self.synced = False
        self.watch_timeout = watch_timeout
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.restarts = 0  # lists after the first: a broken, expired or refused watch

    def covers(self, res: kube.Resource, namespace: str | None, selector: Mapping[str, str] | None) -> bool:
        """Whether every object a list by `selector` in `namespace` could return is in this store (for a
        read by name, `selector` None: whether the object would be here if it carries our labels)."""
        return (res == self.res and (self.namespace is None or namespace == self.namespace)
                and (selector is None
                     or all(selector.get(key) == value for key, value in self.selector.items())))

    def on_write(self, res: kube.Resource, answer: JSON, deleted: bool) -> None:
        """`kube.Kube.write_listeners` hook: keep our own writes, so reads never go back in time."""
        meta = answer.get("metadata") or {}
        if res == self.res and (self.namespace is None or meta.get("namespace") == self.namespace) \
                and matches(meta.get("labels"), self.selector):
            self.store.offer(answer, deleted=deleted, now_iso=kube.utc_now_iso())

    async def run(self) -> None:
        """Keep the store in sync until cancelled."""
        failures = 0
        while True:
            try:
                items, version = await self.client.list_with_version(self.res, self.namespace, self.selector)
                self.store.replace(items, version)
                self.synced = True
                failures = 0
                await self._watch(version)
            except Exception as exc:  # whatever broke (API, stream, a malformed event): relist
                self.synced = False
                failures += 1
                delay = min(self.max_retry_delay, self.retry_delay * 2 ** min(failures - 1, 10))
                logger.warning("cache of %s in %s out of sync (%s); reading from the API server, "
                               "listing again in %.0fs", self.res.plural, self.namespace or "all namespaces",
                               exc, delay)
                await asyncio.sleep(delay)
            self.restarts += 1
            metrics.CACHE_RELISTS.labels(self.res.plural).inc()

    async def _watch(self, version: str) -> None:
        """Follow the stream from `version`, and again from the last version seen each time the server
        ends it; return when the version expired (410 Gone: list again)."""
        while True:
            stream = self.client.watch(self.res, self.namespace, selector=self.selector,
                                       resource_version=version, timeout_seconds=self.watch_timeout)
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    kind, obj = str(event.get("type")), event.get("object")
                    if not isinstance(obj, dict):
                        continue
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            return
                        raise kube.ApiError(int(obj.get("code") or 0), str(obj.get("reason", "")),
                                            str(obj.get("message", "")), method="WATCH", path=self.res.plural)
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if kind != "BOOKMARK":
                        self.store.apply(kind, obj)


class Cache:
    """A `Reader`: from an informer that covers the read and is in sync, else from the API server."""

    def __init__(self, client: kube.Kube, informers: Sequence[Informer]) -> None:
        self.client = client
        self.informers = list(informers)
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def of(cls, client: kube.Kube, resources: Sequence[kube.Resource], namespaces: Sequence[str | None],
           selector: Mapping[str, str], **informer_options: Any) -> Cache:
        """Informers for every resource in every namespace (None: one cluster-wide informer each)."""
        return cls(client, [Informer(client, res, namespace, selector, **informer_options)
                            for res in resources for namespace in namespaces])

    def start(self) -> None:
        for informer in self.informers:
            self.client.write_listeners.append(informer.on_write)
            self._tasks.append(asyncio.create_task(informer.run(), name=f"cache-{informer.res.plural}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for informer in self.informers:
            with contextlib.suppress(ValueError):
                self.client.write_listeners.remove(informer.on_write)

    @property
    def synced(self) -> bool:
        return all(informer.synced for informer in self.informers)

    def _informer(self, res: kube.Resource, namespace: str | None,
                  selector: Mapping[str, str] | None) -> Informer | None:
        for informer in self.informers:
            if informer.synced and informer.covers(res, namespace, selector):
                return informer
        return None

    async def get(self, res: kube.Resource, namespace: str | None, name: str) -> JSON | None:
        """The object, or None when it does not exist. Read-only: the cache's own copy, not a duplicate
        (copying every pod on every tick cost more CPU than the API call it replaces)."""
        informer = self._informer(res, namespace, None)
        found = informer.store.get(namespace, name) if informer is not None else None
        if found is None:
            # Not cached, or not carrying our labels (yet): the store is a partial view, so "absent" is
            # the API server's answer to give.
            return await self.client.get(res, namespace, name)
        return found

    async def list_(self, res: kube.Resource, namespace: str | None,
                    selector: Mapping[str, str] | None = None) -> list[JSON]:
        """Objects by equality label selector. Read-only, as with `get`."""
        informer = self._informer(res, namespace, selector or {})
        if informer is None:
            return await self.client.list_(res, namespace, selector)
        return informer.store.list_(namespace, selector or {})
