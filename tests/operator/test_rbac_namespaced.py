"""RBAC in `--namespace` mode: the chart's scenario (tests/chart/test_rbac.py) runs cluster-wide, so this
runs the real operator with `--namespace` against the emulated API server, through a create, and checks
that every request it sent is allowed by `kube.RBAC_RULES`, and that the grants kept only for this mode
(namespaces list and watch, for Kopf's namespace observer) are really used here."""

from __future__ import annotations

from mailrelay_operator import kube
from mailrelay_sandbox import controlplane, kubeemu, scenario

from tests.chart.test_rbac import NEEDED_OUTSIDE_THE_SCENARIO, call_triple
from tests.operator.conftest import NAMESPACE, OperatorHarness, eventually

OPERATOR_TOKEN = "emulated-token"  # the kubeconfig kubeemu writes, which the operator uses
TEST_TOKEN = "test-client"


async def test_namespaced_mode_uses_the_namespace_grants_and_nothing_undeclared(
    api: kubeemu.Running, operator: OperatorHarness
) -> None:
    assert operator.options.namespaces == (NAMESPACE,)
    async with controlplane.Api(api.url, token=TEST_TOKEN) as client:  # told apart from the operator's
        relay = scenario.mailrelay("rbac", NAMESPACE)
        await client.request("POST", scenario.mailrelay_path(NAMESPACE), relay)
    await eventually(
        lambda: api.emulator.peek(kubeemu.DEPLOYMENTS, NAMESPACE, "rbac") is not None,
        within=60,
        what="the Deployment",
    )
    calls = {
        triple
        for request in api.emulator
        if request.headers.get("Authorization") == f"Bearer {OPERATOR_TOKEN}"
        and (
            triple := call_triple(
                str(getattr(request.method, "value", request.method)).upper(),
                request.url.path,
                dict(request.params),
            )
        )
    }
    declared = {(group, resource, verb) for group, resource, verbs in kube.RBAC_RULES for verb in verbs}
    assert calls - declared == set(), "calls that kube.RBAC_RULES does not allow"
    assert set(NEEDED_OUTSIDE_THE_SCENARIO) <= calls, "a grant kept for --namespace mode is not used in it"
