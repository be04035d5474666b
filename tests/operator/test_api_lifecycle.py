"""API-level tests: the real operator (Kopf, in-process) against the emulated API server, with real relay
processes on 127.A.B.x played by the simulated control plane (ReplicaSet + kubelet)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from mailrelay_operator import manifests
from mailrelay_sandbox import controlplane, kubeemu, scenario

from tests.conftest import require_tool
from tests.operator.conftest import NAMESPACE, OperatorHarness, eventually

NAME = "outbound"


def relay_object(**knobs: Any) -> dict[str, Any]:
    return scenario.mailrelay(NAME, NAMESPACE, **knobs)


def mailrelay(api: kubeemu.Running) -> dict[str, Any]:
    obj = api.emulator.peek(kubeemu.MAILRELAYS, NAMESPACE, NAME)
    assert obj is not None
    return obj


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def pods(api: kubeemu.Running) -> list[dict[str, Any]]:
    return [
        p
        for p in api.emulator.peek_all(kubeemu.PODS, NAMESPACE, manifests.selector(NAME))
        if not p["metadata"].get("deletionTimestamp")
    ]


def deployment_replicas(api: kubeemu.Running) -> int | None:
    dep = api.emulator.peek(kubeemu.DEPLOYMENTS, NAMESPACE, NAME)
    return None if dep is None else int(dep["spec"]["replicas"])


@pytest.fixture
async def operator_with_endpoints(api: kubeemu.Running) -> AsyncIterator[tuple[OperatorHarness, int, int]]:
    """The operator with its liveness endpoint and metrics listener on free loopback ports."""
    liveness, metrics_port = scenario.free_port(), scenario.free_port()
    harness = OperatorHarness(
        api,
        serve_metrics=True,
        liveness=f"http://127.0.0.1:{liveness}/healthz",
        metrics_port=metrics_port,
        metrics_host="127.0.0.1",
    )
    await harness.start()
    try:
        yield harness, liveness, metrics_port
    finally:
        await harness.stop()


async def test_create_makes_owned_objects_and_ready_relays(
    api: kubeemu.Running,
    operator_with_endpoints: tuple[OperatorHarness, int, int],
    cluster: controlplane.ControlPlane,
    client: controlplane.Api,
) -> None:
    _, liveness_port, metrics_port = operator_with_endpoints
    await client.request("POST", scenario.mailrelay_path(NAMESPACE), relay_object(min_replicas=2))
    kinds = [
        (kubeemu.DEPLOYMENTS, NAME),
        (kubeemu.SERVICES, NAME),
        (kubeemu.SECRETS, f"{NAME}-admin"),
        (kubeemu.PDBS, NAME),
        (kubeemu.NETWORKPOLICIES, NAME),
    ]
    await eventually(
        lambda: all(api.emulator.peek(res, NAMESPACE, n) for res, n in kinds), within=30, what="owned objects"
    )
    owner_uid = mailrelay(api)["metadata"]["uid"]
    for res, n in kinds:
        obj = api.emulator.peek(res, NAMESPACE, n)
        assert obj is not None
        refs = obj["metadata"].get("ownerReferences") or []
        assert [ref["uid"] for ref in refs] == [owner_uid], f"{res.kind} is owned by the MailRelay once"
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "mailrelay-operator"
    assert deployment_replicas(api) == 2
    await eventually(
        lambda: condition(mailrelay(api), "Ready").get("status") == "True", within=60, what="Ready condition"
    )
    status = mailrelay(api)["status"]
    assert status["readyReplicas"] == 2 and status["desiredReplicas"] == 2
    assert status["selector"] == manifests.selector(NAME)
    assert condition(mailrelay(api), "Overloaded")["status"] == "False"
    assert status["observedGeneration"] == mailrelay(api)["metadata"]["generation"]
    # Every relay answered the operator's authenticated /status: no scrape failed.
    assert status["sessions"] == 0 and status["queueMessages"] == 0

    # Drift is repaired: a changed Service port and a deleted PDB come back.
    await client.patch(
        f"/api/v1/namespaces/{NAMESPACE}/services/{NAME}",
        {"spec": {"ports": [{"name": "smtp", "port": 2500, "targetPort": "smtp"}]}},
    )
    await client.request("DELETE", f"/apis/policy/v1/namespaces/{NAMESPACE}/poddisruptionbudgets/{NAME}")
    expected_port = manifests.service(NAME, NAMESPACE)["spec"]["ports"][0]["port"]

    def repaired() -> bool:
        svc = api.emulator.peek(kubeemu.SERVICES, NAMESPACE, NAME)
        return (
            api.emulator.peek(kubeemu.PDBS, NAMESPACE, NAME) is not None
            and svc is not None
            and svc["spec"]["ports"][0]["port"] == expected_port
        )

    await eventually(repaired, within=30, what="drift repair")
    # The admin token was generated once: the Secret was never rewritten.
    secret = api.emulator.peek(kubeemu.SECRETS, NAMESPACE, f"{NAME}-admin")
    assert secret is not None and secret["metadata"]["resourceVersion"]
    history = api.emulator.objects[kubeemu.SECRETS.key, NAMESPACE, f"{NAME}-admin"].history
    tokens = {v["data"]["token"] for v in history if v is not None}
    assert len(tokens) == 1

    # The liveness endpoint answers, and the metrics listener serves valid exposition text.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(f"http://127.0.0.1:{liveness_port}/healthz") as response:
            assert response.status == 200
        async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            assert response.status == 200
            exposition = await response.text()
    series = f'namespace="{NAMESPACE}",mailrelay="{NAME}"'
    for line in (
        f"mailrelay_operator_desired_replicas{{{series}}} 2.0",
        f"mailrelay_operator_ready_replicas{{{series}}} 2.0",
        f"mailrelay_operator_overloaded{{{series}}} 0.0",
    ):
        assert line in exposition.replace(f'mailrelay="{NAME}",namespace="{NAMESPACE}"', series)
    assert "mailrelay_operator_last_reconcile_timestamp_seconds{" in exposition
    # Counters that exist from the first tick, before any event (any value: a relay still starting may
    # have failed a scrape, and the registry is shared with earlier tests of a MailRelay of this name).
    for counter in (
        f"mailrelay_operator_scrape_errors_total{{{series}}} ",
        f'mailrelay_operator_scale_events_total{{direction="down",{series}}} ',
    ):
        assert counter in exposition.replace(f'mailrelay="{NAME}",namespace="{NAMESPACE}"', series)
    promtool = require_tool("promtool")
    process = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate(exposition.encode())
    assert process.returncode == 0, output.decode()


async def test_invalid_spec_is_reported_and_creates_nothing(
    api: kubeemu.Running, operator: OperatorHarness, client: controlplane.Api
) -> None:
    # The emulated API server does not apply the CRD's CEL rules, so the operator's own check shows.
    await client.request(
        "POST", scenario.mailrelay_path(NAMESPACE), relay_object(min_replicas=3, max_replicas=2)
    )
    await eventually(
        lambda: condition(mailrelay(api), "Ready").get("reason") == "InvalidSpec",
        within=30,
        what="InvalidSpec condition",
    )
    assert "min (3) must not exceed max (2)" in condition(mailrelay(api), "Ready")["message"]
    assert api.emulator.peek(kubeemu.DEPLOYMENTS, NAMESPACE, NAME) is None
    # Fixing the spec lets the operator go on.
    await client.patch(scenario.mailrelay_path(NAMESPACE, NAME), {"spec": {"replicas": {"min": 1}}})
    await eventually(lambda: deployment_replicas(api) == 1, within=30, what="Deployment after the fix")
