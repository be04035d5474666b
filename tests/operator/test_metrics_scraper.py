"""The metrics scraper (Prometheus) may reach the relays' admin port: `--metrics-scraper-labels` and
`--metrics-scraper-namespace` (or their environment variables) become a peer of the relays'
NetworkPolicy, next to the operator's. Pure table for the peer, the CLI parse, and the real operator
(with the chart's ServiceAccount token) writing the NetworkPolicy into the real API server, which
validates it."""

from __future__ import annotations

from typing import Any

import pytest
from mailrelay_operator import cli, manifests
from mailrelay_operator import kube as k
from mailrelay_sandbox import apiclient, scenario

from tests import kubeenv
from tests.chart import helmutil, promql
from tests.operator.conftest import OperatorHarness, eventually

PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}
MONITORING_NS = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
PROMETHEUS_PODS = {"matchLabels": PROMETHEUS}


@pytest.mark.parametrize(
    ("labels", "namespace", "expected"),
    [
        ({}, None, None),  # nothing given: no peer (an empty peer would admit every pod)
        ({}, "", None),
        (PROMETHEUS, "monitoring", {"podSelector": PROMETHEUS_PODS, "namespaceSelector": MONITORING_NS}),
        (PROMETHEUS, None, {"podSelector": PROMETHEUS_PODS, "namespaceSelector": {}}),
        ({}, "monitoring", {"namespaceSelector": MONITORING_NS}),
    ],
)
def test_scraper_peer(labels: dict[str, str], namespace: str | None, expected: Any) -> None:
    assert manifests.scraper_peer(labels, namespace) == expected


def test_scraper_peer_joins_the_operator_on_the_admin_port_only() -> None:
    peer = manifests.scraper_peer(PROMETHEUS, "monitoring")
    assert peer is not None
    np = manifests.network_policy("r", "mail", {"app": "op"}, "ops", [peer])
    smtp_rule, admin_rule = np["spec"]["ingress"]
    assert "from" not in smtp_rule
    assert admin_rule["from"][1:] == [peer] and admin_rule["ports"] == [{"port": "admin", "protocol": "TCP"}]


def test_cli_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.parse_args([]).metrics_scraper_labels == {}
    assert cli.parse_args([]).metrics_scraper_namespace is None
    options = cli.parse_args(
        ["--metrics-scraper-labels", "app.kubernetes.io/name=prometheus,team=obs",
         "--metrics-scraper-namespace", "monitoring"]
    )
    assert options.metrics_scraper_labels == {"app.kubernetes.io/name": "prometheus", "team": "obs"}
    assert options.metrics_scraper_namespace == "monitoring"
    monkeypatch.setenv("MAILRELAY_OPERATOR_METRICS_SCRAPER_LABELS", "app=prom")
    monkeypatch.setenv("MAILRELAY_OPERATOR_METRICS_SCRAPER_NAMESPACE", "obs")
    options = cli.parse_args([])
    assert (options.metrics_scraper_labels, options.metrics_scraper_namespace) == ({"app": "prom"}, "obs")
    with pytest.raises(SystemExit):
        cli.parse_args(["--metrics-scraper-labels", "no-equals-sign"])


async def test_operator_admits_the_scraper_in_the_relays_network_policy(
    kube: kubeenv.KubeEnv, client: apiclient.Api
) -> None:
    harness = OperatorHarness(kube, metrics_scraper_labels=PROMETHEUS, metrics_scraper_namespace="monitoring")
    await harness.start()
    try:
        await client.request("POST", kube.path(k.MAILRELAYS), scenario.mailrelay("np", kube.namespace))
        await eventually(lambda: kube.get(k.NETWORKPOLICIES, "np") is not None, within=60,
                         what="the NetworkPolicy")
    finally:
        await harness.stop()
    harness.assert_never_forbidden()
    np = kube.get(k.NETWORKPOLICIES, "np")
    assert np is not None
    smtp_rule, admin_rule = np["spec"]["ingress"]
    assert "from" not in smtp_rule
    assert admin_rule["from"][1] == manifests.scraper_peer(PROMETHEUS, "monitoring")
    assert admin_rule["ports"] == [{"port": "admin", "protocol": "TCP"}]


def operator_args(sets: list[str]) -> list[str]:
    (deployment,) = helmutil.by_kind(helmutil.template(sets=sets), "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    (container,) = [c for c in containers if c["name"] == "operator"]
    return [str(arg) for arg in container["args"]]


def test_chart_values_become_the_flags() -> None:
    """helm template with the chart's values: the rendered args, parsed by the operator's own CLI, give
    the scraper peer; by default no scraper is admitted."""
    default = cli.parse_args(operator_args([]))
    assert manifests.scraper_peer(default.metrics_scraper_labels, default.metrics_scraper_namespace) is None
    options = cli.parse_args(
        operator_args(
            [
                "operator.metricsScraper.podLabels.app\\.kubernetes\\.io/name=prometheus",
                "operator.metricsScraper.podLabels.release=kube-prometheus-stack",
                "operator.metricsScraper.namespace=monitoring",
            ]
        )
    )
    assert options.metrics_scraper_labels == {**PROMETHEUS, "release": "kube-prometheus-stack"}
    assert manifests.scraper_peer(options.metrics_scraper_labels, options.metrics_scraper_namespace) == {
        "podSelector": {"matchLabels": {**PROMETHEUS, "release": "kube-prometheus-stack"}},
        "namespaceSelector": MONITORING_NS,
    }
    only_namespace = cli.parse_args(operator_args(["operator.metricsScraper.namespace=monitoring"]))
    assert only_namespace.metrics_scraper_labels == {}
    assert only_namespace.metrics_scraper_namespace == "monitoring"


def test_chart_schema_refuses_a_misspelt_scraper_value() -> None:
    result = helmutil.helm(
        "template", "mr", str(promql.CHART), "--set", "operator.metricsScraper.labels.app=prom"
    )
    assert result.returncode != 0 and "metricsScraper" in result.stderr
