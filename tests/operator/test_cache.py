"""The read cache of Deployments and pods (`cache`).

- The pure `Store` by tables and hypothesis, with opaque resourceVersions: in-order watch events, our own
  write answers read back at once, relists, deletions, and the hold on answers the watch never delivers.
- The `Informer` against the real kube-apiserver, with the operator's ServiceAccount token: it follows
  writes by others, keeps our own writes with the watch stopped, reads from the API while out of sync
  (the apiserver SIGKILLed), resumes a watch the server ended from the last bookmark without listing
  again, and lists again after a 410 Gone (the fault proxy's, and the server's own after a restart and
  an etcd compaction).
- The real operator: its scaling loop reads through the cache (no GET or LIST per tick), and it carries
  on after the apiserver was killed and etcd compacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mailrelay_operator import cache, manifests, metrics
from mailrelay_operator import kube as k
from mailrelay_sandbox import faultproxy, kubelet, scenario

from tests import kubeenv
from tests.operator.conftest import OperatorHarness, eventually

SELECTOR = {manifests.NAME_LABEL: manifests.APP_NAME}
NS = "ns"  # the namespace of the pure store tests
# Opaque resourceVersions, named in the order the server made them: v(1) before v(2) before v(3)... The
# strings themselves are in neither numeric nor text order, so a store that orders them fails.
VERSIONS = ("50", "120", "3", "4000", "21", "7", "1000", "61", "9")


def v(n: int) -> str:
    return VERSIONS[n - 1]


def pod(name: str, version: str | None, *, uid: str | None = None, labels: dict[str, str] | None = None,
        **meta: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": NS, "uid": uid or f"uid-{name}",
                                "labels": dict(SELECTOR if labels is None else labels), **meta}
    if version is not None:
        metadata["resourceVersion"] = version
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": {"containers": []}}


# -- Store: pure ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # Our write (v3) is read back at once; a watch event the server made before it is skipped...
        ([("MODIFIED", pod("a", v(1))), ("offer", pod("a", v(3))), ("MODIFIED", pod("a", v(2)))],
         {"a": v(3)}),
        # ... until the watch delivers our version; from then on its events apply again.
        ([("offer", pod("a", v(2))), ("MODIFIED", pod("a", v(1))), ("MODIFIED", pod("a", v(2))),
          ("MODIFIED", pod("a", v(3)))], {"a": v(3)}),
        # An answer processed after the watch delivered its version (and a newer one) is dropped.
        ([("MODIFIED", pod("a", v(1))), ("MODIFIED", pod("a", v(2))), ("offer", pod("a", v(1)))],
         {"a": v(2)}),
        # Two writes of ours: the later answer shows until the watch reaches it.
        ([("offer", pod("a", v(1))), ("offer", pod("a", v(2))), ("MODIFIED", pod("a", v(1)))],
         {"a": v(2)}),
        ([("offer", pod("a", v(1))), ("offer", pod("a", v(2))), ("MODIFIED", pod("a", v(1))),
          ("MODIFIED", pod("a", v(2))), ("MODIFIED", pod("a", v(3)))], {"a": v(3)}),
        # The deletion of the object we wrote ends the hold: nothing written to it is newer.
        ([("offer", pod("a", v(1))), ("DELETED", pod("a", v(2)))], {}),
        ([("offer", pod("a", v(1))), ("offer", pod("a", v(2))), ("DELETED", pod("a", v(3)))], {}),
        # An answer about an object the store saw deleted (same uid) is dropped.
        ([("ADDED", pod("a", v(1))), ("DELETED", pod("a", v(3))), ("offer", pod("a", v(2)))], {}),
        # A new object of that name (new uid) that we created stays; the old one's events do not touch it.
        ([("ADDED", pod("a", v(1))), ("offer", pod("a", v(3), uid="new")), ("DELETED", pod("a", v(2)))],
         {"a": v(3)}),
        ([("ADDED", pod("a", v(1))), ("offer", pod("a", v(3), uid="new")), ("DELETED", pod("a", v(2))),
          ("ADDED", pod("a", v(3), uid="new")), ("MODIFIED", pod("a", v(4), uid="new"))], {"a": v(4)}),
        # A list replaces everything and ends the holds (the watch after it brings our write if newer).
        ([("ADDED", pod("a", v(1))), ("ADDED", pod("b", v(2))), ("list", [pod("a", v(3)), pod("c", v(4))])],
         {"a": v(3), "c": v(4)}),
        ([("offer", pod("a", v(2))), ("list", [pod("a", v(1))])], {"a": v(1)}),
        ([("offer", pod("a", v(2))), ("list", [pod("a", v(1))]), ("MODIFIED", pod("a", v(2)))],
         {"a": v(2)}),
        # What a list lacks was deleted before it: a late answer about it is dropped.
        ([("ADDED", pod("a", v(1))), ("list", [pod("b", v(3))]), ("offer", pod("a", v(2)))], {"b": v(3)}),
        # ... but our create that the list lacks was not deleted: its events and answers are welcome.
        ([("offer", pod("n", v(2))), ("list", [pod("b", v(1))]), ("offer", pod("n", v(3)))],
         {"b": v(1), "n": v(3)}),
        ([("offer", pod("n", v(2))), ("list", [pod("b", v(1))]), ("ADDED", pod("n", v(2)))],
         {"b": v(1), "n": v(2)}),
        # An answer at the version the list carries is not held: the next event applies.
        ([("list", [pod("a", v(1))]), ("offer", pod("a", v(1))), ("MODIFIED", pod("a", v(2)))],
         {"a": v(2)}),
        # The case equality cannot settle: our write (v1) was in flight across a relist, someone else wrote
        # v2 before the list. The answer is held (reads show v1) until it expires; then the watch wins.
        ([("list", [pod("a", v(2))]), ("offer", pod("a", v(1))), ("MODIFIED", pod("a", v(3))),
          ("expire", 29.0)], {"a": v(1)}),
        ([("list", [pod("a", v(2))]), ("offer", pod("a", v(1))), ("MODIFIED", pod("a", v(3))),
          ("expire", 30.0)], {"a": v(3)}),
        ([("list", [pod("a", v(2))]), ("offer", pod("a", v(1))), ("DELETED", pod("a", v(3), uid="other")),
          ("expire", 30.0)], {}),
        # An answer without a version is shown until the next event.
        ([("ADDED", pod("a", v(1))), ("offer", pod("a", None)), ("MODIFIED", pod("a", v(2)))],
         {"a": v(2)}),
    ],
)
def test_store_applies_events_in_order_and_reads_our_writes_back(
        steps: list[tuple[str, Any]], expected: dict[str, str]) -> None:
    store = cache.Store()
    for step, arg in steps:
        if step == "offer":
            store.offer(arg, now=0.0)
        elif step == "list":
            store.replace(arg)
        elif step == "expire":
            store.expire(arg)
        else:
            store.apply(step, arg)
    assert {name: (o["metadata"].get("resourceVersion") or "") for (_, name), o in store.objects.items()} \
        == expected


def test_store_deleted_answer_is_kept_as_deleting_and_managed_fields_dropped() -> None:
    store = cache.Store()

    def meta() -> dict[str, Any]:
        held = store.get(NS, "a")
        assert held is not None
        return dict(held["metadata"])

    store.offer(pod("a", v(1), managedFields=[{"manager": "kubectl"}]))
    assert "managedFields" not in meta()
    store.offer(pod("a", v(2)), deleted=True, now_iso="2026-11-29T00:00:00.000000Z")
    assert meta()["deletionTimestamp"] == "2026-11-29T00:00:00.000000Z"
    store.offer(pod("a", v(3), deletionTimestamp="2026-11-29T00:00:01Z"), deleted=True, now_iso="later")
    assert meta()["deletionTimestamp"] == "2026-11-29T00:00:01Z"
    store.apply("MODIFIED", pod("a", v(2), deletionTimestamp="2026-11-29T00:00:00Z"))
    assert meta()["resourceVersion"] == v(3), "the later answer is still ahead"
    store.apply("DELETED", pod("a", v(3)))
    assert store.get(NS, "a") is None and store.holds == {}


def test_store_lists_by_namespace_and_selector() -> None:
    store = cache.Store()
    store.apply("ADDED", pod("a", v(1), labels={**SELECTOR, "i": "x"}))
    store.apply("ADDED", pod("b", v(2), labels={**SELECTOR, "i": "y"}))
    other = pod("c", v(3))
    other["metadata"]["namespace"] = "elsewhere"
    store.apply("ADDED", other)
    assert [o["metadata"]["name"] for o in store.list_(NS, {"i": "x"})] == ["a"]
    assert sorted(o["metadata"]["name"] for o in store.list_(None, SELECTOR)) == ["a", "b", "c"]
    assert store.list_("elsewhere", {"i": "x"}) == []


def test_store_index_follows_label_changes() -> None:
    store = cache.Store(index_label="i")
    store.apply("ADDED", pod("a", v(1), labels={**SELECTOR, "i": "x"}))
    store.apply("ADDED", pod("b", v(2), labels={**SELECTOR, "i": "x"}))
    assert [o["metadata"]["name"] for o in store.list_(NS, {"i": "x"})] == ["a", "b"]
    store.apply("MODIFIED", pod("a", v(3), labels={**SELECTOR, "i": "y"}))
    assert [o["metadata"]["name"] for o in store.list_(NS, {"i": "x"})] == ["b"]
    assert [o["metadata"]["name"] for o in store.list_(NS, {"i": "y"})] == ["a"]
    store.offer(pod("a", v(5), labels={**SELECTOR, "i": "x"}), now=0.0)  # held: the index follows too
    assert [o["metadata"]["name"] for o in store.list_(NS, {"i": "x"})] == ["a", "b"]
    store.expire(60.0)  # never delivered: back to what the watch said
    assert [o["metadata"]["name"] for o in store.list_(NS, {"i": "x"})] == ["b"]
    store.apply("DELETED", pod("b", v(4), labels={**SELECTOR, "i": "x"}))
    assert store.list_(NS, {"i": "x"}) == []
    store.replace([pod("c", v(6), labels={**SELECTOR, "i": "x"})])
    assert [o["metadata"]["name"] for o in store.list_(NS, {"i": "x", **SELECTOR})] == ["c"]
    assert store.list_(NS, {"i": "y"}) == []
    assert store._index == {(NS, "x"): {(NS, "c")}}


def test_store_forgets_old_versions_and_tombstones_within_bounds() -> None:
    store = cache.Store()
    store.MAX_RECENT = store.MAX_TOMBSTONES = 3
    for n in range(1, 6):
        store.apply("ADDED", pod(f"p{n}", v(n)))
        store.apply("DELETED", pod(f"p{n}", v(n)))
    assert list(store.tombstones) == ["uid-p3", "uid-p4", "uid-p5"]
    assert len(store.recent) == 3


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_store_converges_on_the_newest_and_never_goes_back(data: st.DataObject) -> None:
    """One object's history on the server: versions (random opaque tokens) in the order the server made
    them, some of them our writes, the last one maybe its deletion. The watch delivers them in that order;
    our write answers come in their own order, interleaved with the watch's events in any way; relists
    come at any point where no write of ours is in flight across them (the list is at or after every
    answer processed and before every answer to come; the one case it cannot settle is a table row
    above). The store never shows an older version than before, shows at least our write once its answer
    is in, and ends at the newest version (or without the object when that is its deletion)."""
    versions = data.draw(st.lists(st.text("0123456789abcdef", min_size=1, max_size=4), min_size=1,
                                  max_size=10, unique=True), label="versions")
    last = len(versions) - 1
    deleted = data.draw(st.booleans(), label="deleted last")
    ours = sorted(data.draw(st.sets(st.integers(0, last)), label="our writes"))
    rank = {version: index for index, version in enumerate(versions)}
    store = cache.Store()
    watched, answered, position = 0, 0, -1  # next to deliver; answers processed; what reads show

    def obj(index: int) -> dict[str, Any]:
        return pod("a", versions[index])

    def shown() -> int:
        held = store.get(NS, "a")
        if held is not None:
            return rank[held["metadata"]["resourceVersion"]]
        gone_seen = deleted and (watched > last or (answered and ours[answered - 1] == last))
        return last if gone_seen else -1

    while watched <= last or answered < len(ours):
        actions = []
        if watched <= last:
            actions.append("watch")
        if answered < len(ours):
            actions.append("answer")
        low = max(watched - 1, ours[answered - 1] if answered else -1)
        high = min(last, ours[answered] - 1 if answered < len(ours) else last)
        if low <= high and low >= 0:
            actions.append("relist")
        action = data.draw(st.sampled_from(actions))
        if action == "watch":
            kind = "DELETED" if deleted and watched == last else ("ADDED" if watched == 0 else "MODIFIED")
            store.apply(kind, obj(watched))
            floor = watched
            watched += 1
        elif action == "answer":
            index = ours[answered]
            store.offer(obj(index), deleted=deleted and index == last, now=0.0)
            floor = index
            answered += 1
        else:
            at = data.draw(st.integers(low, high), label="list made at")
            store.replace([] if deleted and at == last else [obj(at)])
            floor = at
            watched = at + 1
        now = shown()
        assert now >= position, f"went back from {position} to {now} after {action}"
        assert now >= floor, f"shows {now}, older than what {action} delivered ({floor})"
        position = now
    final = store.get(NS, "a")
    if deleted:
        assert final is None
    else:
        assert final is not None and final["metadata"]["resourceVersion"] == versions[-1]
    assert store.holds == {}


# -- Informer and Cache against the real API server --------------------------------------------------

NO_SCHEDULER = "mailrelay-test-no-scheduler"  # no scheduler binds these pods: only the test changes them


def pod_manifest(namespace: str, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": dict(SELECTOR if labels is None else labels)},
            "spec": {"schedulerName": NO_SCHEDULER,
                     "containers": [{"name": "relay", "image": "mailrelay-relay:test"}]}}


def deployment_manifest(namespace: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    """A paused Deployment of no replicas: the real controllers make no pods for it."""
    template = {"metadata": {"labels": {"test-app": name}},
                "spec": {"schedulerName": NO_SCHEDULER,
                         "containers": [{"name": "relay", "image": "mailrelay-relay:test"}]}}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"replicas": 0, "paused": True, "selector": {"matchLabels": {"test-app": name}},
                     "template": template}}


@contextlib.asynccontextmanager
async def connected(kubeconfig: Path, attempts: int = 2) -> AsyncIterator[k.Kube]:
    client = await k.Kube.connect(str(kubeconfig), None, k.RetryPolicy(attempts=attempts, timeout=5))
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def started(client: k.Kube, namespace: str, *,
                  resources: Sequence[k.Resource] = (k.DEPLOYMENTS, k.PODS),
                  **options: Any) -> AsyncIterator[cache.Cache]:
    """The operator's cache (its selector and index) of `resources` in `namespace`, in sync."""
    reads = cache.Cache.of(client, resources, (namespace,), SELECTOR, index_label=manifests.INSTANCE_LABEL,
                           retry_delay=0.2, max_retry_delay=1.0, **options)
    reads.start()
    try:
        await eventually(lambda: reads.synced, within=30, what="the cache in sync")
        yield reads
    finally:
        await reads.stop()


