"""API-level tests of scaling and draining: the real operator (Kopf, in-process) against the emulated API
server, real relays on 127.A.B.x (simulated ReplicaSet + kubelet), load as real SMTP sessions held open."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from mailrelay_operator import drain, manifests
from mailrelay_sandbox import controlplane, kubeemu, scenario

from tests.operator.conftest import NAMESPACE, OperatorHarness, Sessions, eventually

NAME = "outbound"
MR_PATH = scenario.mailrelay_path(NAMESPACE, NAME)


# -- helpers -----------------------------------------------------------------------------------------


def mailrelay(api: kubeemu.Running) -> dict[str, Any] | None:
    return api.emulator.peek(kubeemu.MAILRELAYS, NAMESPACE, NAME)


def condition(api: kubeemu.Running, type_: str) -> dict[str, Any]:
    obj = mailrelay(api) or {}
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def live_pods(api: kubeemu.Running) -> dict[str, dict[str, Any]]:
    return {
        p["metadata"]["name"]: p
        for p in api.emulator.peek_all(kubeemu.PODS, NAMESPACE, manifests.selector(NAME))
        if not p["metadata"].get("deletionTimestamp")
    }


def replicas(api: kubeemu.Running) -> int | None:
    dep = api.emulator.peek(kubeemu.DEPLOYMENTS, NAMESPACE, NAME)
    return None if dep is None else int(dep["spec"]["replicas"])


def events(api: kubeemu.Running) -> list[tuple[str, str]]:
    """(reason, message) of the operator's Events about the MailRelay, in creation order."""
    found = [
        e
        for e in api.emulator.peek_all(kubeemu.EVENTS, NAMESPACE)
        if (e.get("involvedObject") or {}).get("name") == NAME
        and (e.get("source") or {}).get("component") == "mailrelay-operator"
    ]
    found.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
    return [(e["reason"], e["message"]) for e in found]


def draining(api: kubeemu.Running) -> set[str]:
    return {
        name
        for name, pod in live_pods(api).items()
        if drain.DRAIN_STARTED_ANNOTATION in (pod["metadata"].get("annotations") or {})
    }


def ever_annotated(api: kubeemu.Running, pod: str) -> bool:
    history = api.emulator.objects[kubeemu.PODS.key, NAMESPACE, pod].history
    return any(
        v is not None and drain.DRAIN_STARTED_ANNOTATION in (v.get("metadata", {}).get("annotations") or {})
        for v in history
    )


async def relay_status(cluster: controlplane.ControlPlane, pod: str) -> dict[str, Any]:
    runtime = cluster.runtimes[pod]
    token = runtime.token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
        http.get(f"{runtime.admin_url}/status", headers=headers) as response,
    ):
        assert response.status == 200
        result: dict[str, Any] = await response.json()
        return result


async def relay_draining(cluster: controlplane.ControlPlane, pod: str, expected: bool) -> None:
    """Wait until the relay itself reports `draining == expected` (the operator records, then calls)."""

    async def check() -> bool:
        return bool((await relay_status(cluster, pod))["draining"] is expected)

    await eventually(check, within=15, what=f"{pod} draining={expected}")


async def start(
    api: kubeemu.Running, client: controlplane.Api, cluster: controlplane.ControlPlane, **knobs: Any
) -> None:
    """Create the MailRelay and wait until its minimum of relays serve."""
    await client.request(
        "POST", scenario.mailrelay_path(NAMESPACE), scenario.mailrelay(NAME, NAMESPACE, **knobs)
    )
    want = knobs.get("min_replicas", 1)

    def serving() -> bool:
        return (
            condition(api, "Ready").get("status") == "True"
            and len(live_pods(api)) == want
            and all(p in cluster.runtimes and cluster.runtimes[p].ready for p in live_pods(api))
        )

    await eventually(serving, within=60, what=f"{want} relays ready")


# -- tests -------------------------------------------------------------------------------------------


