"""The read cache of Deployments and pods (`cache`): the pure `Store` by tables and hypothesis, the
`Informer` against the emulated API server (follows writes by others, keeps our own writes at once, lists
again after a broken stream and after 410 Gone, reads from the API while out of sync), and the real
operator's scaling loop reading through it (no GET or LIST per tick)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailrelay_operator import cache, kube, manifests, metrics
from mailrelay_sandbox import controlplane, kubeemu, scenario

from tests.operator.conftest import NAMESPACE, OperatorHarness, eventually

SELECTOR = {manifests.NAME_LABEL: manifests.APP_NAME}


def pod(name: str, rv: int | None, *, labels: dict[str, str] | None = None, **meta: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": NAMESPACE,
                                "labels": dict(SELECTOR if labels is None else labels), **meta}
    if rv is not None:
        metadata["resourceVersion"] = str(rv)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": {"containers": []}}


# -- Store: pure ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # A watch event older than what we hold (our own write came first) is ignored.
        ([("offer", pod("a", 7)), ("MODIFIED", pod("a", 5))], {"a": "7"}),
        ([("MODIFIED", pod("a", 5)), ("offer", pod("a", 7))], {"a": "7"}),
        # The deletion's version is newer than the last write: the object goes.
        ([("offer", pod("a", 7)), ("DELETED", pod("a", 8))], {}),
        # A stale DELETED (older than a re-read) does not remove a newer version.
        ([("ADDED", pod("a", 9)), ("DELETED", pod("a", 8))], {"a": "9"}),
        # A list replaces everything, except where we hold something newer.
        ([("ADDED", pod("a", 3)), ("ADDED", pod("b", 4)), ("list", [pod("a", 2), pod("c", 5)])],
         {"a": "3", "c": "5"}),
        ([("ADDED", pod("a", 3)), ("list", [pod("a", 6)])], {"a": "6"}),
        # Versions that are not integers: the incoming one wins.
        ([("ADDED", pod("a", None)), ("MODIFIED", pod("a", 2))], {"a": "2"}),
        # A late answer to our patch (version 5) after the deletion (6): the tombstone keeps it gone.
        ([("ADDED", pod("a", 4)), ("DELETED", pod("a", 6)), ("offer", pod("a", 5))], {}),
        # ... and a new object of the same name (version 9) is welcome.
        ([("ADDED", pod("a", 4)), ("DELETED", pod("a", 6)), ("ADDED", pod("a", 9))], {"a": "9"}),
        # A list at version 8 without "a": an answer at version 5 arriving later is older than the list.
        ([("list@8", [pod("b", 7)]), ("offer", pod("a", 5))], {"b": "7"}),
        ([("list@8", [pod("b", 7)]), ("offer", pod("a", 9))], {"a": "9", "b": "7"}),
        # Our create (version 9) answered while a list made at version 8 was on its way: it stays.
        ([("offer", pod("a", 9)), ("list@8", [pod("b", 7)])], {"a": "9", "b": "7"}),
        # ... but what the list left out and we hold at an older version was deleted: it goes.
        ([("offer", pod("a", 6)), ("list@8", [pod("b", 7)])], {"b": "7"}),
    ],
)
def test_store_keeps_the_newest_version(steps: list[tuple[str, Any]], expected: dict[str, str]) -> None:
    store = cache.Store()
    for step, obj in steps:
        if step == "offer":
            store.offer(obj)
        elif step.startswith("list"):
            store.replace(obj, step.partition("@")[2])
        else:
            store.apply(step, obj)
    assert {name: (o["metadata"].get("resourceVersion") or "") for (_, name), o in store.objects.items()} \
        == expected


def test_store_deleted_answer_is_kept_as_deleting_and_managed_fields_dropped() -> None:
    store = cache.Store()
    store.offer(pod("a", 4, managedFields=[{"manager": "kubectl"}]))
    assert "managedFields" not in store.objects[(NAMESPACE, "a")]["metadata"]
    store.offer(pod("a", 5), deleted=True, now_iso="2026-11-29T00:00:00.000000Z")
    assert store.get(NAMESPACE, "a")["metadata"]["deletionTimestamp"] == "2026-11-29T00:00:00.000000Z"
    store.offer(pod("a", 6, deletionTimestamp="2026-11-29T00:00:01Z"), deleted=True, now_iso="later")
    assert store.get(NAMESPACE, "a")["metadata"]["deletionTimestamp"] == "2026-11-29T00:00:01Z"


def test_store_lists_by_namespace_and_selector() -> None:
    store = cache.Store()
    store.apply("ADDED", pod("a", 1, labels={**SELECTOR, "i": "x"}))
    store.apply("ADDED", pod("b", 2, labels={**SELECTOR, "i": "y"}))
    other = pod("c", 3)
    other["metadata"]["namespace"] = "elsewhere"
    store.apply("ADDED", other)
    assert [o["metadata"]["name"] for o in store.list_(NAMESPACE, {"i": "x"})] == ["a"]
    assert sorted(o["metadata"]["name"] for o in store.list_(None, SELECTOR)) == ["a", "b", "c"]
    assert store.list_("elsewhere", {"i": "x"}) == []


def test_store_index_follows_label_changes() -> None:
    store = cache.Store(index_label="i")
    store.apply("ADDED", pod("a", 1, labels={**SELECTOR, "i": "x"}))
    store.apply("ADDED", pod("b", 2, labels={**SELECTOR, "i": "x"}))
    assert [o["metadata"]["name"] for o in store.list_(NAMESPACE, {"i": "x"})] == ["a", "b"]
    store.apply("MODIFIED", pod("a", 3, labels={**SELECTOR, "i": "y"}))
    assert [o["metadata"]["name"] for o in store.list_(NAMESPACE, {"i": "x"})] == ["b"]
    assert [o["metadata"]["name"] for o in store.list_(NAMESPACE, {"i": "y"})] == ["a"]
    store.apply("DELETED", pod("b", 4, labels={**SELECTOR, "i": "x"}))
    assert store.list_(NAMESPACE, {"i": "x"}) == []
    store.replace([pod("c", 5, labels={**SELECTOR, "i": "x"})], "5")
    assert [o["metadata"]["name"] for o in store.list_(NAMESPACE, {"i": "x", **SELECTOR})] == ["c"]
    assert store.list_(NAMESPACE, {"i": "y"}) == []
    assert store._index == {(NAMESPACE, "x"): {(NAMESPACE, "c")}}


@given(
    versions=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=12, unique=True),
    order=st.randoms(use_true_random=False),
    offered=st.sets(st.integers(min_value=0, max_value=11)),
    delete_last=st.booleans(),
)
def test_store_converges_on_the_newest_whatever_the_order(
        versions: list[int], order: Any, offered: set[int], delete_last: bool) -> None:
    """Watch events and our own write answers may interleave in any order: the store ends at the newest
    version, or without the object when the newest is its deletion, and never moves backwards."""
    newest = max(versions)
    steps = [("DELETED" if delete_last and v == newest else "MODIFIED", v) for v in versions]
    order.shuffle(steps)
    store = cache.Store()
    seen = 0
    for index, (kind, version) in enumerate(steps):
        if kind == "MODIFIED" and index in offered:
            store.offer(pod("a", version))
        else:
            store.apply(kind, pod("a", version))
        held = store.get(NAMESPACE, "a")
        if held is not None:
            current = int(held["metadata"]["resourceVersion"])
            assert current >= seen
            seen = current
    final = store.get(NAMESPACE, "a")
    if delete_last:
        assert final is None
    else:
        assert final is not None and int(final["metadata"]["resourceVersion"]) == newest


# -- Informer and Cache against the emulated API server ----------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[kubeemu.Running]:
    async with kubeemu.serve(namespaces=[NAMESPACE]) as running:
        yield running


@contextlib.asynccontextmanager
async def started(client: kube.Kube, *, namespace: str | None = NAMESPACE,
                  **options: Any) -> AsyncIterator[cache.Cache]:
    reads = cache.Cache.of(client, (kube.PODS,), (namespace,), SELECTOR, retry_delay=0.2, **options)
    reads.start()
    try:
        await eventually(lambda: reads.synced, within=20, what="the cache in sync")
        yield reads
    finally:
        await reads.stop()


async def connect(api: kubeemu.Running) -> kube.Kube:
    return await kube.Kube.connect(str(api.kubeconfig), None, kube.RetryPolicy(attempts=2, timeout=5))


async def names(reads: cache.Reader, selector: dict[str, str] | None = None) -> list[str]:
    found = await reads.list_(kube.PODS, NAMESPACE, selector or SELECTOR)
    return sorted(p["metadata"]["name"] for p in found)


async def test_informer_follows_what_others_write(api: kubeemu.Running) -> None:
    ours, theirs = await connect(api), await connect(api)
    try:
        await theirs.create(kube.PODS, NAMESPACE, pod("before", None))
        async with started(ours) as reads:
            assert await names(reads) == ["before"]
            await theirs.create(kube.PODS, NAMESPACE, pod("added", None))
            await theirs.create(kube.PODS, NAMESPACE, pod("foreign", None, labels={"app": "other"}))
            await eventually(lambda: ("added" in [k[1] for k in reads.informers[0].store.objects]),
                             within=10, what="the watch event of the new pod")
            await theirs.patch(kube.PODS, NAMESPACE, "added", {"metadata": {"annotations": {"x": "1"}}})
            await eventually(
                lambda: (reads.informers[0].store.get(NAMESPACE, "added") or {})
                .get("metadata", {}).get("annotations", {}).get("x") == "1",
                within=10, what="the watch event of the patch")
            await theirs.delete(kube.PODS, NAMESPACE, "before")
            await eventually(lambda: reads.informers[0].store.get(NAMESPACE, "before") is None,
                             within=10, what="the watch event of the deletion")
            assert await names(reads) == ["added"]
            # Not ours by label: not in the cache, and a read by name asks the API server.
            assert (await reads.get(kube.PODS, NAMESPACE, "foreign") or {})["metadata"]["name"] == "foreign"
            assert await reads.get(kube.PODS, NAMESPACE, "never-was") is None
            # A read the informer does not cover (another namespace) goes to the API server too.
            assert await reads.list_(kube.PODS, "elsewhere", SELECTOR) == []
    finally:
        await ours.close()
        await theirs.close()


async def test_our_own_writes_are_read_back_at_once(api: kubeemu.Running) -> None:
    ours, theirs = await connect(api), await connect(api)
    try:
        async with started(ours) as reads:
            for task in reads._tasks:  # no more watch events: only the write answers can update the store
                task.cancel()
            await asyncio.sleep(0.1)
            await ours.create(kube.PODS, NAMESPACE, pod("mine", None))
            await ours.patch(kube.PODS, NAMESPACE, "mine", {"metadata": {"annotations": {"drain": "yes"}}})
            held = await reads.get(kube.PODS, NAMESPACE, "mine")
            assert held is not None and held["metadata"]["annotations"] == {"drain": "yes"}
            await ours.delete(kube.PODS, NAMESPACE, "mine")
            held = await reads.get(kube.PODS, NAMESPACE, "mine")
            assert held is not None and held["metadata"].get("deletionTimestamp"), \
                "a pod we deleted reads as being deleted until the watch says it is gone"
            await theirs.create(kube.PODS, NAMESPACE, pod("theirs", None))
            assert "theirs" not in await names(reads), "the watch is stopped: the check above means something"
    finally:
        await ours.close()
        await theirs.close()


def relists(resource: str) -> float:
    return metrics.REGISTRY.get_sample_value("mailrelay_operator_cache_relists_total",
                                             {"resource": resource}) or 0.0


async def test_gone_410_lists_again(api: kubeemu.Running) -> None:
    ours, theirs = await connect(api), await connect(api)
    expired = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                           "reason": "Expired", "code": 410, "message": "too old"}}
    api.emulator[kmock.action.WATCH, kmock.resource(kubeemu.PODS.key)][:1] << (expired,)
    relists_before = relists("pods")
    try:
        async with started(ours) as reads:
            informer = reads.informers[0]
            await eventually(lambda: informer.restarts >= 1, within=10, what="a new list after 410")
            assert relists("pods") >= relists_before + 1
            await eventually(lambda: informer.synced, within=10, what="in sync again")
            await theirs.create(kube.PODS, NAMESPACE, pod("after", None))
            await eventually(lambda: informer.store.get(NAMESPACE, "after") is not None, within=10,
                             what="the second watch's events")
    finally:
        await ours.close()
        await theirs.close()
    lists = [r for r in api.emulator if str(getattr(r.method, "value", r.method)).upper() == "GET"
             and r.url.path == kube.PODS.path(NAMESPACE) and "watch" not in r.params]
    assert len(lists) >= 2, "the informer listed only once"


@contextlib.asynccontextmanager
async def api_server_process(port: int, kubeconfig: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """The emulated API server as its own process (`python -m mailrelay_sandbox.kubeemu`), killed on exit."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailrelay_sandbox.kubeemu", "--port", str(port), "--kubeconfig",
        str(kubeconfig), "--namespace", NAMESPACE, stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
        assert json.loads(line)["url"].endswith(f":{port}")
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_after_a_broken_stream_it_reads_the_api_then_lists_again(tmp_path: Path) -> None:
    """The API server dies (SIGKILL): the informer falls out of sync and reads go to the API server; once
    one is back, a fresh list drops what was deleted meanwhile and picks up what was created."""
    port = scenario.free_port()
    kubeconfig = tmp_path / "kubeconfig"
    async with api_server_process(port, kubeconfig) as first:
        client = await kube.Kube.connect(str(kubeconfig), None, kube.RetryPolicy(attempts=2, timeout=5))
        await client.create(kube.PODS, NAMESPACE, pod("kept", None))
        await client.create(kube.PODS, NAMESPACE, pod("removed-meanwhile", None))
        reads = cache.Cache.of(client, (kube.PODS,), (NAMESPACE,), SELECTOR, retry_delay=0.2,
                               max_retry_delay=0.5)
        reads.start()
        try:
            await eventually(lambda: reads.synced, within=20, what="the cache in sync")
            assert await names(reads) == ["kept", "removed-meanwhile"]
            first.kill()
            await first.wait()
            await eventually(lambda: not reads.synced, within=20, what="out of sync once the server died")
            with pytest.raises(kube.ApiError):  # out of sync: read from the API server, which is down
                await reads.list_(kube.PODS, NAMESPACE, SELECTOR)
            async with api_server_process(port, kubeconfig):
                await client.create(kube.PODS, NAMESPACE, pod("kept", None))
                await client.create(kube.PODS, NAMESPACE, pod("created-meanwhile", None))
                await eventually(lambda: reads.synced, within=30, what="in sync again")
                assert await names(reads) == ["created-meanwhile", "kept"]
                assert reads.informers[0].restarts >= 1
        finally:
            await reads.stop()
            await client.close()