def via(proxy: faultproxy.FaultProxy) -> Path:
    """The kubeconfig of the operator's ServiceAccount through the proxy."""
    assert proxy.kubeconfig is not None
    return proxy.kubeconfig


def informer(reads: cache.Cache, res: k.Resource) -> cache.Informer:
    return next(i for i in reads.informers if i.res == res)


def cached(reads: cache.Cache, res: k.Resource = k.PODS) -> list[str]:
    return sorted(name for _, name in informer(reads, res).store.objects)


async def names(reads: cache.Reader, namespace: str) -> list[str]:
    return sorted(p["metadata"]["name"] for p in await reads.list_(k.PODS, namespace, SELECTOR))


def pods_path(namespace: str) -> str:
    return "^" + re.escape(k.PODS.path(namespace)) + "$"


def pod_requests(proxy: faultproxy.FaultProxy, namespace: str, *, watch: bool) -> list[faultproxy.Record]:
    """The operator's LISTs (watch False) or WATCHes of pods in `namespace`, as the proxy forwarded them."""
    return [r for r in proxy.requests(agent=k.USER_AGENT)
            if r.method == "GET" and r.path == k.PODS.path(namespace) and r.watch is watch]


def relists() -> float:
    return sum(metrics.REGISTRY.get_sample_value("mailrelay_operator_cache_relists_total",
                                                 {"resource": res}) or 0.0 for res in ("pods", "deployments"))


