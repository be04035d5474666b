"""RBAC least privilege: the chart's ClusterRole allows exactly what the operator does, no more.

Two checks, each able to fail:
1. The rendered rules equal the operator's own declaration, `mailrelay_operator.kube.RBAC_RULES`
   (so a verb added in the chart without a call, or a call declared without a rule, fails).
2. The declaration is complete: the real operator runs against the emulated API server
   (sandbox/mailrelay_sandbox/kubeemu.py) through a create / scale / drain / delete scenario, every
   request the emulator receives is mapped to (apiGroup, resource[/subresource], verb), and each one must
   be allowed by the rendered rules.
"""

from __future__ import annotations

import re
from typing import Any

from tests.chart import helmutil, livestack

Triple = tuple[str, str, str]


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
    from mailrelay_operator import kube

    return {(group, resource, verb) for group, resource, verbs in kube.RBAC_RULES for verb in verbs}


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


def test_every_call_the_real_operator_made_is_allowed(live: livestack.Stack) -> None:
    """Recorded while the operator created, scaled, drained and deleted a MailRelay (livestack)."""
    assert live.operator_calls, "no request was recorded from the operator"
    observed = {t for c in live.operator_calls if (t := call_triple(c.method, c.path, c.params))}
    allowed = rendered_triples()
    assert observed - allowed == set(), "the operator made calls its ClusterRole does not allow"
    # The scenario must have exercised the operator's main paths, or this check proves little.
    for needed in [
        ("mailrelay.dev", "mailrelays", "watch"),
        ("mailrelay.dev", "mailrelays/status", "patch"),
        ("apps", "deployments", "create"),
        ("apps", "deployments", "patch"),
        ("", "pods", "patch"),
    ]:
        assert needed in observed, needed


# Grants that the scenario (a cluster-wide run) does not exercise but that another mode needs, each with
# its reason. Any other unused grant fails.
NEEDED_OUTSIDE_THE_SCENARIO: dict[Triple, str] = {
    ("", "namespaces", "list"): "Kopf's namespace observer lists namespaces with --namespace "
    "(kopf/_core/reactor/observation.py namespace_observer; not cluster-wide)",
    ("", "namespaces", "watch"): "Kopf's namespace observer then watches them with --namespace",
}


def _unused(live: livestack.Stack) -> set[Triple]:
    observed = {t for c in live.operator_calls if (t := call_triple(c.method, c.path, c.params))}
    return rendered_triples() - observed


def test_nothing_granted_that_the_operator_does_not_use(live: livestack.Stack) -> None:
    unused = _unused(live) - set(NEEDED_OUTSIDE_THE_SCENARIO)
    assert unused == set(), f"granted but never used by the operator: {sorted(unused)}"


def test_grants_kept_for_other_modes_are_still_granted() -> None:
    """A reason kept for a grant the chart no longer carries is stale."""
    assert set(NEEDED_OUTSIDE_THE_SCENARIO) <= rendered_triples()
