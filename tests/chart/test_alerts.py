"""The alert rules: valid for promtool, unit-tested with `promtool test rules`, and every alert tested.

The live check (every rule expression returns data from real relays) is in test_promql_live.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.chart import promql
from tests.conftest import require_tool

UNIT_TESTS = Path(__file__).with_name("alerts_test.yaml")

REQUIRED = {
    "MailRelayRelayDown",
    "MailRelayQueueGrowing",
    "MailRelayQueueOld",
    "MailRelayDeadLetters",
    "MailRelaySheddingSustained",
    "MailRelayOverloadedAtMaxReplicas",
    "MailRelayDrainStuck",
    "MailRelayOperatorNotReconciling",
}


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(promql.ALERTS_FILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "test", "rules", str(UNIT_TESTS)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    alerts = {str(rule["alert"]) for rule in promql.alert_rules()}
    assert alerts >= REQUIRED
    fired: set[str] = set()
    silent: set[str] = set()
    for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    assert alerts - fired == set(), "alerts never shown firing"
    assert alerts - silent == set(), "alerts never shown staying silent"


@pytest.mark.parametrize("rule", promql.alert_rules(), ids=lambda r: str(r["alert"]))
def test_rule_metadata(rule: dict[str, object]) -> None:
    known = promql.contract_metrics()
    for name in promql.METRIC_RE.findall(str(rule["expr"])):
        assert promql.base_metric(name, known), f"{name} is not in docs/contracts.md"
    assert rule["labels"]["severity"] in {"info", "warning", "critical"}  # type: ignore[index]
    annotations = rule["annotations"]
    assert annotations["summary"] and annotations["description"]  # type: ignore[index]


def test_plain_prometheus_config_in_the_docs_is_valid(tmp_path: Path) -> None:
    """docs/observability.md's scrape config (for clusters without the Prometheus Operator) loads.

    Debian's Prometheus is built without Kubernetes service discovery, so each `kubernetes_sd_configs`
    is swapped for an empty static config here; the relabeling rules themselves are applied for real by
    the live stack (livestack.py), which feeds them targets carrying Kubernetes pod meta labels.
    """
    promtool = require_tool("promtool")
    config = promql.docs_prometheus_config()
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == {"mailrelay-relay", "mailrelay-operator"}  # the job names the rules and dashboards use
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        job["static_configs"] = [{"targets": []}]
    rules = tmp_path / "mailrelay-alerts.yaml"
    rules.write_bytes(promql.ALERTS_FILE.read_bytes())
    config["rule_files"] = [str(rules)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
