"""API-level tests of scaling and draining: the real operator (Kopf, in-process, with the chart's
ServiceAccount token) against the real control plane; the real ReplicaSet controller creates and removes
the pods, the test's process kubelet runs them as real relays on their pod IPs, and load is real SMTP
sessions held open.

The API server keeps no history of an object, so `PodHistory` watches this test's relay pods from the
start and keeps every version the server sends: "was this pod ever marked for a drain" is answered from
the watch, as any client of the real API would answer it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from mailrelay_operator import drain, manifests, metrics, relayclient
from mailrelay_operator import kube as k
from mailrelay_sandbox import apiclient, kubelet, scenario

from tests import kubeenv
from tests.operator.conftest import OperatorHarness, Sessions, eventually

NAME = "outbound"


# -- reading the cluster -----------------------------------------------------------------------------


def mr_path(kube: kubeenv.KubeEnv) -> str:
    return kube.path(k.MAILRELAYS, NAME)


def mailrelay(kube: kubeenv.KubeEnv) -> dict[str, Any] | None:
    return kube.get(k.MAILRELAYS, NAME)


def condition(kube: kubeenv.KubeEnv, type_: str) -> dict[str, Any]:
    obj = mailrelay(kube) or {}
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def live_pods(kube: kubeenv.KubeEnv) -> dict[str, dict[str, Any]]:
    """The MailRelay's pods that are not being deleted."""
    return {
        p["metadata"]["name"]: p
        for p in kube.list(k.PODS, manifests.selector(NAME))
        if not p["metadata"].get("deletionTimestamp")
    }


def replicas(kube: kubeenv.KubeEnv) -> int | None:
    dep = kube.get(k.DEPLOYMENTS, NAME)
    return None if dep is None else int(dep["spec"]["replicas"])


def events(kube: kubeenv.KubeEnv) -> list[tuple[str, str]]:
    """(reason, message) of the operator's Events about the MailRelay, in the order they were created."""
    found = [
        e
        for e in kube.events()
        if (e.get("involvedObject") or {}).get("name") == NAME
        and (e.get("source") or {}).get("component") == "mailrelay-operator"
    ]
    found.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
    return [(e["reason"], e["message"]) for e in found]


def reasons(kube: kubeenv.KubeEnv) -> list[str]:
    return [reason for reason, _ in events(kube)]


def draining(kube: kubeenv.KubeEnv) -> set[str]:
    return {
        name
        for name, pod in live_pods(kube).items()
        if drain.DRAIN_STARTED_ANNOTATION in (pod["metadata"].get("annotations") or {})
    }


def ready_relays(kube: kubeenv.KubeEnv, node: kubelet.ProcessKubelet) -> set[str]:
    """Live pods whose relay runs on the node and passes its readiness probe."""
    return {p for p in live_pods(kube) if p in node.runtimes and node.runtimes[p].ready}


def sample(name: str, labels: dict[str, str]) -> float:
    """A sample of the in-process operator's registry (0 when the series does not exist yet)."""
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def last_tick(kube: kubeenv.KubeEnv) -> float:
    """When the last finished scaling tick of the MailRelay began (the operator's own gauge)."""
    return sample("mailrelay_operator_last_reconcile_timestamp_seconds",
                  {"namespace": kube.namespace, "mailrelay": NAME})


async def ticks_after(kube: kubeenv.KubeEnv, since: float, count: int = 2) -> None:
    """A barrier: wait until `count` scaling ticks that began after `since` (time.time()) have finished,
    so whatever the operator decides about the state at `since` has been applied."""
    seen = since
    for n in range(count):
        await eventually(lambda mark=seen: last_tick(kube) > mark, within=60,
                         what=f"scaling tick {n + 1} of {count}")
        seen = last_tick(kube)


# -- the relays ---------------------------------------------------------------------------------------


async def relay_status(node: kubelet.ProcessKubelet, pod: str) -> dict[str, Any]:
    runtime = node.runtimes[pod]
    token = runtime.token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
        http.get(f"{runtime.admin_url}/status", headers=headers) as response,
    ):
        assert response.status == 200
        result: dict[str, Any] = await response.json()
        return result


async def relay_reports(node: kubelet.ProcessKubelet, pod: str, key: str, expected: bool) -> None:
    """Wait until the relay itself reports `key == expected` in its /status (draining, drained)."""

    async def check() -> bool:
        return bool((await relay_status(node, pod))[key] is expected)

    await eventually(check, within=30, what=f"{pod} {key}={expected}")