async def test_informer_follows_what_others_write(kube: kubeenv.KubeEnv) -> None:
    ns = kube.namespace
    async with connected(kube.operator_kubeconfig) as ours, connected(kube.kubeconfig) as theirs:
        await theirs.create(k.PODS, ns, pod_manifest(ns, "before"))
        async with started(ours, ns) as reads:
            store = informer(reads, k.PODS).store
            assert await names(reads, ns) == ["before"]
            await theirs.create(k.PODS, ns, pod_manifest(ns, "added"))
            await theirs.create(k.PODS, ns, pod_manifest(ns, "foreign", labels={"app": "other"}))
            await eventually(lambda: store.get(ns, "added") is not None, within=30,
                             what="the watch event of the new pod")
            await theirs.patch(k.PODS, ns, "added", {"metadata": {"annotations": {"x": "1"}}})
            await eventually(
                lambda: ((store.get(ns, "added") or {}).get("metadata", {}).get("annotations") or {})
                .get("x") == "1", within=30, what="the watch event of the patch")
            await theirs.delete(k.PODS, ns, "before")
            await eventually(lambda: store.get(ns, "before") is None, within=30,
                             what="the watch event of the deletion")
            assert await names(reads, ns) == ["added"]
            assert cached(reads) == ["added"], "a pod without our labels is not cached"
            # A read by name of an object without our labels asks the API server (the store is a
            # partial view), and so does a read the informers do not cover (another namespace).
            await theirs.create(k.DEPLOYMENTS, ns, deployment_manifest(ns, "foreign", {"app": "other"}))
            assert cached(reads, k.DEPLOYMENTS) == []
            found = await reads.get(k.DEPLOYMENTS, ns, "foreign")
            assert found is not None and found["metadata"]["name"] == "foreign"
            assert await reads.get(k.DEPLOYMENTS, ns, "never-was") is None
            assert await reads.list_(k.PODS, f"{ns}-elsewhere", SELECTOR) == []


