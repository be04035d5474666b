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

from typing import Any

from tests.chart import helmutil

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
