"""A watch-fed read cache of the objects the scaling loop reads on every tick: the relays' Deployments and
pods. Without it, each MailRelay tick made a GET and a LIST; with 200 MailRelays at 5 s that is 80 requests
a second to the API server and about a fifth of the operator's CPU (bench/operator_footprint.py).

- `Store` holds one resource's objects. It is pure (no I/O; the time comes from the caller). It treats
  resourceVersions as the API contract says, as opaque strings: it never parses or orders them, it only
  tells whether two are equal. As in client-go's informers, the list that starts a watch replaces the
  content and watch events are applied in the order the server sends them (a watch delivers every change
  of what it covers, in the server's order); nothing is ordered by resourceVersion.
  On top of that, our own writes are read back at once (read-your-writes: a scale-in step is never
  planned from a Deployment older than our last patch of it). The server's answer to one of our writes,
  at version R, replaces the object and holds it: the watch events about that object that arrive before
  the event of version R itself were made by the server before R (the watch is in the server's order),
  so they are skipped; from R's event on, events apply again (with several answers held, from the event
  of the last one). A hold also ends with the deletion of that object (same uid: nothing written to an
  object is newer than its deletion) and with a relist (the list carries R or something newer, or the
  watch that follows it brings R). An answer is dropped when the watch or a list already delivered its
  version (the store holds it or something newer), or when the store saw that object (uid) deleted or
  leave the label selector.
  Equality cannot settle one case: an answer processed after a relist for a write the server made before
  that list, when someone else changed the object in between (R never comes again). So a hold expires
  after `hold_seconds` (30 s) and the watch's view wins; until then reads may show that older version.
  It takes a write in flight across a relist (which only follows a broken watch) and a concurrent write
  by someone else; client-go has no read-your-writes at all.
- `Informer` runs list-then-watch for one resource in one namespace (or all), with a label selector. It
  asks for watch bookmarks and resumes each watch from the last version it saw, bookmarks included, as
  client-go's reflector does: a watch that the server ends after its `timeoutSeconds` resumes without a
  list. It lists again when the version expired (410 Gone, in the stream or as the answer) and when the
  stream breaks or is refused. While it is not in sync (before the first list, after a failure) `Cache`
  reads from the API instead, so a broken watch costs requests, never correctness.
- `Cache` is what the scaling tick reads through (`Reader`): `get` and `list_` with `kube.Kube`'s
  signatures. It hands out its own objects, not copies: callers must not change them (the tick and the
  pure modules only read; tests/operator/test_tick.py checks that the cache still equals the server after
  each tick).

It must not decide anything (no scaling or drain logic) and makes no API call except through `kube`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from mailrelay_common import backoff

from mailrelay_operator import kube, metrics

logger = logging.getLogger("mailrelay_operator.cache")

JSON = dict[str, Any]
Key = tuple[str | None, str]  # (namespace, name)


class Reader(Protocol):
    """Where the scaling tick reads Deployments and pods: the API (`kube.Kube`) or this cache (`Cache`)."""

    async def get(self, res: kube.Resource, namespace: str | None, name: str) -> JSON | None: ...

    async def list_(self, res: kube.Resource, namespace: str | None,
                    selector: Mapping[str, str] | None = None) -> list[JSON]: ...


def matches(labels: Mapping[str, str] | None, selector: Mapping[str, str]) -> bool:
    """Equality label selector match."""
    labels = labels or {}
    return all(labels.get(key) == value for key, value in selector.items())


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace"), str(meta.get("name"))


def _version(obj: Mapping[str, Any]) -> str:
    """The resourceVersion, as an opaque string ("" when there is none)."""
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def _uid(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


def _slim(obj: JSON) -> JSON:
    """Drop what the operator never reads and that costs memory (managedFields: often half a pod)."""
    meta = obj.get("metadata")
    if isinstance(meta, dict) and "managedFields" in meta:
        obj = {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
    return obj


@dataclasses.dataclass
class Hold:
    """Our write answers for one object that the watch has not delivered yet."""

    uid: str
    # version -> (the answer, when it was offered), in the order offered: the last one is what reads see.
    pending: dict[str, tuple[JSON, float]]
    # What the watch (or a list) last said about this key meanwhile (None: absent): what reads see once
    # the hold expires.
    watched: JSON | None

    def shown(self) -> JSON:
        return next(reversed(self.pending.values()))[0]


class Store:
    """One resource's objects as the watch delivers them, with our own writes read back at once. Pure.

    `objects` is what reads see. `holds` are the objects our writes got ahead of the watch. `tombstones`
    are the uids of objects the store saw deleted (or leave its label selector): a late answer about one
    of them is ignored. `recent` are the (key, version) pairs the watch and the lists delivered lately:
    an answer at one of those versions is already in (or behind) what the store holds.
    """

    MAX_TOMBSTONES = 4096
    MAX_RECENT = 4096

    def __init__(self, index_label: str | None = None, *, hold_seconds: float = 30.0) -> None:
        self.objects: dict[Key, JSON] = {}
        # Keys by (namespace, value of `index_label`): a list by that label (a MailRelay's pods, by
        # instance) reads its few objects, not the whole store.
        self.index_label = index_label
        self._index: dict[tuple[str | None, str | None], set[Key]] = {}
        self.holds: dict[Key, Hold] = {}
        self.hold_seconds = hold_seconds
        self.tombstones: dict[str, Key] = {}  # uid -> key, oldest first
        self.recent: dict[tuple[Key, str], None] = {}  # oldest first

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

    def _bury(self, key: Key, uid: str) -> None:
        self._put(key, None)
        if uid:
            self.tombstones.pop(uid, None)
            self.tombstones[uid] = key
            while len(self.tombstones) > self.MAX_TOMBSTONES:
                del self.tombstones[next(iter(self.tombstones))]

    def _delivered(self, key: Key, version: str) -> None:
        if version:
            self.recent.pop((key, version), None)
            self.recent[key, version] = None
            while len(self.recent) > self.MAX_RECENT:
                del self.recent[next(iter(self.recent))]

    def replace(self, items: Iterable[JSON]) -> None:
        """A fresh list: it becomes the content, and every hold ends (the list carries our writes made
        before it, and the watch that starts from it brings those made after). What the store knew and
        the list lacks was deleted before the list was made: its uid is buried."""
        fresh: dict[Key, JSON] = {}
        for item in items:
            key = _key(item)
            fresh[key] = _slim(item)
            self._delivered(key, _version(item))
        gone = []
        for key, held in self.objects.items():
            if key not in fresh:
                hold = self.holds.get(key)
                known = hold.watched if hold is not None else held  # our create alone proves nothing
                if known is not None:
                    gone.append((key, _uid(known)))
        for key, uid in gone:
            self._bury(key, uid)
        self.objects, self._index, self.holds = {}, {}, {}
        for key, obj in fresh.items():
            self._put(key, obj)

    def apply(self, event_type: str, obj: JSON) -> None:
        """A watch event (ADDED, MODIFIED, DELETED), in the order the server sent it."""
        if event_type not in ("ADDED", "MODIFIED", "DELETED"):
            return
        key, version, uid = _key(obj), _version(obj), _uid(obj)
        gone = event_type == "DELETED"
        self._delivered(key, version)
        hold = self.holds.get(key)
        if hold is not None:
            hold.watched = None if gone else _slim(obj)
            if gone and uid == hold.uid:
                del self.holds[key]  # our object is gone: nothing we wrote to it is newer than that
            elif uid == hold.uid and version in hold.pending:
                del hold.pending[version]
                if hold.pending:  # answers of ours the watch has not delivered yet are newer than this
                    self._put(key, hold.shown())
                    return
                del self.holds[key]  # the watch caught up with our last write: it carries on from here
            else:
                return  # the server made this before our write: skip it
        if gone:
            self._bury(key, uid)
        else:
            self._put(key, _slim(obj))

    def offer(self, obj: JSON, *, deleted: bool = False, now_iso: str = "", now: float = 0.0) -> None:
        """What the API server answered to one of our writes, `now` (a monotonic clock). A DELETE's answer
        is kept as being deleted (`deletionTimestamp`, set to `now_iso` when the answer has none) until
        the watch says it is gone."""
        if deleted and not (obj.get("metadata") or {}).get("deletionTimestamp"):
            obj = {**obj, "metadata": {**(obj.get("metadata") or {}), "deletionTimestamp": now_iso}}
        key, version, uid = _key(obj), _version(obj), _uid(obj)
        if uid in self.tombstones or (key, version) in self.recent:
            return  # that object is gone, or the store already holds this version or a newer one
        obj = _slim(obj)
        if not version:  # nothing to wait for: shown until the next event about it
            self._put(key, obj)
            return
        hold = self.holds.get(key)
        if hold is None or hold.uid != uid:  # a first answer, or one about a new object of that name
            watched = hold.watched if hold is not None else self.objects.get(key)
            hold = self.holds[key] = Hold(uid, {}, watched)
        hold.pending.pop(version, None)
        hold.pending[version] = (obj, now)
        self._put(key, obj)

    def expire(self, now: float) -> None:
        """End the holds on answers older than `hold_seconds` that the watch never delivered (see the
        module's docstring): what the watch says about those objects is shown again."""
        for key, hold in list(self.holds.items()):
            stale = [v for v, (_, at) in hold.pending.items() if now - at >= self.hold_seconds]
            if not stale:
                continue
            for version in stale:
                del hold.pending[version]
            if hold.pending:
                self._put(key, hold.shown())
            else:
                del self.holds[key]
                self._put(key, hold.watched)

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
                 retry_delay: float = 1.0, max_retry_delay: float = 30.0, hold_seconds: float = 30.0) -> None:
        self.client = client
        self.res = res
        self.namespace = namespace
        self.selector = dict(selector)
        self.store = Store(index_label, hold_seconds=hold_seconds)
        self.synced = False
        self.watch_timeout = watch_timeout
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        # Relists double their pause from `retry_delay` up to `max_retry_delay`, without jitter.
        self.relist_schedule = backoff.Schedule(base=retry_delay, factor=2.0, cap=max_retry_delay, jitter=0.0)
        self.restarts = 0  # lists after the first: a broken, expired or refused watch
        self.expirations = 0  # watches answered 410 Gone (their version was too old): each one relists

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
            self.store.offer(answer, deleted=deleted, now_iso=kube.utc_now_iso(), now=time.monotonic())

    async def run(self) -> None:
        """Keep the store in sync until cancelled."""
        failures = 0
        while True:
            try:
                items, version = await self.client.list_with_version(self.res, self.namespace, self.selector)
                self.store.replace(items)
                self.synced = True
                failures = 0
                await self._watch(version)
            except Exception as exc:  # whatever broke (API, stream, a malformed event): relist
                self.synced = False
                failures += 1
                delay = backoff.nominal_delay(self.relist_schedule, failures)
                logger.warning("cache of %s in %s out of sync (%s); reading from the API server, "
                               "listing again in %.0fs", self.res.plural, self.namespace or "all namespaces",
                               exc, delay)
                await asyncio.sleep(delay)
            self.restarts += 1
            metrics.CACHE_RELISTS.labels(self.res.plural).inc()

    async def _watch(self, version: str) -> None:
        """Follow the stream from `version`, and again from the last version seen (an object's or a
        bookmark's) each time the server ends it; return when that version expired (410 Gone, as an
        ERROR event in the stream or as the answer to the watch request: list again)."""
        while True:
            stream = self.client.watch(self.res, self.namespace, selector=self.selector,
                                       resource_version=version, timeout_seconds=self.watch_timeout)
            try:
                async with contextlib.aclosing(stream) as events:
                    async for event in events:
                        kind, obj = str(event.get("type")), event.get("object")
                        if not isinstance(obj, dict):
                            continue
                        if kind == "ERROR":
                            raise kube.ApiError(int(obj.get("code") or 0), str(obj.get("reason", "")),
                                                str(obj.get("message", "")), method="WATCH",
                                                path=self.res.plural)
                        version = _version(obj) or version
                        if kind != "BOOKMARK":
                            self.store.apply(kind, obj)
            except kube.ApiError as exc:
                if exc.status != 410:
                    raise
                self.expirations += 1
                logger.info("watch of %s in %s expired (%s); listing again", self.res.plural,
                            self.namespace or "all namespaces", exc.message or exc.reason)
                return


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
        found = None
        if informer is not None:
            informer.store.expire(time.monotonic())
            found = informer.store.get(namespace, name)
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
        informer.store.expire(time.monotonic())
        return informer.store.list_(namespace, selector or {})