async def test_our_own_writes_are_read_back_at_once(kube: kubeenv.KubeEnv) -> None:
    """With the watch stopped, only the answers to our writes can change the store: the operator's own
    writes (create and patch a Deployment, patch and delete a pod) are read back at once."""
    ns = kube.namespace
    async with connected(kube.operator_kubeconfig) as ours, connected(kube.kubeconfig) as theirs:
        await theirs.create(k.PODS, ns, pod_manifest(ns, "mine"))
        async with started(ours, ns) as reads:
            assert cached(reads) == ["mine"]
            for task in reads._tasks:  # no more watch events
                task.cancel()
            await asyncio.gather(*reads._tasks, return_exceptions=True)
            assert reads.synced, "stopping the watch leaves the store in use"

            await ours.create(k.DEPLOYMENTS, ns, deployment_manifest(ns, "mine", SELECTOR))
            assert cached(reads, k.DEPLOYMENTS) == ["mine"]
            await ours.patch(k.DEPLOYMENTS, ns, "mine", {"spec": {"replicas": 2}})
            held = await reads.get(k.DEPLOYMENTS, ns, "mine")
            assert held is not None and held["spec"]["replicas"] == 2

            await ours.patch(k.PODS, ns, "mine", {"metadata": {"annotations": {"drain": "yes"}}})
            listed = await reads.list_(k.PODS, ns, SELECTOR)
            assert [p["metadata"]["annotations"] for p in listed] == [{"drain": "yes"}]
            await ours.delete(k.PODS, ns, "mine")
            held = await reads.get(k.PODS, ns, "mine")
            assert held is not None and held["metadata"].get("deletionTimestamp"), \
                "a pod we deleted reads as being deleted until the watch says it is gone"
            assert kube.get(k.PODS, "mine") is None, "the server did delete it"

            await theirs.create(k.PODS, ns, pod_manifest(ns, "theirs"))
            assert "theirs" not in await names(reads, ns), \
                "the watch is stopped: the checks above mean something"