async def test_load_scales_up_sets_overloaded_and_load_gone_drains_one_then_lowers(
    api: kubeemu.Running,
    operator: OperatorHarness,
    cluster: controlplane.ControlPlane,
    client: controlplane.Api,
    sessions: Sessions,
) -> None:
    await start(
        api,
        client,
        cluster,
        min_replicas=1,
        max_replicas=2,
        sessions_per_pod=5,
        max_sessions_per_pod=10,
        scale_down_stabilization=2,
    )
    first = next(iter(live_pods(api)))
    await sessions.hold(cluster, first, 10)  # 10 sessions for a target of 5 per relay: 2 relays
    await eventually(lambda: replicas(api) == 2, within=30, what="scale-up to 2")
    await eventually(
        lambda: ("ScaledUp", "Deployment outbound replicas 1 -> 2") in events(api),
        within=10,
        what="ScaledUp event",
    )
    assert condition(api, "Overloaded").get("status") == "False"
    await eventually(
        lambda: len([p for p in live_pods(api) if p in cluster.runtimes and cluster.runtimes[p].ready]) == 2,
        within=60,
        what="second relay ready",
    )
    second = next(p for p in live_pods(api) if p != first)
    await sessions.hold(cluster, second, 10)  # 20 sessions: 4 relays wanted, max is 2
    await eventually(
        lambda: condition(api, "Overloaded").get("status") == "True", within=30, what="Overloaded"
    )
    assert condition(api, "Overloaded")["reason"] == "DemandAboveMaximum"
    assert replicas(api) == 2  # never above max
    await eventually(
        lambda: ((mailrelay(api) or {}).get("status") or {}).get("sessions") == 20,
        within=30,
        what="all 20 sessions scraped",
    )
    status = (mailrelay(api) or {})["status"]
    assert status["desiredReplicas"] == 2 and condition(api, "Overloaded")["status"] == "True"

    # Load gone: one relay drains first, then the count goes down.
    await sessions.release()
    await eventually(lambda: replicas(api) == 1, within=60, what="scale-in to 1")
    await eventually(
        lambda: condition(api, "Overloaded").get("status") == "False", within=30, what="not Overloaded"
    )
    await eventually(
        lambda: "ScaledDown" in [reason for reason, _ in events(api)], within=10, what="ScaledDown event"
    )
    reasons = [reason for reason, _ in events(api)]
    assert "DrainStarted" in reasons and "DrainCompleted" in reasons and "ScaledDown" in reasons
    assert reasons.index("DrainStarted") < reasons.index("DrainCompleted") < reasons.index("ScaledDown")
    gone = {first, second} - set(live_pods(api))
    assert len(gone) == 1
    (victim,) = gone
    assert ever_annotated(api, victim), "the removed relay was drained first"
    assert not any(ever_annotated(api, p) for p in live_pods(api)), "only one relay was drained"
    await eventually(
        lambda: any(t.pod == victim for t in cluster.terminations), within=30, what="termination"
    )
    ended = next(t for t in cluster.terminations if t.pod == victim)
    assert ended.was_drained and not ended.killed and ended.spool_left == 0


async def test_demand_rising_mid_drain_resumes_the_relay(
    api: kubeemu.Running,
    operator: OperatorHarness,
    cluster: controlplane.ControlPlane,
    client: controlplane.Api,
    sessions: Sessions,
) -> None:
    await start(
        api,
        client,
        cluster,
        min_replicas=1,
        max_replicas=3,
        sessions_per_pod=5,
        max_sessions_per_pod=10,
        scale_down_stabilization=1,
    )
    await client.patch(MR_PATH, {"spec": {"replicas": {"min": 2}}})
    await eventually(
        lambda: (
            len(live_pods(api)) == 2
            and all(p in cluster.runtimes and cluster.runtimes[p].ready for p in live_pods(api))
        ),
        within=60,
        what="2 relays",
    )
    await client.patch(MR_PATH, {"spec": {"replicas": {"min": 1}}})
    a, b = sorted(live_pods(api))
    await sessions.hold(cluster, a, 1)  # a has the fewest sessions: it is the one drained
    await sessions.hold(cluster, b, 2)
    await eventually(lambda: draining(api) == {a}, within=30, what="drain of the idlest relay")
    await eventually(lambda: condition(api, "Draining").get("status") == "True", within=30, what="Draining")
    await relay_draining(cluster, a, True)
    assert replicas(api) == 2  # the count is not lowered while the relay still holds a session

    await sessions.hold(cluster, b, 8)  # demand rises: b alone has 10 sessions, 2 relays wanted
    await eventually(lambda: not draining(api), within=30, what="resume")
    await relay_draining(cluster, a, False)
    await eventually(
        lambda: "DrainCancelled" in [reason for reason, _ in events(api)],
        within=10,
        what="DrainCancelled event",
    )
    assert set(live_pods(api)) == {a, b} and replicas(api) == 2
    await eventually(
        lambda: condition(api, "Draining").get("status") == "False", within=30, what="not Draining"
    )


