"""API-level tests: the real operator (Kopf, in-process, with the chart's ServiceAccount token) against the
real control plane, with real relay processes run by the test's process kubelet."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from mailrelay_operator import kube as k
from mailrelay_operator import manifests
from mailrelay_sandbox import apiclient, faultproxy, kubelet, scenario

from tests import kubeenv
from tests.conftest import require_tool
from tests.operator.conftest import OperatorHarness, eventually

NAME = "outbound"


def relay_object(kube: kubeenv.KubeEnv, **knobs: Any) -> dict[str, Any]:
    return scenario.mailrelay(NAME, kube.namespace, **knobs)


def mailrelay(kube: kubeenv.KubeEnv) -> dict[str, Any]:
    obj = kube.get(k.MAILRELAYS, NAME)
    assert obj is not None
    return obj


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def deployment_replicas(kube: kubeenv.KubeEnv) -> int | None:
    dep = kube.get(k.DEPLOYMENTS, NAME)
    return None if dep is None else int(dep["spec"]["replicas"])


@pytest.fixture
async def operator_with_endpoints(kube: kubeenv.KubeEnv) -> AsyncIterator[tuple[OperatorHarness, int, int]]:
    """The operator with its liveness endpoint and metrics listener on free loopback ports."""
    liveness, metrics_port = scenario.free_port(), scenario.free_port()
    harness = OperatorHarness(
        kube,
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
    harness.assert_never_forbidden()


async def test_create_makes_owned_objects_and_ready_relays(
    kube: kubeenv.KubeEnv,
    operator_with_endpoints: tuple[OperatorHarness, int, int],
    node: kubelet.ProcessKubelet,
    client: apiclient.Api,
) -> None:
    _, liveness_port, metrics_port = operator_with_endpoints
    await client.request("POST", kube.path(k.MAILRELAYS), relay_object(kube, min_replicas=2))
    kinds = [
        (k.DEPLOYMENTS, NAME),
        (k.SERVICES, NAME),
        (k.SECRETS, f"{NAME}-admin"),
        (k.PDBS, NAME),
        (k.NETWORKPOLICIES, NAME),
    ]
    await eventually(
        lambda: all(kube.get(res, n) for res, n in kinds), within=30, what="owned objects"
    )
    owner_uid = mailrelay(kube)["metadata"]["uid"]
    secret_before = kube.get(k.SECRETS, f"{NAME}-admin")
    for res, n in kinds:
        obj = kube.get(res, n)
        assert obj is not None
        refs = obj["metadata"].get("ownerReferences") or []
        assert [ref["uid"] for ref in refs] == [owner_uid], f"{res.kind} is owned by the MailRelay once"
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "mailrelay-operator"
    assert deployment_replicas(kube) == 2
    await eventually(
        lambda: condition(mailrelay(kube), "Ready").get("status") == "True", within=60, what="Ready condition"
    )
    status = mailrelay(kube)["status"]
    assert status["readyReplicas"] == 2 and status["desiredReplicas"] == 2
    assert status["selector"] == manifests.selector(NAME)
    assert condition(mailrelay(kube), "Overloaded")["status"] == "False"
    assert status["observedGeneration"] == mailrelay(kube)["metadata"]["generation"]
    # Every relay answered the operator's authenticated /status: no scrape failed.
    assert status["sessions"] == 0 and status["queueMessages"] == 0

    # Drift is repaired: a changed Service port and a deleted PDB come back.
    await client.request(
        "PATCH", kube.path(k.SERVICES, NAME),
        [{"op": "replace", "path": "/spec/ports/0/port", "value": 2500}],
        content_type="application/json-patch+json",
    )
    await client.request("DELETE", kube.path(k.PDBS, NAME))
    expected_port = manifests.service(NAME, kube.namespace)["spec"]["ports"][0]["port"]

    def repaired() -> bool:
        svc = kube.get(k.SERVICES, NAME)
        return (
            kube.get(k.PDBS, NAME) is not None
            and svc is not None
            and svc["spec"]["ports"][0]["port"] == expected_port
        )

    await eventually(repaired, within=30, what="drift repair")
    # The admin token was generated once: the Secret was never rewritten.
    secret = kube.get(k.SECRETS, f"{NAME}-admin")
    assert secret is not None and secret_before is not None
    assert secret["data"]["token"] == secret_before["data"]["token"]
    assert secret["metadata"]["uid"] == secret_before["metadata"]["uid"]

    # The liveness endpoint answers, and the metrics listener serves valid exposition text.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(f"http://127.0.0.1:{liveness_port}/healthz") as response:
            assert response.status == 200
        async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            assert response.status == 200
            exposition = await response.text()
    series = f'namespace="{kube.namespace}",mailrelay="{NAME}"'
    for line in (
        f"mailrelay_operator_desired_replicas{{{series}}} 2.0",
        f"mailrelay_operator_ready_replicas{{{series}}} 2.0",
        f"mailrelay_operator_overloaded{{{series}}} 0.0",
    ):
        assert line in exposition.replace(f'mailrelay="{NAME}",namespace="{kube.namespace}"', series)
    assert "mailrelay_operator_last_reconcile_timestamp_seconds{" in exposition
    # Counters that exist from the first tick, before any event (any value: a relay still starting may
    # have failed a scrape, and the registry is shared with earlier tests of a MailRelay of this name).
    for counter in (
        f"mailrelay_operator_scrape_errors_total{{{series}}} ",
        f'mailrelay_operator_scale_events_total{{direction="down",{series}}} ',
    ):
        assert counter in exposition.replace(f'mailrelay="{NAME}",namespace="{kube.namespace}"', series)
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


async def test_invalid_spec_is_refused_by_the_server_with_the_crd_message(
    kube: kubeenv.KubeEnv, operator: OperatorHarness, client: apiclient.Api
) -> None:
    """The API server applies the CRD's CEL rules: an invalid MailRelay never reaches the operator."""
    try:
        await client.request("POST", kube.path(k.MAILRELAYS),
                             relay_object(kube, min_replicas=3, max_replicas=2))
    except apiclient.ApiError as exc:
        assert exc.status == 422
        assert "replicas.min must not exceed replicas.max" in exc.text
    else:
        raise AssertionError("the API server accepted replicas.min > replicas.max")
    assert kube.get(k.MAILRELAYS, NAME) is None
    # A valid one goes through, and the operator acts on it.
    await client.request("POST", kube.path(k.MAILRELAYS), relay_object(kube, min_replicas=1))
    await eventually(lambda: deployment_replicas(kube) == 1, within=30, what="the Deployment")


