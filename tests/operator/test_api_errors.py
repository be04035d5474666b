"""API-level tests with injected API errors: the real operator talks to the real API server through the
sandbox's fault proxy (`proxy`, with the chart's ServiceAccount token, so RBAC still applies), which
loses the answers of writes that did happen (500 after forwarding), refuses writes with 409 and reads
with 503 on cue, and holds requests longer than the operator's request timeout. The operator retries,
and ends with exactly one of each owned object, one admin token, and the scale change applied.

The operator creates its admin Secret with a POST (its generated content is written once) and every
other owned object by server-side apply (a PATCH with `fieldManager`); the scaling loop changes the
Deployment's count with a merge patch (a PATCH without `fieldManager`)."""

from __future__ import annotations

import base64
import re
import time

from mailrelay_operator import kube as k
from mailrelay_operator import manifests
from mailrelay_sandbox import apiclient, faultproxy, kubelet, scenario

from tests import kubeenv
from tests.operator.conftest import OperatorHarness, Sessions, eventually
from tests.operator.test_api_scaling import NAME, condition, live_pods, mailrelay, replicas

OWNED = [
    (k.DEPLOYMENTS, NAME),
    (k.SERVICES, NAME),
    (k.SECRETS, f"{NAME}-admin"),
    (k.PDBS, NAME),
    (k.NETWORKPOLICIES, NAME),
]
AGENT = k.USER_AGENT  # the operator's own client (Kopf's watches and patches say kopf/...)


def calls(proxy: faultproxy.FaultProxy, method: str, resource: k.Resource, name: str | None = None, *,
          since: float = 0.0) -> list[faultproxy.Record]:
    """The operator's requests of `method` on `resource` (on one object when `name` is given)."""
    tail = f"/{re.escape(name)}" if name else ""
    pattern = re.compile(rf"/{resource.plural}{tail}$")
    return [r for r in proxy.requests(agent=AGENT, since=since)
            if r.method == method and pattern.search(r.path)]


def applies(proxy: faultproxy.FaultProxy, resource: k.Resource, *,
            since: float = 0.0) -> list[tuple[int, bool]]:
    """(status, injected) of the operator's server-side applies of the MailRelay's `resource`."""
    return statuses([r for r in calls(proxy, "PATCH", resource, NAME, since=since)
                     if r.query.get("fieldManager") == k.FIELD_MANAGER])


def statuses(records: list[faultproxy.Record]) -> list[tuple[int, bool]]:
    return [(r.status, r.injected) for r in records]


def admin_token(kube: kubeenv.KubeEnv) -> str:
    secret = kube.get(k.SECRETS, f"{NAME}-admin")
    assert secret is not None
    return base64.b64decode(secret["data"]["token"]).decode()


async def test_api_errors_are_retried_without_duplicates(
    kube: kubeenv.KubeEnv,
    node: kubelet.ProcessKubelet,
    client: apiclient.Api,
    proxy: faultproxy.FaultProxy,
) -> None:
    # Creation: writes that happened but whose answer is lost (500), a write refused with 409 (the
    # object changed meanwhile), a read answered after the operator's 2 s request timeout, and a pod
    # list that fails twice.
    proxy.fail("POST", r"/secrets$", 500, after_forward=True, agent=AGENT)
    proxy.fail("PATCH", rf"/deployments/{NAME}$", 500, after_forward=True, agent=AGENT)
    proxy.fail("PATCH", rf"/services/{NAME}$", 409, agent=AGENT)
    slow_read = proxy.delay("GET", rf"/poddisruptionbudgets/{NAME}$", 3.0, agent=AGENT)
    failing_list = proxy.fail("GET", r"/pods$", 503, times=2, agent=AGENT)

    # No periodic re-apply of the owned objects (resync) in this test: once they exist, the only writes
    # of the Deployment are the scaling loop's.
    operator = OperatorHarness(kube, kubeconfig=proxy.kubeconfig, api_timeout=2.0, resync_seconds=3600.0)
    await operator.start()
    try:
        await client.request("POST", kube.path(k.MAILRELAYS),
                             scenario.mailrelay(NAME, kube.namespace, min_replicas=1, max_replicas=3))
        await eventually(lambda: condition(kube, "Ready").get("status") == "True", within=90, what="Ready")
        for res, name in OWNED:
            assert kube.get(res, name) is not None, f"{res.kind} missing"
        assert failing_list.fired == 2 and slow_read.fired == 1

        # The Secret's create happened but its answer was lost: the retry met 409 (AlreadyExists) and the
        # operator read the Secret instead of creating another one. (The create handler and the first
        # scaling tick both ensure the owned objects: the one that comes second meets 409 too, and reads.)
        posts = statuses(calls(proxy, "POST", k.SECRETS))
        assert posts[0] == (500, True) and set(posts[1:]) == {(409, False)}, posts
        # The apply that created the Deployment lost its answer: applied again, it changed nothing.
        deployment_applies = applies(proxy, k.DEPLOYMENTS)
        assert deployment_applies[0] == (500, True) and (200, False) in deployment_applies, deployment_applies
        assert (201, False) not in deployment_applies, "the Deployment was created twice"
        # The refused apply of the Service was made again, and created it.
        service_applies = applies(proxy, k.SERVICES)
        assert service_applies[0] == (409, True) and service_applies.count((201, False)) == 1, service_applies
        # The slow read was given up and asked again; the PDB was created once.
        assert applies(proxy, k.PDBS).count((201, False)) == 1
        # Nothing was deleted and created again.
        assert not [r for r in proxy.requests(agent=AGENT) if r.method == "DELETE"]
        assert len(live_pods(kube)) == 1
        token = admin_token(kube)
        assert node.runtimes[next(iter(live_pods(kube)))].token() == token

        # Scaling through failing Deployment patches and a slow status write.
        since = time.time()
        failing_scale = proxy.fail("PATCH", rf"/deployments/{NAME}$", 500, times=2, agent=AGENT)
        slow_status = proxy.delay("PATCH", rf"/mailrelays/{NAME}/status$", 3.0, agent=AGENT)
        held = Sessions()
        try:
            await held.hold(node, next(iter(live_pods(kube))), 10)  # 2 relays wanted
            await eventually(lambda: replicas(kube) == 2, within=60, what="scale-up despite errors")
            # The operator scraped the relay with the token of the Secret it did not re-create.
            await eventually(lambda: ((mailrelay(kube) or {}).get("status") or {}).get("sessions") == 10,
                             within=60, what="scraped load")
        finally:
            await held.release()
        assert failing_scale.fired == 2 and slow_status.fired == 1
        scale_patches = statuses(calls(proxy, "PATCH", k.DEPLOYMENTS, NAME, since=since))
        assert scale_patches[:3] == [(500, True), (500, True), (200, False)], scale_patches
        assert not applies(proxy, k.DEPLOYMENTS, since=since), "the owned objects were re-applied"
        selector = manifests.selector(NAME)
        assert len(kube.list(k.DEPLOYMENTS, selector)) == 1
        assert len(kube.list(k.SERVICES, selector)) == 1
        assert admin_token(kube) == token, "the admin token was generated once"
    finally:
        await operator.stop()
    operator.assert_never_forbidden()
