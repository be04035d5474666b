"""API-level tests with injected API errors (kmock reactions): 500s whose write did happen (a lost answer),
409s, and answers slower than the operator's request timeout. The operator retries, and ends with exactly
one of each owned object, one admin token, and the scale change applied."""

from __future__ import annotations

import asyncio
from typing import Any

import kmock
from mailrelay_operator import manifests
from mailrelay_sandbox import controlplane, kubeemu, scenario

from tests.operator.conftest import NAMESPACE, OperatorHarness, Sessions, eventually
from tests.operator.test_api_scaling import NAME, condition, live_pods, replicas

OWNED = [
    (kubeemu.DEPLOYMENTS, NAME),
    (kubeemu.SERVICES, NAME),
    (kubeemu.SECRETS, f"{NAME}-admin"),
    (kubeemu.PDBS, NAME),
    (kubeemu.NETWORKPOLICIES, NAME),
]


def requests(api: kubeemu.Running, method: str, resource: kubeemu.Resource) -> list[Any]:
    wanted = kmock.resource(resource.key)
    return [r for r in list(api.emulator) if r.method == method and r.resource == wanted]


async def test_api_errors_are_retried_without_duplicates(
    api: kubeemu.Running,
    cluster: controlplane.ControlPlane,
    client: controlplane.Api,
) -> None:
    emu = api.emulator

    async def slow() -> None:  # answers after the operator's 2 s request timeout, then as usual
        await asyncio.sleep(3)

    # Creation: the write happens but the answer is lost (500), or is answered 409.
    emu[kmock.method.POST, kmock.resource(kubeemu.SECRETS.key)][:1] << 500
    emu[kmock.method.POST, kmock.resource(kubeemu.DEPLOYMENTS.key)][:2] << 500
    emu[kmock.method.POST, kmock.resource(kubeemu.SERVICES.key)][:1] << 409
    emu[kmock.method.GET, kmock.resource(kubeemu.PDBS.key)][:1] << slow
    only_operator = kmock.params({"labelSelector": manifests.selector(NAME)})  # not the control plane's
    emu[kmock.method.GET, kmock.resource(kubeemu.PODS.key), only_operator][:2] << 503

    operator = OperatorHarness(api, api_timeout=2.0)
    await operator.start()
    try:
        await client.request(
            "POST",
            scenario.mailrelay_path(NAMESPACE),
            scenario.mailrelay(NAME, NAMESPACE, min_replicas=1, max_replicas=3),
        )
        await eventually(lambda: condition(api, "Ready").get("status") == "True", within=60, what="Ready")
        for res, name in OWNED:
            obj = emu.objects[res.key, NAMESPACE, name]
            assert None not in list(obj.history), f"{res.kind} was never deleted and re-created"
            assert emu.peek(res, NAMESPACE, name) is not None
        # The lost answer was retried; the retry met 409 and the operator re-read the existing object.
        assert len(requests(api, "POST", kubeemu.DEPLOYMENTS)) == 2
        assert len(requests(api, "GET", kubeemu.PDBS)) >= 2, "the slow answer was retried"
        tokens = {
            v["data"]["token"]
            for v in emu.objects[kubeemu.SECRETS.key, NAMESPACE, f"{NAME}-admin"].history
            if v is not None
        }
        assert len(tokens) == 1, "the admin token was generated once"
        assert len(live_pods(api)) == 1

        # Scaling through failing and slow Deployment patches.
        emu[kmock.method.PATCH, kmock.resource(kubeemu.DEPLOYMENTS.key)][:2] << 500
        emu[kmock.method.PATCH, kmock.resource(kubeemu.MAILRELAYS.key)][:1] << slow
        held = Sessions()
        try:
            await held.hold(cluster, next(iter(live_pods(api))), 10)  # 2 relays wanted
            await eventually(lambda: replicas(api) == 2, within=60, what="scale-up despite errors")
            # The operator scraped the relay with the token it found in the Secret it did not re-create.
            await eventually(
                lambda: (
                    (
                        (api.emulator.peek(kubeemu.MAILRELAYS, NAMESPACE, NAME) or {})
                        .get("status", {})
                        .get("sessions")
                    )
                    == 10
                ),
                within=30,
                what="scraped load",
            )
        finally:
            await held.release()
        assert len(requests(api, "PATCH", kubeemu.DEPLOYMENTS)) >= 3
        selector = manifests.selector(NAME)
        assert len(emu.peek_all(kubeemu.DEPLOYMENTS, NAMESPACE, selector)) == 1
        assert len(emu.peek_all(kubeemu.SERVICES, NAMESPACE, selector)) == 1
    finally:
        await operator.stop()