async def relay_draining(node: kubelet.ProcessKubelet, pod: str, expected: bool) -> None:
    """Wait until the relay itself reports `draining == expected` (the operator records, then calls)."""
    await relay_reports(node, pod, "draining", expected)


# -- every version of the pods, from a watch ------------------------------------------------------------


class PodHistory:
    """Every version of this test's relay pods that the API server's watch delivers, from before the
    first pod exists (list, then watch from the list's resourceVersion). A DELETED event ends a pod's
    history with None."""

    def __init__(self, kube: kubeenv.KubeEnv) -> None:
        self.kube = kube
        self.versions: dict[str, list[dict[str, Any] | None]] = {}
        self.relists = 0  # a watch that had to start over (410 Gone) may have missed versions
        self._seen: set[tuple[str, str]] = set()
        self._task: asyncio.Task[None] | None = None
        self._listed = asyncio.Event()

    def _add(self, obj: dict[str, Any], *, deleted: bool = False) -> None:
        meta = obj["metadata"]
        key = (meta["name"], str(meta.get("resourceVersion")) + ("-deleted" if deleted else ""))
        if key in self._seen:
            return
        self._seen.add(key)
        history = self.versions.setdefault(meta["name"], [])
        history.append(obj)
        if deleted:
            history.append(None)

    async def _run(self) -> None:
        ssl_context = ssl.create_default_context(cafile=str(self.kube.ca_file))
        headers = {"Authorization": f"Bearer {self.kube.cluster.admin_token}"}
        base = self.kube.url + self.kube.path(k.PODS)
        selector = urllib.parse.quote(manifests.selector(NAME))
        async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(ssl=ssl_context),
                                         timeout=aiohttp.ClientTimeout(total=None, sock_read=120)) as http:
            version: str | None = None
            while True:
                if version is None:
                    async with http.get(f"{base}?labelSelector={selector}") as response:
                        listed = await response.json()
                    for item in listed.get("items") or []:
                        self._add(item)
                    version = str(listed["metadata"]["resourceVersion"])
                    self._listed.set()
                url = (f"{base}?labelSelector={selector}&watch=true&allowWatchBookmarks=true"
                       f"&timeoutSeconds=60&resourceVersion={version}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(url) as response:
                        if response.status == 410:
                            version, self.relists = None, self.relists + 1
                            continue
                        async for line in response.content:
                            if not line.strip():
                                continue
                            event = json.loads(line)
                            obj = event.get("object") or {}
                            if event.get("type") == "ERROR":
                                if obj.get("code") == 410:
                                    version, self.relists = None, self.relists + 1
                                break
                            version = str(obj["metadata"]["resourceVersion"])
                            if event.get("type") != "BOOKMARK":
                                self._add(obj, deleted=event.get("type") == "DELETED")

    async def __aenter__(self) -> PodHistory:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._listed.wait(), timeout=30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def _has(self, pod: dict[str, Any]) -> bool:
        meta = pod["metadata"]
        return (meta["name"], str(meta["resourceVersion"])) in self._seen

    async def caught_up(self) -> None:
        """A barrier for negative checks: the history holds the current version of every pod the server
        lists now (and, a watch being ordered, every version before it)."""
        await eventually(lambda: all(self._has(p) for p in self.kube.list(k.PODS, manifests.selector(NAME))),
                         within=30, what="the pod watch to catch up with the server")

    def annotations(self, pod: str) -> list[dict[str, str]]:
        return [(v["metadata"].get("annotations") or {}) for v in self.versions.get(pod, []) if v is not None]

    def ever_annotated(self, pod: str) -> bool:
        """Whether the pod ever carried the drain-started annotation."""
        return any(drain.DRAIN_STARTED_ANNOTATION in a for a in self.annotations(pod))

    def drain_stamps(self, pod: str) -> set[str]:
        return {a[drain.DRAIN_STARTED_ANNOTATION] for a in self.annotations(pod)
                if drain.DRAIN_STARTED_ANNOTATION in a}


@pytest.fixture
async def history(kube: kubeenv.KubeEnv) -> AsyncIterator[PodHistory]:
    async with PodHistory(kube) as watching:
        yield watching


class Scrapes:
    """Every round of the operator's relay scrapes (`RelayClient.status_many`): when, and what each relay
    answered (None: it failed). A spy: the real call runs unchanged; the rounds are barriers ("the
    operator looked at the relays again and still did nothing")."""

    def __init__(self) -> None:
        self.rounds: list[tuple[float, dict[str, Any]]] = []

    def since(self, moment: float) -> list[dict[str, Any]]:
        return [answers for at, answers in list(self.rounds) if at >= moment]


@pytest.fixture
def scrapes(monkeypatch: pytest.MonkeyPatch) -> Scrapes:
    spy = Scrapes()
    original = relayclient.RelayClient.status_many

    async def status_many(self: relayclient.RelayClient, endpoints: Any) -> Any:
        started = time.time()
        answers = await original(self, endpoints)
        spy.rounds.append((started, dict(answers)))
        return answers

    monkeypatch.setattr(relayclient.RelayClient, "status_many", status_many)
    return spy


async def start(kube: kubeenv.KubeEnv, client: apiclient.Api, node: kubelet.ProcessKubelet,
                **knobs: Any) -> None:
    """Create the MailRelay and wait until its minimum of relays serve."""
    await client.request("POST", kube.path(k.MAILRELAYS), scenario.mailrelay(NAME, kube.namespace, **knobs))
    want = knobs.get("min_replicas", 1)

    def serving() -> bool:
        pods = live_pods(kube)
        return (
            condition(kube, "Ready").get("status") == "True"
            and len(pods) == want
            and all(p in node.runtimes and node.runtimes[p].ready for p in pods)
        )

    await eventually(serving, within=90, what=f"{want} relays ready")


def termination(node: kubelet.ProcessKubelet, pod: str) -> kubelet.Termination:
    return next(t for t in node.terminations if t.pod == pod)


# -- tests -------------------------------------------------------------------------------------------


async def test_load_scales_up_sets_overloaded_and_load_gone_drains_one_then_lowers(
    kube: kubeenv.KubeEnv,
    operator: OperatorHarness,
    node: kubelet.ProcessKubelet,
    client: apiclient.Api,
    sessions: Sessions,
    history: PodHistory,
) -> None:
    await start(kube, client, node, min_replicas=1, max_replicas=2, sessions_per_pod=5,
                max_sessions_per_pod=10, scale_down_stabilization=2)
    first = next(iter(live_pods(kube)))
    await sessions.hold(node, first, 10)  # 10 sessions for a target of 5 per relay: 2 relays
    await eventually(lambda: replicas(kube) == 2, within=30, what="scale-up to 2")
    await eventually(lambda: ("ScaledUp", "Deployment outbound replicas 1 -> 2") in events(kube),
                     within=30, what="ScaledUp event")
    assert condition(kube, "Overloaded").get("status") == "False"
    await eventually(lambda: len(ready_relays(kube, node)) == 2, within=90, what="second relay ready")
    second = next(p for p in live_pods(kube) if p != first)
    await sessions.hold(node, second, 10)  # 20 sessions: 4 relays wanted, max is 2
    await eventually(lambda: condition(kube, "Overloaded").get("status") == "True", within=30,
                     what="Overloaded")
    assert condition(kube, "Overloaded")["reason"] == "DemandAboveMaximum"
    assert replicas(kube) == 2  # never above max
    await eventually(lambda: ((mailrelay(kube) or {}).get("status") or {}).get("sessions") == 20,
                     within=30, what="all 20 sessions scraped")
    status = (mailrelay(kube) or {})["status"]
    assert status["desiredReplicas"] == 2 and condition(kube, "Overloaded")["status"] == "True"

    # Load gone: one relay drains first, then the count goes down.
    await sessions.release()
    await eventually(lambda: replicas(kube) == 1, within=60, what="scale-in to 1")
    await eventually(lambda: condition(kube, "Overloaded").get("status") == "False", within=30,
                     what="not Overloaded")
    await eventually(lambda: "ScaledDown" in reasons(kube), within=30, what="ScaledDown event")
    seen = reasons(kube)
    assert "DrainStarted" in seen and "DrainCompleted" in seen and "ScaledDown" in seen
    assert seen.index("DrainStarted") < seen.index("DrainCompleted") < seen.index("ScaledDown")
    await eventually(lambda: len(live_pods(kube)) == 1, within=60, what="one relay left")
    gone = {first, second} - set(live_pods(kube))
    assert len(gone) == 1, f"the ReplicaSet replaced a relay: {sorted(live_pods(kube))}"
    (victim,) = gone
    await history.caught_up()
    assert history.ever_annotated(victim), "the removed relay was drained first"
    assert not any(history.ever_annotated(p) for p in live_pods(kube)), "only one relay was drained"
    await eventually(lambda: any(t.pod == victim for t in node.terminations), within=60, what="termination")
    ended = termination(node, victim)
    assert ended.was_drained and not ended.killed and ended.spool_left == 0


async def test_demand_rising_mid_drain_resumes_the_relay(
    kube: kubeenv.KubeEnv,
    operator: OperatorHarness,
    node: kubelet.ProcessKubelet,
    client: apiclient.Api,
    sessions: Sessions,
) -> None:
    await start(kube, client, node, min_replicas=1, max_replicas=3, sessions_per_pod=5,
                max_sessions_per_pod=10, scale_down_stabilization=1)
    await client.patch(mr_path(kube), {"spec": {"replicas": {"min": 2}}})
    await eventually(lambda: len(live_pods(kube)) == 2 and ready_relays(kube, node) == set(live_pods(kube)),
                     within=90, what="2 relays")
    await client.patch(mr_path(kube), {"spec": {"replicas": {"min": 1}}})
    a, b = sorted(live_pods(kube))
    await sessions.hold(node, a, 1)  # a has the fewest sessions: it is the one drained
    await sessions.hold(node, b, 2)
    await eventually(lambda: draining(kube) == {a}, within=30, what="drain of the idlest relay")
    await eventually(lambda: condition(kube, "Draining").get("status") == "True", within=30,
                     what="Draining")
    await relay_draining(node, a, True)
    assert replicas(kube) == 2  # the count is not lowered while the relay still holds a session

    await sessions.hold(node, b, 8)  # demand rises: b alone has 10 sessions, 2 relays wanted
    await eventually(lambda: not draining(kube), within=30, what="resume")
    await relay_draining(node, a, False)
    await eventually(lambda: "DrainCancelled" in reasons(kube), within=30, what="DrainCancelled event")
    assert set(live_pods(kube)) == {a, b} and replicas(kube) == 2
    await eventually(lambda: condition(kube, "Draining").get("status") == "False", within=30,
                     what="not Draining")


async def test_operator_restart_mid_drain_finishes_the_drain(
    kube: kubeenv.KubeEnv,
    operator: OperatorHarness,
    node: kubelet.ProcessKubelet,
    client: apiclient.Api,
    sessions: Sessions,
    history: PodHistory,
) -> None:
    await start(kube, client, node, min_replicas=2, max_replicas=3, sessions_per_pod=5,
                max_sessions_per_pod=10, scale_down_stabilization=1)
    a, b = sorted(live_pods(kube))
    await sessions.hold(node, a, 1)
    await sessions.hold(node, b, 2)
    await client.patch(mr_path(kube), {"spec": {"replicas": {"min": 1}}})
    await eventually(lambda: draining(kube) == {a}, within=30, what="drain started")
    await operator.stop()
    started = live_pods(kube)[a]["metadata"]["annotations"][drain.DRAIN_STARTED_ANNOTATION]
    await relay_draining(node, a, True)
    await sessions.release(a)  # the drain completes while no operator runs
    await relay_reports(node, a, "drained", True)
    assert replicas(kube) == 2 and a in live_pods(kube), "nothing but the operator removes a drained relay"
    await operator.start()
    await eventually(lambda: replicas(kube) == 1 and a not in live_pods(kube), within=60,
                     what="drain finished")
    # The ReplicaSet removes the pod marked cheapest; it never needs a replacement for it.
    await eventually(lambda: set(live_pods(kube)) == {b}, within=60, what="only b left")
    await history.caught_up()
    assert not history.ever_annotated(b), "the restarted operator did not start a second drain"
    # The restarted operator carried on from the pod's record: the drain start time was never rewritten.
    assert history.drain_stamps(a) == {started}


async def test_maintenance_drains_every_relay_and_resumes(
    kube: kubeenv.KubeEnv,
    operator: OperatorHarness,
    node: kubelet.ProcessKubelet,
    client: apiclient.Api,
) -> None:
    await start(kube, client, node, min_replicas=2, max_replicas=3)
    pods = set(live_pods(kube))
    await client.patch(mr_path(kube), {"spec": {"maintenance": True}})
    await eventually(lambda: draining(kube) == pods, within=30, what="every relay draining")
    for pod in pods:
        await relay_draining(node, pod, True)
        await relay_reports(node, pod, "drained", True)
    await eventually(lambda: condition(kube, "Ready").get("reason") == "Maintenance", within=30,
                     what="Ready=False")
    assert condition(kube, "Draining")["reason"] == "Maintenance"
    # Every relay is drained, which outside maintenance would end its drain and remove it: the operator
    # looks again (two full ticks) and keeps them all.
    await ticks_after(kube, time.time(), count=2)
    assert set(live_pods(kube)) == pods and replicas(kube) == 2  # drained relays stay during maintenance
    await client.patch(mr_path(kube), {"spec": {"maintenance": False}})
    await eventually(lambda: not draining(kube), within=30, what="every relay resumed")
    for pod in pods:
        await relay_draining(node, pod, False)
    await eventually(lambda: condition(kube, "Ready").get("status") == "True", within=60, what="Ready again")
    assert set(live_pods(kube)) == pods and replicas(kube) == 2


async def test_delete_drains_every_relay_through_the_finalizer(
    kube: kubeenv.KubeEnv,
    operator: OperatorHarness,
    node: kubelet.ProcessKubelet,
    client: apiclient.Api,
    sessions: Sessions,
    scrapes: Scrapes,
) -> None:
    await start(kube, client, node, min_replicas=2, max_replicas=3)
    a, b = sorted(live_pods(kube))
    await sessions.hold(node, a, 1)
    await client.request("DELETE", mr_path(kube))
    await eventually(lambda: draining(kube) == {a, b}, within=30, what="every relay draining")
    await relay_draining(node, b, True)
    await relay_reports(node, b, "drained", True)
    # The finalizer sees b drained and a still holding a session, again and again, and keeps waiting.
    moment = time.time()

    def held_rounds() -> int:
        return sum(1 for answers in scrapes.since(moment)
                   if (answers.get(a) or {}).get("drained") is False
                   and (answers.get(b) or {}).get("drained") is True)

    await eventually(lambda: held_rounds() >= 3, within=30, what="three scrapes of a busy a and a drained b")
    obj = mailrelay(kube)
    assert obj is not None and obj["metadata"].get("deletionTimestamp"), "held by the finalizer"
    assert kube.get(k.DEPLOYMENTS, NAME) is not None
    await sessions.release(a)
    await eventually(lambda: mailrelay(kube) is None, within=60, what="MailRelay removed")
    # The real garbage collector removes what the MailRelay owned.
    owned = [(k.DEPLOYMENTS, NAME), (k.SERVICES, NAME), (k.SECRETS, f"{NAME}-admin"), (k.PDBS, NAME),
             (k.NETWORKPOLICIES, NAME)]
    await eventually(lambda: all(kube.get(res, name) is None for res, name in owned), within=60,
                     what="owned objects collected")
    await eventually(lambda: {t.pod for t in node.terminations} >= {a, b}, within=60, what="relays ended")
    assert all(t.was_drained for t in node.terminations if t.pod in (a, b))


async def test_the_finalizers_bound_counts_from_its_first_attempt_across_a_restart(
    kube: kubeenv.KubeEnv, client: apiclient.Api, operator: OperatorHarness, sessions: Sessions,
    node: kubelet.ProcessKubelet,
) -> None:
    """The delete handler drains in rounds (Kopf retries it), and Kopf keeps the time of its first attempt
    on the object: an operator restarted mid-drain releases the MailRelay at the drain timeout counted
    from the deletion, not from the restart."""
    timeout = 20
    await start(kube, client, node, min_replicas=1, max_replicas=2, drain_timeout=timeout)
    (a,) = live_pods(kube)
    await sessions.hold(node, a, 1)  # a never drains: only the bound ends the wait
    deleted_at = time.time()
    await client.request("DELETE", mr_path(kube))
    await eventually(lambda: draining(kube) == {a}, within=30, what="a draining")
    await eventually(lambda: "Draining" in reasons(kube), within=30, what="Draining event")
    # Most of the bound passes with the first operator, then it restarts: a bound that started again
    # would hold the MailRelay until at least restarted_at + timeout.
    await eventually(lambda: time.time() - deleted_at >= timeout * 0.6, within=timeout, what="time to pass")
    await operator.stop()
    await operator.start()
    restarted_at = time.time()
    await eventually(lambda: mailrelay(kube) is None, within=timeout + 30, what="MailRelay removed")
    gone_at = time.time()
    assert gone_at - deleted_at >= timeout, "released before the drain timeout"
    assert gone_at < restarted_at + timeout, "the restart reset the finalizer's bound"
    assert ("DrainTimedOut", f"relays still held mail after {timeout}s; removing anyway") in events(kube)
    assert reasons(kube).count("Draining") == 1, "the restarted operator did not announce the drain again"
