"""The Helm chart, with the real helm: lint, render, validate, and what each template promises.

The real API server (the session's control plane) judges every rendered core object, with a server-side
dry-run and strict field validation; the Prometheus Operator kinds (whose CRDs are not installed there)
are checked against a strict schema of the fields the chart uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests import kubeenv
from tests.chart import helmutil, promql
from tests.conftest import require_tool

MONITORING = [helmutil.MONITORING_API]


def test_lint_strict() -> None:
    for extra in ([], ["--set", "operator.watchNamespaces={mail,bulk}", "--set", "dashboards.enabled=false"]):
        result = helmutil.helm("lint", "--strict", str(promql.CHART), *extra)
        assert result.returncode == 0, result.stdout + result.stderr


def test_schema_rejects_bad_values() -> None:
    for bad in (
        "replicaCount=2",
        "operator.logLevel=loud",
        "monitoring.prometheusRule.enabled=maybe",
        "unknownKey=1",
        "image.digest=sha256:short",
    ):
        result = helmutil.helm("template", "mr", str(promql.CHART), "--set", bad)
        assert result.returncode != 0, f"values.schema.json accepted {bad}"


@pytest.mark.parametrize("api_versions", [[], MONITORING], ids=["plain", "prometheus-operator"])
def test_the_api_server_admits_every_rendered_core_object(
    kube_session: kubeenv.SessionCluster, api_versions: list[str]
) -> None:
    docs = helmutil.template(api_versions=api_versions, namespace="chart-dry-run")
    core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    result = kubeenv.server_dry_run(kube_session, core, "chart-dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(server dry run)") == len(core), result.stdout


def test_monitoring_objects_only_with_the_api_and_the_flag() -> None:
    kinds = {d["kind"] for d in helmutil.template()}
    assert not kinds & {"PodMonitor", "PrometheusRule"}
    docs = helmutil.template(api_versions=MONITORING)
    assert len(helmutil.by_kind(docs, "PodMonitor")) == 2
    assert len(helmutil.by_kind(docs, "PrometheusRule")) == 1
    off = helmutil.template(
        api_versions=MONITORING,
        sets=[
            "monitoring.operatorPodMonitor.enabled=false",
            "monitoring.relayPodMonitor.enabled=false",
            "monitoring.prometheusRule.enabled=false",
        ],
    )
    assert not {d["kind"] for d in off} & {"PodMonitor", "PrometheusRule"}


def test_additional_labels_for_the_release_selector() -> None:
    docs = helmutil.template(
        api_versions=MONITORING,
        sets=[
            "monitoring.operatorPodMonitor.additionalLabels.release=kps",
            "monitoring.relayPodMonitor.additionalLabels.release=kps",
            "monitoring.prometheusRule.additionalLabels.release=kps",
        ],
    )
    for doc in helmutil.by_kind(docs, "PodMonitor") + helmutil.by_kind(docs, "PrometheusRule"):
        assert doc["metadata"]["labels"]["release"] == "kps", doc["metadata"]["name"]


_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "action": {"enum": ["replace", "keep", "drop", "labeldrop", "labelkeep", "labelmap", "hashmod"]},
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "targetLabel": {"type": "string"},
        "replacement": {"type": "string"},
        "regex": {"type": "string"},
        "separator": {"type": "string"},
    },
}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    },
}
_META = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"labels": {"type": "object", "additionalProperties": {"type": "string"}}},
}
# The fields of the Prometheus Operator's v1 API that the chart uses, strictly.
PODMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array"}},
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(s|m)$"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": _RELABEL},
                            "metricRelabelings": {"type": "array", "items": _RELABEL},
                        },
                    },
                },
            },
        },
    },
}
PROMETHEUSRULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string"},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["expr"],
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "expr": {"type": "string"},
                                        "for": {"type": "string"},
                                        "labels": {
                                            "type": "object",
                                            "additionalProperties": {"type": "string"},
                                        },
                                        "annotations": {
                                            "type": "object",
                                            "additionalProperties": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    },
}


def test_monitoring_objects_are_well_formed() -> None:
    docs = helmutil.template(api_versions=MONITORING)
    for doc in helmutil.by_kind(docs, "PodMonitor"):
        jsonschema.validate(doc, PODMONITOR_SCHEMA)
    for doc in helmutil.by_kind(docs, "PrometheusRule"):
        jsonschema.validate(doc, PROMETHEUSRULE_SCHEMA)


def test_pod_monitors_set_the_job_and_mailrelay_labels_the_rules_use() -> None:
    docs = helmutil.template(api_versions=MONITORING)
    monitors = {d["spec"]["podMetricsEndpoints"][0]["port"]: d for d in helmutil.by_kind(docs, "PodMonitor")}
    relay = monitors["admin"]  # the relay container's admin port name (docs/contracts.md)
    assert relay["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "mailrelay",
        "app.kubernetes.io/managed-by": "mailrelay-operator",
    }
    relabel = relay["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert {"action": "replace", "targetLabel": "job", "replacement": "mailrelay-relay"} in relabel
    assert any(
        r.get("targetLabel") == "mailrelay"
        and r["sourceLabels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"]
        for r in relabel
    )
    operator = monitors["metrics"]["spec"]["podMetricsEndpoints"][0]
    assert {"action": "replace", "targetLabel": "job", "replacement": "mailrelay-operator"} in operator[
        "relabelings"
    ]
    assert operator["honorLabels"] is True
    for rule in promql.alert_rules():
        expr = str(rule["expr"])
        assert 'job="' not in expr or 'job="mailrelay-relay"' in expr or 'job="mailrelay-operator"' in expr


def test_prometheus_rule_is_the_alerts_file() -> None:
    (rule,) = helmutil.by_kind(
        helmutil.template(
            api_versions=MONITORING, sets=["monitoring.prometheusRule.additionalRuleLabels.team=mail"]
        ),
        "PrometheusRule",
    )
    source = yaml.safe_load(promql.ALERTS_FILE.read_text())["groups"]
    rendered = rule["spec"]["groups"]
    assert [g["name"] for g in rendered] == [g["name"] for g in source]
    for got_group, want_group in zip(rendered, source, strict=True):
        for got, want in zip(got_group["rules"], want_group["rules"], strict=True):
            assert got["labels"] == {**want["labels"], "team": "mail"}
            assert {k: v for k, v in got.items() if k != "labels"} == {
                k: v for k, v in want.items() if k != "labels"
            }


def test_dashboards_are_sidecar_configmaps_by_default() -> None:
    maps = [
        d
        for d in helmutil.by_kind(helmutil.template(), "ConfigMap")
        if d["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    shipped = {p.name: p.read_text() for p in (promql.CHART / "dashboards").glob("*.json")}
    got = {key: value for cm in maps for key, value in cm["data"].items()}
    assert set(got) == set(shipped)
    for name, text in shipped.items():
        assert got[name].strip() == text.strip()
    assert not [
        d
        for d in helmutil.by_kind(helmutil.template(sets=["dashboards.enabled=false"]), "ConfigMap")
        if "grafana_dashboard" in d["metadata"]["labels"]
    ]


def test_operator_deployment() -> None:
    (deploy,) = helmutil.by_kind(
        helmutil.template(sets=["image.tag=1.2.3", "relayImage.repository=reg/relay"]), "Deployment"
    )
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "mailrelay-operator:1.2.3"
    assert "--relay-image=reg/relay:0.1.0" in container["args"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["livenessProbe"]["httpGet"]
    assert probe["port"] == "health" and probe["path"] == "/healthz"
    assert f"--liveness=http://0.0.0.0:{ports['health']}/healthz" in container["args"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["serviceAccountName"] == "mr-mailrelay-operator"


def test_crds_copy_is_identical_to_the_top_level_crds() -> None:
    top = {p.name: p.read_bytes() for p in (promql.ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (promql.CHART / "crds").glob("*.yaml")}
    assert top, "crds/ is empty"
    assert chart == top, "charts/mailrelay-operator/crds/ must be a byte copy of crds/"


EXAMPLES = sorted((promql.CHART / "examples").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example(kube_session: kubeenv.SessionCluster, example: Path) -> None:
    """Every example is admitted by the real API server (MailRelays by the CRD's own rules)."""
    from mailrelay_operator import spec

    docs = [d for d in yaml.safe_load_all(example.read_text()) if d]
    relays = [d for d in docs if d["kind"] == "MailRelay"]
    assert relays, "every example shows a MailRelay"
    for relay in relays:
        spec.parse(relay["spec"])  # the operator's own parser accepts it
    namespace = next((d["metadata"]["namespace"] for d in docs if d["metadata"].get("namespace")), "default")
    result = kubeenv.server_dry_run(kube_session, docs, namespace)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(server dry run)") == len(docs), result.stdout


def test_notes_show_a_first_mailrelay() -> None:
    require_tool("helm")
    result = helmutil.helm(
        "install", "mr", str(promql.CHART), "--dry-run=client", "--namespace", "mailrelay-system"
    )
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kind: MailRelay" in notes and "apiVersion: mailrelay.dev/v1alpha1" in notes


def test_operator_args_parse_with_the_real_cli() -> None:
    """The Deployment's args are accepted by mailrelay-operator's own parser and mean what values say."""
    from mailrelay_operator import cli

    docs = helmutil.template(sets=["operator.watchNamespaces={mail,bulk}", "operator.metricsPort=9191"])
    (deploy,) = helmutil.by_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    options = cli.parse_args(container["args"])
    assert options.standalone is True
    assert options.namespaces == ("mail", "bulk")
    assert options.metrics_port == 9191
    assert options.relay_image == "mailrelay-relay:0.1.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == 9191
    assert options.liveness == f"http://0.0.0.0:{ports['health']}/healthz"
    # The relays' NetworkPolicy admits the operator by these labels: the operator pod must carry them.
    assert options.operator_labels.items() <= pod["metadata"]["labels"].items()
    assert {
        "name": "MAILRELAY_OPERATOR_OPERATOR_NAMESPACE",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
    } in container["env"]
    everywhere = cli.parse_args(
        helmutil.by_kind(helmutil.template(), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0][
            "args"
        ]
    )
    assert everywhere.namespaces == ()


def test_relay_pod_monitor_selects_the_pods_the_operator_builds() -> None:
    """The relays' PodMonitor matches the operator's real pod template and scrapes a port it declares."""
    from mailrelay_operator import manifests, spec

    example = yaml.safe_load((promql.CHART / "examples" / "basic.yaml").read_text())
    deployment = manifests.deployment(
        "outbound",
        "mail",
        spec.parse(example["spec"]),
        image="mailrelay-relay:0.1.0",
        replicas=2,
        token_secret="outbound-admin",
    )
    template = deployment["spec"]["template"]
    pod_labels = template["metadata"]["labels"]
    docs = helmutil.template(api_versions=MONITORING)
    (relay_monitor,) = [
        d for d in helmutil.by_kind(docs, "PodMonitor") if d["metadata"]["name"].endswith("-relays")
    ]
    assert relay_monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_labels["app.kubernetes.io/instance"] == "outbound"  # copied into the `mailrelay` label
    ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    assert relay_monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports
