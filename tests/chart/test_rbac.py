"""RBAC least privilege: the chart's ClusterRole allows exactly what the operator does, no more.

1. The rendered rules equal the operator's own declaration, `mailrelay_operator.kube.RBAC_RULES` (so a
   verb added in the chart without a call, or a call declared without a rule, fails).
2. The declaration is complete, on a real kube-apiserver that enforces RBAC: the real operator runs with
   a token of the chart's ServiceAccount (bound to the chart's ClusterRole) through a create / repair /
   scale-out / drain and scale-in / delete scenario, with real relays. The fault proxy in front of the
   apiserver records every request it sent and the status it got: none may be 403, the operator's log
   must hold no Forbidden, and every grant must have been used (a server-side apply answered 201 created
   its object: the server authorized it as `create` too).
3. That check can fail: the same operator with a ClusterRole that lacks `patch` on pods gets 403s, which
   the same check finds (and the operator does not scale in a relay it could not mark as draining).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mailrelay_operator import kube as k
from mailrelay_operator import manifests
from mailrelay_sandbox import apiclient, faultproxy, kubelet, scenario

from tests import kubeenv
from tests.chart import helmutil
from tests.operator.conftest import OperatorHarness, eventually

Triple = tuple[str, str, str]
NAME = "rbac"
PERSISTENT = "rbac-persistent"


def rule_triples(rules: list[dict[str, Any]]) -> set[Triple]:
    triples = set()
    for rule in rules:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), "no wildcards"
                    triples.add((group, resource, verb))
    return triples


def rendered_triples() -> set[Triple]:
    (role,) = helmutil.by_kind(helmutil.template(), "ClusterRole")
    return rule_triples(role["rules"])


def declared_triples() -> set[Triple]:
    return {(group, resource, verb) for group, resource, verbs in k.RBAC_RULES for verb in verbs}


def test_cluster_role_equals_the_operator_declaration() -> None:
    rendered = rendered_triples()
    declared = declared_triples()
    assert rendered - declared == set(), "the chart grants more than the operator declares"
    assert declared - rendered == set(), "the chart misses calls the operator declares"


def test_binding_targets_the_role_and_service_account() -> None:
    docs = helmutil.template()
    (binding,) = helmutil.by_kind(docs, "ClusterRoleBinding")
    (role,) = helmutil.by_kind(docs, "ClusterRole")
    (account,) = helmutil.by_kind(docs, "ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "mailrelay-system"}
    ]
    assert not helmutil.by_kind(helmutil.template(sets=["rbac.create=false"]), "ClusterRole")


# Discovery and version endpoints: readable by every authenticated user (system:discovery), not RBAC rules.
NON_RESOURCE = re.compile(r"^/(version|api|apis|openapi/.*|apis/[^/]+|apis/[^/]+/[^/]+|api/v1)/?$")
NAMESPACE_SUBRESOURCES = {"status", "finalize"}


def call_triple(method: str, path: str, params: dict[str, str]) -> Triple | None:
    """(apiGroup, resource[/subresource], verb) of one API request, or None for discovery."""
    if NON_RESOURCE.match(path):
        return None
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    elif parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        raise AssertionError(f"unexpected API path {path}")
    if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in NAMESPACE_SUBRESOURCES:
        rest = rest[2:]  # /namespaces/NS/<resource>...
    resource, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)
    if sub:
        resource = f"{resource}/{sub}"
    watching = params.get("watch") in {"true", "1"}
    verb = {
        ("GET", True): "get",
        ("GET", False): "watch" if watching else "list",
        ("POST", False): "create",
        ("PATCH", True): "patch",
        ("PUT", True): "update",
        ("DELETE", True): "delete",
        ("DELETE", False): "deletecollection",
    }[(method, name is not None)]
    return (group, resource, verb)


def test_call_triple_mapping() -> None:
    assert call_triple("GET", "/apis", {}) is None
    assert call_triple("GET", "/apis/mailrelay.dev/v1alpha1", {}) is None
    assert call_triple("GET", "/apis/mailrelay.dev/v1alpha1/mailrelays", {"watch": "true"}) == (
        "mailrelay.dev",
        "mailrelays",
        "watch",
    )
    assert call_triple("PATCH", "/apis/mailrelay.dev/v1alpha1/namespaces/mail/mailrelays/a/status", {}) == (
        "mailrelay.dev",
        "mailrelays/status",
        "patch",
    )
    assert call_triple("GET", "/api/v1/namespaces", {}) == ("", "namespaces", "list")
    assert call_triple("GET", "/api/v1/namespaces/mail", {}) == ("", "namespaces", "get")
    assert call_triple("DELETE", "/api/v1/namespaces/mail/pods/p", {}) == ("", "pods", "delete")
    assert call_triple("POST", "/api/v1/namespaces/mail/events", {}) == ("", "events", "create")


# Grants a cluster-wide operator (the chart's default, `watchNamespaces: []`) never uses, with their
# reason. The scenarios here run the operator with `--namespace` (the chart's `watchNamespaces`), where
# they are used, so that every grant is exercised by one run.
NAMESPACE_MODE_GRANTS: dict[Triple, str] = {
    ("", "namespaces", "list"): "Kopf's namespace observer lists namespaces with --namespace "
    "(kopf/_core/reactor/observation.py namespace_observer; not cluster-wide)",
    ("", "namespaces", "watch"): "Kopf's namespace observer then watches them with --namespace",
}


def test_grants_kept_for_other_modes_are_still_granted() -> None:
    """A reason kept for a grant the chart no longer carries is stale."""
    assert set(NAMESPACE_MODE_GRANTS) <= rendered_triples()


# -- the real operator on the real API server -------------------------------------------------------


@pytest.fixture
def node_options() -> dict[str, Any]:
    return {"extra_env": {"MAILRELAY_LOG_LEVEL": "warning"}, "max_grace_seconds": 15}


def refusals(proxy: faultproxy.FaultProxy, operator: OperatorHarness) -> list[str]:
    """What RBAC refused the operator: requests answered 403, and Forbidden in the operator's log."""
    refused = [f"{r.method} {r.path} -> 403" for r in proxy.requests() if r.status == 403]
    return refused + operator.forbidden.records


def record_triples(record: faultproxy.Record) -> set[Triple]:
    """What the server authorized for one recorded request. A server-side apply (PATCH) that creates its
    object, answered 201, is authorized as `patch` and as `create`: the operator creates its Deployment,
    Service, PDB and NetworkPolicy that way."""
    triple = call_triple(record.method, record.path, record.query)
    if triple is None:
        return set()
    if record.method == "PATCH" and record.status == 201:
        return {triple, (triple[0], triple[1], "create")}
    return {triple}


def test_record_triples_counts_a_creating_apply_as_create() -> None:
    def record(method: str, status: int) -> faultproxy.Record:
        return faultproxy.Record(0.0, method, "/apis/apps/v1/namespaces/ns/deployments/d",
                                 {"fieldManager": "mailrelay-operator"}, k.USER_AGENT, status, False)

    assert record_triples(record("PATCH", 201)) == {("apps", "deployments", "patch"),
                                                    ("apps", "deployments", "create")}
    assert record_triples(record("PATCH", 200)) == {("apps", "deployments", "patch")}
    assert record_triples(record("GET", 200)) == {("apps", "deployments", "get")}


def observed_triples(proxy: faultproxy.FaultProxy) -> set[Triple]:
    return {t for r in proxy.requests() if not r.injected for t in record_triples(r)}


def relay_status(kube: kubeenv.KubeEnv) -> dict[str, Any]:
    return (kube.get(k.MAILRELAYS, NAME) or {}).get("status") or {}


def replicas(kube: kubeenv.KubeEnv) -> int | None:
    deployment = kube.get(k.DEPLOYMENTS, NAME)
    return None if deployment is None else int(deployment["spec"]["replicas"])


def live_pods(kube: kubeenv.KubeEnv) -> set[str]:
    return {p["metadata"]["name"] for p in kube.list(k.PODS, manifests.selector(NAME))
            if not p["metadata"].get("deletionTimestamp")}


OWNED = ((k.SECRETS, f"{NAME}-admin"), (k.SERVICES, NAME), (k.PDBS, NAME), (k.NETWORKPOLICIES, NAME))
MANAGED_BY = "app.kubernetes.io/managed-by"


async def create_and_scale_out(kube: kubeenv.KubeEnv, http: apiclient.Api, minimum: int) -> None:
    await http.request("POST", kube.path(k.MAILRELAYS), scenario.mailrelay(
        NAME, kube.namespace, min_replicas=minimum, max_replicas=3, interval=1, scale_down_stabilization=1,
        drain_timeout=20))
    await eventually(lambda: relay_status(kube).get("readyReplicas") == minimum, within=120,
                     what=f"{minimum} ready relays")