async def test_a_410_answer_to_the_watch_lists_again(kube: kubeenv.KubeEnv,
                                                     proxy: faultproxy.FaultProxy) -> None:
    """The fault proxy answers the informer's first watch with 410 Gone: it lists again at once (still in
    sync: no read goes to the API meanwhile) and follows the new watch's events."""
    ns = kube.namespace
    proxy.fail("GET", pods_path(ns), 410, query={"watch": "true"}, agent=k.USER_AGENT)
    relists_before = relists()
    async with (connected(via(proxy)) as ours, connected(kube.kubeconfig) as theirs,
                started(ours, ns, resources=(k.PODS,)) as reads):
        pods = reads.informers[0]
        await eventually(lambda: pods.expirations == 1 and len(pod_requests(proxy, ns, watch=True)) == 2,
                         within=30, what="410 Gone, then a new list and watch")
        assert pods.restarts >= 1 and relists() >= relists_before + 1
        assert len(pod_requests(proxy, ns, watch=False)) >= 2, "the informer did not list again"
        assert [r.status for r in pod_requests(proxy, ns, watch=True)] == [410, 200]
        await theirs.create(k.PODS, ns, pod_manifest(ns, "after"))
        await eventually(lambda: cached(reads) == ["after"], within=30, what="the second watch's events")


