"""The emulated API server's extensions over kmock (sandbox/mailrelay_sandbox/kubeemu.py), over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from mailrelay_sandbox import kubeemu

MERGE = {"Content-Type": "application/merge-patch+json"}


@pytest.fixture
async def emu() -> AsyncIterator[kubeemu.Running]:
    async with kubeemu.serve(graceful_pod_deletion=True) as running:
        yield running


async def call(emu: kubeemu.Running, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, emu.url + path, **kwargs) as resp:
        return resp.status, await resp.json()


async def test_discovery_lists_every_resource_the_operator_touches(emu: kubeemu.Running) -> None:
    status, core = await call(emu, "GET", "/api/v1")
    assert status == 200
    names = {entry["name"] for entry in core["resources"]}
    assert {"namespaces", "pods", "secrets", "services", "events"} <= names
    for group_version, plural in [
        ("apps/v1", "deployments"),
        ("policy/v1", "poddisruptionbudgets"),
        ("networking.k8s.io/v1", "networkpolicies"),
        ("mailrelay.dev/v1alpha1", "mailrelays"),
    ]:
        status, listing = await call(emu, "GET", f"/apis/{group_version}")
        assert status == 200
        assert plural in {entry["name"] for entry in listing["resources"]}
    status, listing = await call(emu, "GET", "/apis/mailrelay.dev/v1alpha1")
    assert {"mailrelays/status", "mailrelays/scale"} <= {entry["name"] for entry in listing["resources"]}
    assert emu.kubeconfig.read_text().count(emu.url) == 1


async def test_namespaces_and_generated_metadata(emu: kubeemu.Running) -> None:
    status, listing = await call(emu, "GET", "/api/v1/namespaces")
    assert status == 200 and [ns["metadata"]["name"] for ns in listing["items"]] == ["default"]
    status, first = await call(
        emu, "POST", kubeemu.EVENTS.path("default"), json={"metadata": {"generateName": "ev-"}, "reason": "A"}
    )
    assert status == 200
    status, second = await call(
        emu, "POST", kubeemu.EVENTS.path("default"), json={"metadata": {"generateName": "ev-"}, "reason": "B"}
    )
    assert status == 200
    assert first["metadata"]["name"] != second["metadata"]["name"]
    assert first["metadata"]["uid"] != second["metadata"]["uid"]
    assert first["metadata"]["namespace"] == "default"
    assert first["metadata"]["generation"] == 1 and first["metadata"]["creationTimestamp"]


async def test_resource_version_generation_and_conflicts(emu: kubeemu.Running) -> None:
    status, dep = await call(
        emu,
        "POST",
        kubeemu.DEPLOYMENTS.path("default"),
        json={"metadata": {"name": "d"}, "spec": {"replicas": 1}},
    )
    assert status == 200
    rv0 = int(dep["metadata"]["resourceVersion"])
    status, dep = await call(
        emu,
        "PATCH",
        kubeemu.DEPLOYMENTS.path("default", "d"),
        headers=MERGE,
        json={"metadata": {"labels": {"x": "y"}}},
    )
    assert int(dep["metadata"]["resourceVersion"]) > rv0 and dep["metadata"]["generation"] == 1
    status, dep = await call(
        emu, "PATCH", kubeemu.DEPLOYMENTS.path("default", "d"), headers=MERGE, json={"spec": {"replicas": 3}}
    )
    assert dep["metadata"]["generation"] == 2
    status, body = await call(
        emu,
        "PATCH",
        kubeemu.DEPLOYMENTS.path("default", "d"),
        headers=MERGE,
        json={"metadata": {"resourceVersion": str(rv0)}, "spec": {"replicas": 5}},
    )
    assert status == 409 and body["reason"] == "Conflict"
    assert emu.emulator.peek(kubeemu.DEPLOYMENTS, "default", "d")["spec"]["replicas"] == 3  # type: ignore[index]
    stale_test = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": str(rv0)},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x"]},
    ]
    status, body = await call(
        emu,
        "PATCH",
        kubeemu.DEPLOYMENTS.path("default", "d"),
        json=stale_test,
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert status == 422  # as the real API server answers a failed JSON-patch test (Kopf relies on it)
    current = emu.emulator.peek(kubeemu.DEPLOYMENTS, "default", "d")
    assert current is not None and "finalizers" not in current["metadata"]
    fresh_test = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": current["metadata"]["resourceVersion"]},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x"]},
    ]
    status, body = await call(
        emu,
        "PATCH",
        kubeemu.DEPLOYMENTS.path("default", "d"),
        json=fresh_test,
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert status == 200 and body["metadata"]["finalizers"] == ["x"]
    status, _ = await call(
        emu,
        "POST",
        kubeemu.DEPLOYMENTS.path("default"),
        json={"metadata": {"name": "d"}, "spec": {"replicas": 9}},
    )
    assert status == 409


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=a", {"p1", "p2"}),
        ("app==a,tier=web", {"p1"}),
        ("app!=a", {"p3"}),
        ("app in (a,b),!tier", {"p2", "p3"}),
        ("app notin (a)", {"p3"}),
        ("tier", {"p1"}),
    ],
)
async def test_label_selectors_on_list(emu: kubeemu.Running, selector: str, expected: set[str]) -> None:
    for name, labels in [("p1", {"app": "a", "tier": "web"}), ("p2", {"app": "a"}), ("p3", {"app": "b"})]:
        await call(
            emu, "POST", kubeemu.PODS.path("default"), json={"metadata": {"name": name, "labels": labels}}
        )
    status, listing = await call(emu, "GET", kubeemu.PODS.path("default"), params={"labelSelector": selector})
    assert status == 200
    assert {pod["metadata"]["name"] for pod in listing["items"]} == expected
    stored = emu.emulator.peek_all(kubeemu.PODS, "default", selector)
    assert {pod["metadata"]["name"] for pod in stored} == expected


async def test_graceful_pod_deletion_and_garbage_collection(emu: kubeemu.Running) -> None:
    status, dep = await call(
        emu, "POST", kubeemu.DEPLOYMENTS.path("default"), json={"metadata": {"name": "d"}}
    )
    owner = [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "d", "uid": dep["metadata"]["uid"]}]
    for name in ("p1", "p2"):
        await call(
            emu,
            "POST",
            kubeemu.PODS.path("default"),
            json={"metadata": {"name": name, "ownerReferences": owner}},
        )
    status, pod = await call(emu, "DELETE", kubeemu.PODS.path("default", "p1"))
    assert status == 200 and pod["metadata"]["deletionTimestamp"]
    assert emu.emulator.peek(kubeemu.PODS, "default", "p1") is not None  # still terminating
    status, _ = await call(
        emu, "DELETE", kubeemu.PODS.path("default", "p1"), params={"gracePeriodSeconds": "0"}
    )
    assert status == 200
    assert emu.emulator.peek(kubeemu.PODS, "default", "p1") is None
    status, _ = await call(emu, "DELETE", kubeemu.DEPLOYMENTS.path("default", "d"))
    assert status == 200
    assert emu.emulator.peek_all(kubeemu.PODS, "default") == []  # collected with its owner


def test_selector_parser_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="unparsable"):
        kubeemu.selector_matches("a b c", {"a": "b"})


async def test_lean_mode_forgets_histories_but_serves_the_same() -> None:
    async with kubeemu.serve(lean=True) as lean:
        for replicas in range(1, 6):
            if replicas == 1:
                status, _ = await call(
                    lean,
                    "POST",
                    kubeemu.DEPLOYMENTS.path("default"),
                    json={"metadata": {"name": "d"}, "spec": {"replicas": 1}},
                )
            else:
                status, _ = await call(
                    lean,
                    "PATCH",
                    kubeemu.DEPLOYMENTS.path("default", "d"),
                    headers=MERGE,
                    json={"spec": {"replicas": replicas}},
                )
            assert status == 200
        status, dep = await call(lean, "GET", kubeemu.DEPLOYMENTS.path("default", "d"))
        assert status == 200 and dep["spec"]["replicas"] == 5 and dep["metadata"]["generation"] == 5
        assert len(lean.emulator.objects[kubeemu.DEPLOYMENTS.key, "default", "d"].history) == 1
        assert len(list(lean.emulator)) == 1  # only the request being served was kept