async def test_operator_restart_mid_drain_finishes_the_drain(
    api: kubeemu.Running,
    operator: OperatorHarness,
    cluster: controlplane.ControlPlane,
    client: controlplane.Api,
    sessions: Sessions,
) -> None:
    await start(
        api,
        client,
        cluster,
        min_replicas=2,
        max_replicas=3,
        sessions_per_pod=5,
        max_sessions_per_pod=10,
        scale_down_stabilization=1,
    )
    a, b = sorted(live_pods(api))
    await sessions.hold(cluster, a, 1)
    await sessions.hold(cluster, b, 2)
    await client.patch(MR_PATH, {"spec": {"replicas": {"min": 1}}})
    await eventually(lambda: draining(api) == {a}, within=30, what="drain started")
    await operator.stop()
    started = (live_pods(api)[a]["metadata"]["annotations"])[drain.DRAIN_STARTED_ANNOTATION]
    await sessions.release(a)  # the drain completes while no operator runs
    await asyncio.sleep(1)
    assert replicas(api) == 2 and a in live_pods(api)
    await operator.start()
    await eventually(lambda: replicas(api) == 1 and a not in live_pods(api), within=60, what="drain finished")
    # A ReplicaSet may briefly replace the deleted pod before it sees the lower count; it converges.
    await eventually(lambda: set(live_pods(api)) == {b}, within=30, what="only b left")
    assert not ever_annotated(api, b), "the restarted operator did not start a second drain"
    # The restarted operator carried on from the pod's record: the drain start time was never rewritten.
    history = api.emulator.objects[kubeemu.PODS.key, NAMESPACE, a].history
    stamps = {
        (v.get("metadata", {}).get("annotations") or {}).get(drain.DRAIN_STARTED_ANNOTATION)
        for v in history
        if v is not None
    } - {None}
    assert stamps == {started}


async def test_maintenance_drains_every_relay_and_resumes(
    api: kubeemu.Running,
    operator: OperatorHarness,
    cluster: controlplane.ControlPlane,
    client: controlplane.Api,
) -> None:
    await start(api, client, cluster, min_replicas=2, max_replicas=3)
    pods = set(live_pods(api))
    await client.patch(MR_PATH, {"spec": {"maintenance": True}})
    await eventually(lambda: draining(api) == pods, within=30, what="every relay draining")
    for pod in pods:
        await relay_draining(cluster, pod, True)
    await eventually(
        lambda: condition(api, "Ready").get("reason") == "Maintenance", within=30, what="Ready=False"
    )
    assert condition(api, "Draining")["reason"] == "Maintenance"
    await asyncio.sleep(2)
    assert set(live_pods(api)) == pods and replicas(api) == 2  # drained relays stay during maintenance
    await client.patch(MR_PATH, {"spec": {"maintenance": False}})
    await eventually(lambda: not draining(api), within=30, what="every relay resumed")
    for pod in pods:
        await relay_draining(cluster, pod, False)
    await eventually(lambda: condition(api, "Ready").get("status") == "True", within=60, what="Ready again")


async def test_delete_drains_every_relay_through_the_finalizer(
    api: kubeemu.Running,
    operator: OperatorHarness,
    cluster: controlplane.ControlPlane,
    client: controlplane.Api,
    sessions: Sessions,
) -> None:
    await start(api, client, cluster, min_replicas=2, max_replicas=3)
    a, b = sorted(live_pods(api))
    await sessions.hold(cluster, a, 1)
    await client.request("DELETE", MR_PATH)
    await eventually(lambda: draining(api) == {a, b}, within=30, what="every relay draining")
    await relay_draining(cluster, b, True)
    await asyncio.sleep(2)
    obj = mailrelay(api)
    assert obj is not None and obj["metadata"].get("deletionTimestamp"), "held by the finalizer"
    assert api.emulator.peek(kubeemu.DEPLOYMENTS, NAMESPACE, NAME) is not None
    await sessions.release(a)
    await eventually(lambda: mailrelay(api) is None, within=60, what="MailRelay removed")
    await eventually(
        lambda: api.emulator.peek(kubeemu.DEPLOYMENTS, NAMESPACE, NAME) is None,
        within=10,
        what="owned objects collected",
    )
    for res, name in [
        (kubeemu.SERVICES, NAME),
        (kubeemu.SECRETS, f"{NAME}-admin"),
        (kubeemu.PDBS, NAME),
        (kubeemu.NETWORKPOLICIES, NAME),
    ]:
        assert api.emulator.peek(res, NAMESPACE, name) is None
    await eventually(lambda: {t.pod for t in cluster.terminations} >= {a, b}, within=30, what="relays ended")
    assert all(t.was_drained for t in cluster.terminations if t.pod in (a, b))