async def test_a_watch_the_server_ends_resumes_from_its_last_bookmark(kube: kubeenv.KubeEnv,
                                                                     proxy: faultproxy.FaultProxy) -> None:
    """The server ends every watch after its `timeoutSeconds` (5 s here) and, shortly before, sends a
    BOOKMARK with its latest resourceVersion. The informer asks for bookmarks and resumes from the
    bookmark's version, without listing again. No pod with our labels changes meanwhile (only someone
    else's pod does), so no object event can have told the informer a version other than the list's."""
    ns = kube.namespace
    async with (connected(via(proxy)) as ours, connected(kube.kubeconfig) as theirs,
                started(ours, ns, resources=(k.PODS,), watch_timeout=5) as reads):
        pods = reads.informers[0]
        await eventually(lambda: len(pod_requests(proxy, ns, watch=True)) >= 1, within=30,
                         what="the first watch under way")
        await theirs.create(k.PODS, ns, pod_manifest(ns, "not-ours", labels={"app": "other"}))
        await eventually(lambda: len(pod_requests(proxy, ns, watch=True)) >= 2, within=60,
                         what="the first watch ended by the server and a second one")
        first, second = pod_requests(proxy, ns, watch=True)[:2]
        assert cached(reads) == [], "no object event reached the informer"
        assert first.query["allowWatchBookmarks"] == second.query["allowWatchBookmarks"] == "true"
        assert first.query["timeoutSeconds"] == "5"
        assert second.query["resourceVersion"] != first.query["resourceVersion"], \
            "the second watch did not resume from the bookmark's version"
        assert len(pod_requests(proxy, ns, watch=False)) == 1 and pods.restarts == 0, "it listed again"
        # The resumed watch delivers what happens next.
        await theirs.create(k.PODS, ns, pod_manifest(ns, "ours"))
        await eventually(lambda: cached(reads) == ["ours"], within=30, what="the resumed watch's events")
        assert len(pod_requests(proxy, ns, watch=False)) == 1 and pods.expirations == 0