async def test_the_operator_with_the_charts_role_is_never_refused_and_uses_every_grant(
    kube: kubeenv.KubeEnv, node: kubelet.ProcessKubelet, proxy: faultproxy.FaultProxy, tmp_path: Path,
) -> None:
    """Create, repair hand edits, scale out, drain and scale in, delete, then a MailRelay with a
    persistent spool (a StatefulSet): with the chart's ServiceAccount token (the session's control plane
    has the chart installed by helm, tests/kubeenv.py)."""
    assert rule_triples(installed_role(kube)["rules"]) == rendered_triples(), "not the chart's role"
    kubeconfig = kubeenv.plain_kubeconfig(tmp_path / "operator.kubeconfig", proxy.url,
                                          kube.session.operator_token)
    operator = OperatorHarness(kube, kubeconfig=kubeconfig)
    await operator.start()
    try:
        async with kube.api() as http:
            await create_and_scale_out(kube, http, 1)
            # Hand edits of the owned objects: the operator patches them back.
            for res, name in OWNED:
                await http.patch(kube.path(res, name), {"metadata": {"labels": {MANAGED_BY: "someone-else"}}})
            await eventually(lambda: all((kube.get(res, name) or {})["metadata"]["labels"][MANAGED_BY]
                                         == "mailrelay-operator" for res, name in OWNED),
                             within=30, what="hand edits repaired")
            await http.patch(kube.path(k.MAILRELAYS, NAME), {"spec": {"replicas": {"min": 2}}})
            await eventually(lambda: relay_status(kube).get("readyReplicas") == 2, within=120,
                             what="scaled out to 2 ready relays")
            before = live_pods(kube)
            await http.patch(kube.path(k.MAILRELAYS, NAME), {"spec": {"replicas": {"min": 1}}})
            await eventually(lambda: replicas(kube) == 1 and len(live_pods(kube)) == 1, within=120,
                             what="one relay drained and removed")
            (drained,) = before - live_pods(kube)
            await eventually(lambda: any(t.pod == drained for t in node.terminations), within=30,
                             what="the drained relay ended")
            await http.request("DELETE", kube.path(k.MAILRELAYS, NAME))
            await eventually(lambda: kube.get(k.MAILRELAYS, NAME) is None, within=120,
                             what="the MailRelay released by the finalizer")
            # A persistent spool: the relays are a StatefulSet, scaled with its claims in view.
            await http.request("POST", kube.path(k.MAILRELAYS), scenario.mailrelay(
                PERSISTENT, kube.namespace, min_replicas=1, max_replicas=2, interval=1,
                spool_persistent="64Mi"))
            await eventually(lambda: ((kube.get(k.MAILRELAYS, PERSISTENT) or {}).get("status") or {})
                             .get("readyReplicas") == 1, within=120, what="a ready relay of the StatefulSet")
    finally:
        await operator.stop()
    assert refusals(proxy, operator) == []
    observed = observed_triples(proxy)
    assert observed - rendered_triples() == set(), "calls outside the ClusterRole (and yet not refused?)"
    assert rendered_triples() - observed == set(), "granted but never used by the operator"
    assert set(NAMESPACE_MODE_GRANTS) <= observed


def without_pod_patch(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rules = copy.deepcopy(rules)
    for rule in rules:
        if rule["apiGroups"] == [""] and "pods" in rule["resources"]:
            rule["verbs"] = [verb for verb in rule["verbs"] if verb != "patch"]
    assert ("", "pods", "patch") not in rule_triples(rules)
    return rules


def installed_role(kube: kubeenv.KubeEnv) -> dict[str, Any]:
    """The ClusterRole that the operator's ServiceAccount is bound to on the server (helm installed it)."""
    bindings = kube.cluster.request("GET", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings")["items"]
    account = {"kind": "ServiceAccount", "name": kube.session.operator_account,
               "namespace": kubeenv.OPERATOR_NAMESPACE}
    (name,) = [b["roleRef"]["name"] for b in bindings if account in (b.get("subjects") or [])]
    role: dict[str, Any] = kube.cluster.request("GET", f"/apis/rbac.authorization.k8s.io/v1/clusterroles/"
                                                       f"{name}")
    return role


@pytest.fixture
def narrow_token(kube: kubeenv.KubeEnv) -> Iterator[str]:
    """A token of a ServiceAccount bound to the chart's ClusterRole without `patch` on pods."""
    cluster, ns = kube.cluster, kube.namespace
    role = installed_role(kube)
    name = f"mailrelay-no-pod-patch-{ns}"
    cluster.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts",
                    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "narrow"}})
    cluster.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                   "metadata": {"name": name}, "rules": without_pod_patch(role["rules"])})
    cluster.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": name},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                   "subjects": [{"kind": "ServiceAccount", "name": "narrow", "namespace": ns}]})
    try:
        yield cluster.service_account_token(ns, "narrow", seconds=3600)
    finally:
        cluster.request("DELETE", f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{name}")
        cluster.request("DELETE", f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{name}")


async def test_the_check_finds_a_role_without_patch_on_pods(
    kube: kubeenv.KubeEnv, node: kubelet.ProcessKubelet, proxy: faultproxy.FaultProxy, tmp_path: Path,
    narrow_token: str,
) -> None:
    kubeconfig = kubeenv.plain_kubeconfig(tmp_path / "narrow.kubeconfig", proxy.url, narrow_token)
    operator = OperatorHarness(kube, kubeconfig=kubeconfig)
    await operator.start()
    try:
        async with kube.api() as http:
            await create_and_scale_out(kube, http, 2)
            assert refusals(proxy, operator) == [], "refused before the scenario needed a pod patch"
            await http.patch(kube.path(k.MAILRELAYS, NAME), {"spec": {"replicas": {"min": 1}}})

            def refused_pod_patches() -> int:
                return sum(1 for r in proxy.requests() if r.status == 403
                           and call_triple(r.method, r.path, r.query) == ("", "pods", "patch"))

            # Three ticks, each refused when it tries to mark a relay as draining.
            await eventually(lambda: refused_pod_patches() >= 3, within=60, what="pod patches refused")
            await eventually(lambda: operator.forbidden.records != [], within=30,
                             what="the refusal in the operator's log")
            assert replicas(kube) == 2 and len(live_pods(kube)) == 2, \
                "a relay that could not be marked as draining was removed"
    finally:
        await operator.stop()
    found = refusals(proxy, operator)
    assert found and all("pods" in line for line in found), found