OWNED_PATH = r"/(services|secrets|poddisruptionbudgets|networkpolicies|deployments)/outbound(-admin)?$"


async def test_resync_applies_only_what_changed(
    kube: kubeenv.KubeEnv, node: kubelet.ProcessKubelet, client: apiclient.Api,
    proxy: faultproxy.FaultProxy,
) -> None:
    """Every resync reads the owned objects; it applies one only when it differs from what the operator
    last applied (the applied-digest annotation), so a quiet MailRelay costs GETs, not writes. A field
    someone changed by hand, and a spec change, are applied at the next resync."""
    assert proxy.kubeconfig is not None
    harness = OperatorHarness(kube, kubeconfig=proxy.kubeconfig, resync_seconds=1.0)
    await harness.start()
    try:
        await client.request("POST", kube.path(k.MAILRELAYS), relay_object(kube, min_replicas=1))
        await eventually(lambda: condition(mailrelay(kube), "Ready").get("status") == "True", within=60,
                         what="Ready condition")

        def owned(method: str, since: float) -> list[faultproxy.Record]:
            return [r for r in proxy.requests(agent=k.USER_AGENT, since=since)
                    if r.method == method and re.search(OWNED_PATH, r.path)]

        quiet = time.time()
        # three resyncs (each reads all five owned objects), and not one apply among them
        await eventually(lambda: len(owned("GET", quiet)) >= 15, within=60, what="three resyncs")
        assert owned("PATCH", quiet) == [], [r.path for r in owned("PATCH", quiet)]

        # a label of ours removed by hand: the next resync applies the Service again, and only it
        touched = time.time()
        await client.request("PATCH", kube.path(k.SERVICES, NAME),
                             [{"op": "remove", "path": "/metadata/labels/app.kubernetes.io~1managed-by"}],
                             content_type="application/json-patch+json")
        await eventually(lambda: (kube.get(k.SERVICES, NAME) or {}).get("metadata", {}).get("labels", {})
                         .get("app.kubernetes.io/managed-by") == "mailrelay-operator",
                         within=30, what="the label put back")
        assert {r.path.rsplit("/", 2)[-2] for r in owned("PATCH", touched)} == {"services"}
    finally:
        await harness.stop()
    harness.assert_never_forbidden()