async def test_a_real_410_after_a_restart_and_a_compaction_lists_again(
        kube: kubeenv.KubeEnv, proxy: faultproxy.FaultProxy) -> None:
    """Someone else's write moves the server on without the informer hearing of it (not our labels, and
    no bookmark yet: the server sends one a minute into a watch). The apiserver is then SIGKILLed (the
    proxy ends the informer's stream) and started again, and etcd compacted to its current revision,
    while the informer's re-watch waits in the proxy. The restarted server's watch cache begins after
    the informer's version and etcd has no history before it either: the re-watch gets the server's own
    410 Gone ("too old resource version"). The informer lists again and converges on the server: what
    was deleted meanwhile goes, what was created meanwhile comes."""
    ns = kube.namespace
    async with connected(via(proxy)) as ours, connected(kube.kubeconfig, attempts=5) as theirs:
        for name in ("kept", "removed-meanwhile"):
            await theirs.create(k.PODS, ns, pod_manifest(ns, name))
        async with started(ours, ns, resources=(k.PODS,)) as reads:
            pods = reads.informers[0]
            assert cached(reads) == ["kept", "removed-meanwhile"]
            await theirs.create(k.PODS, ns, pod_manifest(ns, "not-ours", labels={"app": "other"}))
            rewatch = proxy.hold("GET", pods_path(ns), query={"watch": "true"}, agent=k.USER_AGENT)
            try:
                await asyncio.to_thread(kube.cluster.restart_apiserver)
                await eventually(lambda: rewatch.fired == 1, within=30, what="the informer's re-watch, held")
                await theirs.delete(k.PODS, ns, "removed-meanwhile")
                await theirs.create(k.PODS, ns, pod_manifest(ns, "created-meanwhile"))
                await asyncio.to_thread(kube.cluster.compact_etcd)
                lists_before = len(pod_requests(proxy, ns, watch=False))
                assert cached(reads) == ["kept", "removed-meanwhile"], "the store changed without a watch"
            finally:
                rewatch.release()
            await eventually(lambda: pods.expirations == 1, within=30, what="the server's 410 Gone")
            first, resumed = pod_requests(proxy, ns, watch=True)[:2]
            assert resumed.query["resourceVersion"] == first.query["resourceVersion"], \
                "the re-watch did not resume from the list's version (a bookmark came first?)"
            await eventually(lambda: cached(reads) == ["created-meanwhile", "kept"], within=30,
                             what="the new list's content")
            assert pods.restarts >= 1 and len(pod_requests(proxy, ns, watch=False)) > lists_before
            await theirs.create(k.PODS, ns, pod_manifest(ns, "later"))
            await eventually(lambda: "later" in cached(reads), within=30, what="the new watch's events")


async def test_after_the_apiserver_dies_it_reads_the_api_then_lists_again(kube: kubeenv.KubeEnv) -> None:
    """The apiserver is SIGKILLed under the informer's stream: the informer falls out of sync and reads go
    to the API server (which is down, so they fail); once it is back, a new list brings the informer in
    sync, and its watch follows the changes."""
    ns = kube.namespace
    async with connected(kube.operator_kubeconfig) as ours, connected(kube.kubeconfig, attempts=5) as theirs:
        await theirs.create(k.PODS, ns, pod_manifest(ns, "kept"))
        async with started(ours, ns, resources=(k.PODS,)) as reads:
            pods = reads.informers[0]
            assert await names(reads, ns) == ["kept"]
            try:
                await asyncio.to_thread(kube.cluster.stop_process, "kube-apiserver", kill=True)
                await eventually(lambda: not reads.synced, within=30, what="out of sync once the server died")
                with pytest.raises(k.ApiError):  # out of sync: read from the API server, which is down
                    await reads.list_(k.PODS, ns, SELECTOR)
            finally:
                await asyncio.to_thread(kube.cluster.restart_apiserver)
            await eventually(lambda: reads.synced, within=60, what="in sync again")
            assert pods.restarts >= 1
            await theirs.delete(k.PODS, ns, "kept")
            await theirs.create(k.PODS, ns, pod_manifest(ns, "created-after"))
            await eventually(lambda: cached(reads) == ["created-after"], within=30,
                             what="the new watch's events")
            assert await names(reads, ns) == ["created-after"]


# -- the operator reads through the cache ------------------------------------------------------------


def last_tick(namespace: str, name: str) -> float:
    return metrics.REGISTRY.get_sample_value("mailrelay_operator_last_reconcile_timestamp_seconds",
                                             {"namespace": namespace, "mailrelay": name}) or 0.0


