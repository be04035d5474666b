"""Grafana dashboards for mailrelay-operator, built as code with grafana-foundation-sdk.

What it is for: the single source of the dashboards. `make dashboards` (python dashboards/generate.py)
writes one JSON file per dashboard into dashboards/ and the same bytes into the chart
(charts/mailrelay-operator/dashboards/), which ships them as ConfigMaps for Grafana's sidecar.
`--check` exits 1 when a committed file differs from what this script builds (tests/chart run it).

What it must not do: no network, no clock reads (the output is a pure function of this file, so the
committed JSON is reproducible), no metric or label names other than those in docs/contracts.md plus
the target labels the chart's PodMonitors add (`namespace`, `mailrelay`, `pod`).

Every query filters on `namespace=~"$namespace"` and `mailrelay=~"$mailrelay"`; both variables come from
`label_values(...)`, and `$datasource` selects the Prometheus data source.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common, dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog import encoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models

ROOT = Path(__file__).resolve().parent.parent
OUTPUT_DIRS = (ROOT / "dashboards", ROOT / "charts" / "mailrelay-operator" / "dashboards")

DATASOURCE = dashboard_models.DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'namespace=~"$namespace", mailrelay=~"$mailrelay"'
RELAY_BY = "namespace, mailrelay"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]


def _variables(anchor_metric: str) -> list[dashboard.DatasourceVariable | dashboard.QueryVariable]:
    datasource = dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
    namespace = (
        dashboard.QueryVariable("namespace")
        .label("Namespace")
        .datasource(DATASOURCE)
        .query(f"label_values({anchor_metric}, namespace)")
        .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_models.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    mailrelay = (
        dashboard.QueryVariable("mailrelay")
        .label("MailRelay")
        .datasource(DATASOURCE)
        .query(f'label_values({anchor_metric}{{namespace=~"$namespace"}}, mailrelay)')
        .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_models.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    return [datasource, namespace, mailrelay]


def _panel(spec: PanelSpec, panel_id: int, width: int = 12) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .datasource(DATASOURCE)
        .unit(spec.unit)
        .min(0)
        .height(8)
        .span(width)
        .fill_opacity(10)
        .legend(
            common.VizLegendOptions()
            .display_mode(common_models.LegendDisplayMode.LIST)
            .placement(common_models.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(common.VizTooltipOptions().mode(common_models.TooltipDisplayMode.MULTI))
    )
    for index, query in enumerate(spec.queries):
        panel = panel.with_target(
            prometheus.Dataquery()
            .ref_id(chr(ord("A") + index))
            .datasource(DATASOURCE)
            .expr(query.expr)
            .legend_format(query.legend)
        )
    return panel


def _quantile(q: float, metric: str, by: str = RELAY_BY) -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{SEL}}}[$__rate_interval])))"


RELAY_ROWS: tuple[tuple[str, tuple[PanelSpec, ...]], ...] = (
    (
        "Traffic",
        (
            PanelSpec(
                "Open SMTP sessions",
                "Open sessions summed over the relay pods, against the summed per-pod cap (--max-sessions).",
                "short",
                (
                    Query(
                        f"sum by ({RELAY_BY}) (mailrelay_relay_sessions{{{SEL}}})",
                        "{{namespace}}/{{mailrelay}} sessions",
                    ),
                    Query(
                        f"sum by ({RELAY_BY}) (mailrelay_relay_max_sessions{{{SEL}}})",
                        "{{namespace}}/{{mailrelay}} capacity",
                    ),
                ),
            ),
            PanelSpec(
                "Messages accepted and delivered per second",
                "Accepted: answered 250 after the spool fsync. Delivered: the upstream answered 250.",
                "ops",
                (
                    Query(
                        f"sum by ({RELAY_BY}) "
                        f"(rate(mailrelay_relay_messages_accepted_total{{{SEL}}}[$__rate_interval]))",
                        "{{namespace}}/{{mailrelay}} accepted",
                    ),
                    Query(
                        f"sum by ({RELAY_BY}) "
                        f"(rate(mailrelay_relay_messages_delivered_total{{{SEL}}}[$__rate_interval]))",
                        "{{namespace}}/{{mailrelay}} delivered",
                    ),
                ),
            ),
            PanelSpec(
                "Connections per second by result",
                "accepted, refused_busy (421 at the session cap), refused_draining (421 while draining).",
                "cps",
                (
                    Query(
                        f"sum by (result) "
                        f"(rate(mailrelay_relay_connections_total{{{SEL}}}[$__rate_interval]))",
                        "{{result}}",
                    ),
                ),
            ),
            PanelSpec(
                "Load-shedding replies per second (421, 452, 455)",
                "421: busy, draining or timed out; 452: too many recipients or no spool room for the "
                "declared SIZE; 455: a parameter the relay cannot honour now.",
                "reqps",
                (
                    Query(
                        f'sum by (code) (rate(mailrelay_relay_replies_total{{{SEL}, code=~"421|452|455"}}'
                        f"[$__rate_interval]))",
                        "{{code}}",
                    ),
                ),
            ),
        ),
    ),
    (
        "Queue",
        (
            PanelSpec(
                "Queue depth",
                "Messages spooled and not yet delivered (waiting or in flight), summed over pods.",
                "short",
                (
                    Query(
                        f"sum by ({RELAY_BY}) (mailrelay_relay_queue_messages{{{SEL}}})",
                        "{{namespace}}/{{mailrelay}}",
                    ),
                ),
            ),
            PanelSpec(
                "Oldest queued message",
                "Age of the oldest message still in a relay's queue; it grows when the upstream is slow "
                "or refusing.",
                "s",
                (
                    Query(
                        f"max by ({RELAY_BY}) (mailrelay_relay_queue_oldest_age_seconds{{{SEL}}})",
                        "{{namespace}}/{{mailrelay}}",
                    ),
                ),
            ),
            PanelSpec(
                "Queue bytes and in-flight bytes",
                "Spooled content bytes, and the declared sizes of open transactions.",
                "bytes",
                (
                    Query(
                        f"sum by ({RELAY_BY}) (mailrelay_relay_queue_bytes{{{SEL}}})",
                        "{{namespace}}/{{mailrelay}} queued",
                    ),
                    Query(
                        f"sum by ({RELAY_BY}) (mailrelay_relay_inflight_bytes{{{SEL}}})",
                        "{{namespace}}/{{mailrelay}} in flight",
                    ),
                ),
            ),
            PanelSpec(
                "Dead-lettered messages per second",
                "Messages moved to the dead-letter folder: permanent (5xx upstream) or expired "
                "(--queue-lifetime). Anything above zero needs a look.",
                "ops",
                (
                    Query(
                        f"sum by (reason) "
                        f"(rate(mailrelay_relay_messages_dead_lettered_total{{{SEL}}}[$__rate_interval]))",
                        "{{reason}}",
                    ),
                ),
            ),
            PanelSpec(
                "Notifications to senders per second",
                "Delivery status notifications the relays queued for senders: failed (bounces), delayed "
                "(--delay-warning-time) and relayed (NOTIFY=SUCCESS through an upstream without DSN).",
                "ops",
                (
                    Query(
                        f"sum by (kind) "
                        f"(rate(mailrelay_relay_notifications_total{{{SEL}}}[$__rate_interval]))",
                        "{{kind}}",
                    ),
                ),
            ),
        ),
    ),
    (
        "Delivery",
        (
            PanelSpec(
                "Delivery latency p50 / p99",
                "From the relay's 250 to the upstream's 250.",
                "s",
                (
                    Query(
                        _quantile(0.5, "mailrelay_relay_delivery_duration_seconds"),
                        "{{namespace}}/{{mailrelay}} p50",
                    ),
                    Query(
                        _quantile(0.99, "mailrelay_relay_delivery_duration_seconds"),
                        "{{namespace}}/{{mailrelay}} p99",
                    ),
                ),
            ),
            PanelSpec(
                "Delivery attempts per second by result",
                "success, temporary (4xx, retried), permanent (5xx, dead-lettered), connection_error.",
                "ops",
                (
                    Query(
                        f"sum by (result) "
                        f"(rate(mailrelay_relay_delivery_attempts_total{{{SEL}}}[$__rate_interval]))",
                        "{{result}}",
                    ),
                ),
            ),
            PanelSpec(
                "Spool fsync p99",
                "Duration of one spool group commit; the relay answers 250 only after it.",
                "s",
                (
                    Query(
                        _quantile(0.99, "mailrelay_relay_spool_fsync_duration_seconds"),
                        "{{namespace}}/{{mailrelay}} p99",
                    ),
                ),
            ),
            PanelSpec(
                "Relays draining",
                "Relay pods that answer 421 to new sessions because they drain.",
                "short",
                (
                    Query(
                        f"sum by ({RELAY_BY}) (mailrelay_relay_draining{{{SEL}}})",
                        "{{namespace}}/{{mailrelay}}",
                    ),
                ),
            ),
        ),
    ),
)

OPERATOR_ROWS: tuple[tuple[str, tuple[PanelSpec, ...]], ...] = (
    (
        "Replicas",
        (
            PanelSpec(
                "Desired, ready and draining replicas",
                "Desired: the operator's scaling decision. Ready: relay pods ready. Draining: pods the "
                "operator drains before it lowers the Deployment's replicas.",
                "short",
                (
                    Query(
                        f"sum by ({RELAY_BY}) (mailrelay_operator_desired_replicas{{{SEL}}})",
                        "{{namespace}}/{{mailrelay}} desired",
                    ),
                    Query(
                        f"sum by ({RELAY_BY}) (mailrelay_operator_ready_replicas{{{SEL}}})",
                        "{{namespace}}/{{mailrelay}} ready",
                    ),
                    Query(
                        f"sum by ({RELAY_BY}) (mailrelay_operator_draining_pods{{{SEL}}})",
                        "{{namespace}}/{{mailrelay}} draining",
                    ),
                ),
            ),
            PanelSpec(
                "Overloaded",
                "1 when the desired replica count exceeds spec.replicas.max: relays shed with 421.",
                "short",
                (
                    Query(
                        f"max by ({RELAY_BY}) (mailrelay_operator_overloaded{{{SEL}}})",
                        "{{namespace}}/{{mailrelay}}",
                    ),
                ),
            ),
            PanelSpec(
                "Orphaned spool claims",
                "Spool claims beyond the StatefulSet that may hold mail (persistent spools). The operator "
                "brings their ordinals back to deliver it, so this should return to 0 within a tick.",
                "short",
                (
                    Query(
                        f"max by ({RELAY_BY}) (mailrelay_operator_orphaned_spools{{{SEL}}})",
                        "{{namespace}}/{{mailrelay}}",
                    ),
                ),
            ),
        ),
    ),
    (
        "Scaling and draining",
        (
            PanelSpec(
                "Scale events",
                "Scale-ups and scale-downs per interval.",
                "short",
                (
                    Query(
                        f"sum by ({RELAY_BY}, direction) "
                        f"(increase(mailrelay_operator_scale_events_total{{{SEL}}}[$__rate_interval]))",
                        "{{namespace}}/{{mailrelay}} {{direction}}",
                    ),
                ),
            ),
            PanelSpec(
                "Drain duration p50 / p99 by outcome",
                "How long a relay took to drain before it was removed (drained), gave up (timeout) or was "
                "resumed because demand rose (cancelled).",
                "s",
                (
                    Query(
                        "histogram_quantile(0.5, sum by (outcome, le) "
                        "(rate(mailrelay_operator_drain_duration_seconds_bucket[$__rate_interval])))",
                        "{{outcome}} p50",
                    ),
                    Query(
                        "histogram_quantile(0.99, sum by (outcome, le) "
                        "(rate(mailrelay_operator_drain_duration_seconds_bucket[$__rate_interval])))",
                        "{{outcome}} p99",
                    ),
                ),
            ),
            PanelSpec(
                "Drains finished per second by outcome",
                "drained, timeout (mail may be left in the spool) or cancelled.",
                "ops",
                (
                    Query(
                        "sum by (outcome) "
                        "(rate(mailrelay_operator_drain_duration_seconds_count[$__rate_interval]))",
                        "{{outcome}}",
                    ),
                ),
            ),
        ),
    ),
    (
        "Operator health",
        (
            PanelSpec(
                "Seconds since last reconcile",
                "Time since the operator last reconciled each MailRelay; it should stay near "
                "spec.scaling.intervalSeconds.",
                "s",
                (
                    Query(
                        f"time() - max by ({RELAY_BY}) "
                        f"(mailrelay_operator_last_reconcile_timestamp_seconds{{{SEL}}})",
                        "{{namespace}}/{{mailrelay}}",
                    ),
                ),
            ),
            PanelSpec(
                "Reconcile and scrape errors per second",
                "Handler errors (by handler) and failed scrapes of relay /status (by MailRelay).",
                "ops",
                (
                    Query(
                        "sum by (handler) "
                        "(rate(mailrelay_operator_reconcile_errors_total[$__rate_interval]))",
                        "reconcile {{handler}}",
                    ),
                    Query(
                        f"sum by ({RELAY_BY}) "
                        f"(rate(mailrelay_operator_scrape_errors_total{{{SEL}}}[$__rate_interval]))",
                        "scrape {{namespace}}/{{mailrelay}}",
                    ),
                ),
            ),
        ),
    ),
)


@dataclass(frozen=True)
class DashboardSpec:
    uid: str
    title: str
    description: str
    anchor_metric: str
    rows: tuple[tuple[str, tuple[PanelSpec, ...]], ...]


DASHBOARDS = (
    DashboardSpec(
        uid="mailrelay-relays",
        title="MailRelay / Relays",
        description="SMTP traffic, queues, shedding and delivery of the mail relays.",
        anchor_metric="mailrelay_relay_build_info",
        rows=RELAY_ROWS,
    ),
    DashboardSpec(
        uid="mailrelay-operator",
        title="MailRelay / Operator",
        description="Replicas, scaling decisions and drains made by mailrelay-operator.",
        anchor_metric="mailrelay_operator_desired_replicas",
        rows=OPERATOR_ROWS,
    ),
)


def build(spec: DashboardSpec) -> dashboard.Dashboard:
    board = (
        dashboard.Dashboard(spec.title)
        .uid(spec.uid)
        .description(spec.description)
        .tags(["mailrelay", "generated"])
        .editable()
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .variables(list(_variables(spec.anchor_metric)))
    )
    panel_id = 0  # stable ids, in layout order, so links like ?viewPanel=N survive regeneration
    for row_title, panels in spec.rows:
        panel_id += 1
        board = board.with_row(dashboard.Row(row_title).id(panel_id))
        for panel in panels:
            panel_id += 1
            board = board.with_panel(_panel(panel, panel_id))
    return board


def render(spec: DashboardSpec) -> str:
    return encoder.JSONEncoder(sort_keys=True, indent=2).encode(build(spec).build()) + "\n"


def outputs() -> dict[Path, str]:
    """Every file this script writes, with its content."""
    files: dict[Path, str] = {}
    for spec in DASHBOARDS:
        text = render(spec)
        json.loads(text)  # fail here, not in Grafana, if the encoder ever emits something odd
        for directory in OUTPUT_DIRS:
            files[directory / f"{spec.uid}.json"] = text
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file is stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)} (run `make dashboards`)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