# -- the operator reads through the cache ------------------------------------------------------------


async def test_scaling_loop_makes_no_get_or_list_per_tick(
        api: kubeemu.Running, cluster: controlplane.ControlPlane) -> None:
    operator = OperatorHarness(api, resync_seconds=3600.0)
    await operator.start()
    try:
        async with controlplane.Api(api.url, token="test-client") as http:
            await http.request("POST", scenario.mailrelay_path(NAMESPACE),
                               scenario.mailrelay("cached", NAMESPACE, interval=1))

        def last_tick() -> float:
            return metrics.REGISTRY.get_sample_value(
                "mailrelay_operator_last_reconcile_timestamp_seconds",
                {"namespace": NAMESPACE, "mailrelay": "cached"}) or 0.0

        def status() -> dict[str, Any]:
            return (api.emulator.peek(kubeemu.MAILRELAYS, NAMESPACE, "cached") or {}).get("status") or {}

        await eventually(lambda: status().get("readyReplicas") == 1, within=60, what="one ready relay")
        await asyncio.sleep(1.5)  # the tick that saw the relay ready has ended
        start = len(list(api.emulator))
        ticked = last_tick()
        await eventually(lambda: last_tick() >= ticked + 3, within=30, what="three more ticks")
        window = list(api.emulator)[start:]
    finally:
        await operator.stop()
    operator_reads = [
        (str(getattr(r.method, "value", r.method)).upper(), r.url.path)
        for r in window
        if r.headers.get("User-Agent") == kube.USER_AGENT
        and str(getattr(r.method, "value", r.method)).upper() == "GET" and "watch" not in r.params
    ]
    assert operator_reads == [], "the scaling loop read from the API server instead of its cache"
    assert any(r.headers.get("User-Agent") == kube.USER_AGENT for r in window), "the operator was silent"
    assert status().get("readyReplicas") == 1