def relay_status(kube: kubeenv.KubeEnv, name: str) -> dict[str, Any]:
    return (kube.get(k.MAILRELAYS, name) or {}).get("status") or {}


async def test_scaling_loop_makes_no_get_or_list_per_tick(
        kube: kubeenv.KubeEnv, node: kubelet.ProcessKubelet, proxy: faultproxy.FaultProxy) -> None:
    ns = kube.namespace
    operator = OperatorHarness(kube, kubeconfig=proxy.kubeconfig, resync_seconds=3600.0)
    await operator.start()
    try:
        async with kube.api() as http:
            await http.request("POST", kube.path(k.MAILRELAYS), scenario.mailrelay("cached", ns, interval=1))
        await eventually(lambda: relay_status(kube, "cached").get("readyReplicas") == 1, within=90,
                         what="one ready relay")
        ticked = last_tick(ns, "cached")
        await eventually(lambda: last_tick(ns, "cached") > ticked, within=30,
                         what="a tick that began after the relay was ready")
        since, ticked = time.time(), last_tick(ns, "cached")
        await eventually(lambda: last_tick(ns, "cached") >= ticked + 3, within=30, what="three more ticks")
        window = proxy.requests(agent=k.USER_AGENT, since=since)
    finally:
        await operator.stop()
    operator.assert_never_forbidden()
    reads = [(r.method, r.path) for r in window if r.method == "GET" and not r.watch]
    assert reads == [], "the scaling loop read from the API server instead of its cache"
    assert any(r.watch for r in proxy.requests(agent=k.USER_AGENT)), "the log holds none of its requests"
    assert relay_status(kube, "cached").get("readyReplicas") == 1


async def test_the_operator_carries_on_after_the_apiserver_dies_and_etcd_is_compacted(
        kube: kubeenv.KubeEnv, node: kubelet.ProcessKubelet, proxy: faultproxy.FaultProxy) -> None:
    """The apiserver is SIGKILLed under the running operator, and etcd compacted while it is down, so
    every watch must start over: the operator's cache lists again, and the operator then acts on what the
    cache reads (a new minimum of 2 relays is met, and reported ready).

    The operator reaches the apiserver through the proxy, which answers 503 until the restarted server
    is ready, as a load balancer that checks /readyz does: a kube-apiserver that is starting already
    accepts requests, and answers 403 until its RBAC roles are loaded, which is not what is tested here."""
    ns = kube.namespace
    operator = OperatorHarness(kube, kubeconfig=proxy.kubeconfig)
    await operator.start()
    try:
        async with kube.api() as http:
            await http.request("POST", kube.path(k.MAILRELAYS), scenario.mailrelay("restart", ns, interval=1))
        await eventually(lambda: relay_status(kube, "restart").get("readyReplicas") == 1, within=90,
                         what="one ready relay")
        relists_before = relists()
        unready = proxy.fail(None, None, 503, times=None)
        try:
            await asyncio.to_thread(kube.cluster.stop_process, "kube-apiserver", kill=True)
            await asyncio.to_thread(kube.cluster.compact_etcd)
        finally:
            await asyncio.to_thread(kube.cluster.restart_apiserver)
            proxy.clear()
        assert unready.fired >= 1, "the operator sent nothing while the apiserver was away"
        async with kube.api() as http:
            await http.patch(kube.path(k.MAILRELAYS, "restart"), {"spec": {"replicas": {"min": 2}}})
        await eventually(lambda: relists() >= relists_before + 2, within=60,
                         what="the cache's Deployments and pods listed again")
        await eventually(
            lambda: (kube.get(k.DEPLOYMENTS, "restart") or {}).get("spec", {}).get("replicas") == 2,
            within=60, what="the Deployment scaled to the new minimum")
        await eventually(lambda: relay_status(kube, "restart").get("readyReplicas") == 2
                         and relay_status(kube, "restart").get("replicas") == 2, within=90,
                         what="two ready relays reported")
    finally:
        await operator.stop()
    operator.assert_never_forbidden()
    assert [r for r in proxy.requests() if r.status == 403] == []
