"""Helpers shared by the chart tests: where the PromQL expressions live and which metric names exist.

What it is for: collect every PromQL expression the project ships (dashboard panel targets, dashboard
variables, alert rules) from the committed files, and the metric names docs/contracts.md allows, so
that tests can check them statically and run them against a real Prometheus.

What it must not do: no network, no processes; it only reads files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "mailrelay-operator"
ALERTS_FILE = CHART / "files" / "alerts.yaml"
DASHBOARD_DIR = ROOT / "dashboards"
CONTRACTS = ROOT / "docs" / "contracts.md"

METRIC_RE = re.compile(r"\bmailrelay_(?:relay|operator)_[a-z_]+\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


@dataclass(frozen=True)
class Expression:
    where: str  # e.g. "dashboard mailrelay-relays / Open SMTP sessions [A]" or "alert MailRelayQueueOld"
    expr: str


def dashboards() -> dict[str, dict[str, object]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def dashboard_expressions() -> list[Expression]:
    found = []
    for uid, board in dashboards().items():
        for panel in board["panels"]:  # type: ignore[attr-defined]
            for target in panel.get("targets") or []:
                found.append(
                    Expression(f"dashboard {uid} / {panel['title']} [{target['refId']}]", target["expr"])
                )
    return found


def dashboard_variable_queries() -> list[Expression]:
    found = []
    for uid, board in dashboards().items():
        for variable in board["templating"]["list"]:  # type: ignore[index]
            if variable["type"] == "query":
                found.append(Expression(f"dashboard {uid} / ${variable['name']}", variable["query"]))
    return found


def alert_rules() -> list[dict[str, object]]:
    groups = yaml.safe_load(ALERTS_FILE.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alert_expressions() -> list[Expression]:
    return [Expression(f"alert {rule['alert']}", str(rule["expr"])) for rule in alert_rules()]


def contract_metrics() -> dict[str, str]:
    """Metric name -> type, from the metric tables of docs/contracts.md."""
    metrics = {}
    for line in CONTRACTS.read_text().splitlines():
        match = re.match(r"\|\s*`(mailrelay_(?:relay|operator)_[a-z_]+)`\s*\|\s*([a-z]+)", line)
        if match:
            metrics[match.group(1)] = match.group(2)
    return metrics


def base_metric(name: str, known: dict[str, str]) -> str | None:
    """The contract metric `name` refers to (stripping histogram suffixes), or None if unknown."""
    if name in known:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and known.get(name[: -len(suffix)]) == "histogram":
            return name[: -len(suffix)]
    return None


def docs_prometheus_config() -> dict[str, Any]:
    """The plain Prometheus configuration shown in docs/observability.md (for clusters without the
    Prometheus Operator); the live stack scrapes with its relabeling rules."""
    text = (ROOT / "docs" / "observability.md").read_text()
    (block,) = [
        b.split("```")[0] for b in text.split("```yaml\n")[1:] if "scrape_configs:" in b.split("```")[0]
    ]
    return dict(yaml.safe_load(block))
