"""RBAC in `--namespace` mode (the cluster-wide mode, the chart's default, runs in tests/e2e/test_readme.py
on a control plane of its own): the real operator with `--namespace` and the chart's ServiceAccount token
against the real API server (RBAC enforced), through a create and a first scaling tick, and checks that
the server refused none of its requests, that every request it sent is allowed by `kube.RBAC_RULES` (the
declaration the chart's ClusterRole is derived from), and that the grants kept only for this mode
(namespaces list and watch, for Kopf's namespace observer) are really used here.

The operator's requests are the ones that pass the fault proxy (which injects nothing here); the test's
own requests go to the API server directly, as the admin."""

from __future__ import annotations

from mailrelay_operator import kube as k
from mailrelay_sandbox import apiclient, faultproxy, scenario

from tests import kubeenv
from tests.chart.test_rbac import NAMESPACE_MODE_GRANTS, call_triple
from tests.operator.conftest import OperatorHarness, eventually


async def test_namespaced_mode_uses_the_namespace_grants_and_nothing_undeclared(
    kube: kubeenv.KubeEnv, client: apiclient.Api, proxy: faultproxy.FaultProxy
) -> None:
    operator = OperatorHarness(kube, kubeconfig=proxy.kubeconfig)
    assert operator.options.namespaces == (kube.namespace,)
    await operator.start()
    try:
        await client.request("POST", kube.path(k.MAILRELAYS), scenario.mailrelay("rbac", kube.namespace))
        await eventually(lambda: kube.get(k.DEPLOYMENTS, "rbac") is not None, within=60,
                         what="the Deployment")

        def ticked() -> bool:  # a scaling tick read the pods and wrote the status
            status = (kube.get(k.MAILRELAYS, "rbac") or {}).get("status") or {}
            return "observedGeneration" in status

        await eventually(ticked, within=60, what="a scaling tick's status")
    finally:
        await operator.stop()
    operator.assert_never_forbidden()
    records = proxy.requests()
    assert records, "the operator's requests did not go through the proxy"
    refused = [(r.method, r.path, r.status) for r in records if r.status in (401, 403)]
    assert refused == [], "the API server refused the operator"
    calls = {triple for r in records if (triple := call_triple(r.method, r.path, r.query))}
    declared = {(group, resource, verb) for group, resource, verbs in k.RBAC_RULES for verb in verbs}
    assert calls - declared == set(), "calls that kube.RBAC_RULES does not allow"
    assert set(NAMESPACE_MODE_GRANTS) <= calls, "a grant kept for --namespace mode is not used in it"
