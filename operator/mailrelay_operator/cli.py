"""`mailrelay-operator`: parse the command line (each flag also has an environment variable) and run the
Kopf operator in-process, with its liveness endpoint and a Prometheus metrics listener.

`run` is the coroutine tests call (with stop/ready flags); `main` is the console entry point. This module
must not hold handler logic (that is `handlers` and `reconcile`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import kopf

from mailrelay_operator import cache, handlers, kube, manifests, metrics, reconcile, relayclient

ENV_PREFIX = "MAILRELAY_OPERATOR_"


@dataclass(frozen=True)
class Options:
    namespaces: tuple[str, ...] = ()
    standalone: bool = False
    kubeconfig: str | None = None
    context: str | None = None
    relay_image: str = "mailrelay-relay:latest"
    liveness: str | None = "http://0.0.0.0:8080/healthz"
    metrics_port: int | None = 9090
    metrics_host: str = "0.0.0.0"
    relay_timeout: float = 2.0
    resync_seconds: float = 60.0
    status_refresh_seconds: float = 15.0
    delete_wait_seconds: float | None = None
    api_retries: int = 5
    api_timeout: float = 10.0
    peering: str | None = None
    log_level: str = "info"
    operator_namespace: str | None = None
    operator_labels: dict[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "mailrelay-operator"}
    )
    metrics_scraper_labels: dict[str, str] = field(default_factory=dict)
    metrics_scraper_namespace: str | None = None


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name, default)


def _labels(text: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected key=value[,key=value], got {text!r}")
        result[key.strip()] = value.strip()
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mailrelay-operator",
        description="Kopf operator for MailRelay: drain-aware scaling of outbound SMTP relays. Every flag "
        f"has an environment variable {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}NAMESPACE=a,b); "
        "--relay-image also reads MAILRELAY_RELAY_IMAGE.",
    )
    ns_env = _env("NAMESPACE")
    p.add_argument(
        "--namespace",
        action="append",
        default=None,
        help="watch only this namespace (repeatable; default: all namespaces)",
    )
    p.add_argument(
        "--standalone",
        action="store_true",
        default=_env("STANDALONE", "") in ("1", "true"),
        help="no peering with other operator instances",
    )
    p.add_argument(
        "--peering", default=_env("PEERING"), help="Kopf peering object name (when not standalone)"
    )
    p.add_argument(
        "--kubeconfig",
        default=_env("KUBECONFIG"),
        help="kubeconfig file (default: $KUBECONFIG, else in-cluster, else ~/.kube/config)",
    )
    p.add_argument("--context", default=_env("CONTEXT"), help="kubeconfig context")
    p.add_argument(
        "--relay-image",
        default=os.environ.get("MAILRELAY_RELAY_IMAGE", _env("RELAY_IMAGE", Options.relay_image)),
        help="relay container image, unless a MailRelay sets spec.image",
    )
    p.add_argument(
        "--liveness",
        default=_env("LIVENESS", Options.liveness),
        help="liveness endpoint URL served by Kopf ('' to disable)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(_env("METRICS_PORT", "9090") or 0),
        help="Prometheus /metrics port (0 disables)",
    )
    p.add_argument("--metrics-host", default=_env("METRICS_HOST", Options.metrics_host))
    p.add_argument(
        "--relay-timeout",
        type=float,
        default=float(_env("RELAY_TIMEOUT", "2") or 2),
        help="timeout of one relay admin call, seconds",
    )
    p.add_argument(
        "--resync-seconds",
        type=float,
        default=float(_env("RESYNC_SECONDS", "60") or 60),
        help="how often owned objects are re-checked for drift",
    )
    p.add_argument(
        "--status-refresh-seconds",
        type=float,
        default=float(_env("STATUS_REFRESH_SECONDS", "15") or 15),
        help="how often status.sessions/queueMessages are written when nothing else in the status changed",
    )
    p.add_argument(
        "--delete-wait-seconds",
        type=float,
        default=_float_or_none(_env("DELETE_WAIT_SECONDS")),
        help="upper bound of the finalizer's drain wait (default: spec.drain.timeoutSeconds)",
    )
    p.add_argument("--api-retries", type=int, default=int(_env("API_RETRIES", "5") or 5))
    p.add_argument("--api-timeout", type=float, default=float(_env("API_TIMEOUT", "10") or 10))
    p.add_argument(
        "--operator-labels",
        type=_labels,
        default=_labels(_env("OPERATOR_LABELS", "app.kubernetes.io/name=mailrelay-operator") or ""),
        help="labels of the operator's pods, allowed to reach the relays' admin port",
    )
    p.add_argument(
        "--operator-namespace",
        default=_env("POD_NAMESPACE", os.environ.get("POD_NAMESPACE")),
        help="namespace the operator runs in, allowed to reach the relays' admin port "
        "(default: $POD_NAMESPACE; unset: operator pods in any namespace)",
    )
    p.add_argument(
        "--metrics-scraper-labels",
        type=_labels,
        default=_labels(_env("METRICS_SCRAPER_LABELS", "") or ""),
        help="labels of the metrics scraper's pods (Prometheus), also allowed to reach the relays' admin "
        "port for /metrics (default: none admitted unless --metrics-scraper-namespace is set)",
    )
    p.add_argument(
        "--metrics-scraper-namespace",
        default=_env("METRICS_SCRAPER_NAMESPACE") or None,
        help="namespace of the metrics scraper's pods (default: any namespace, when "
        "--metrics-scraper-labels is set; alone, it admits every pod of that namespace)",
    )
    p.add_argument(
        "--log-level", default=_env("LOG_LEVEL", "info"), choices=["debug", "info", "warning", "error"]
    )
    p.set_defaults(env_namespaces=tuple(n.strip() for n in (ns_env or "").split(",") if n.strip()))
    return p


def _float_or_none(value: str | None) -> float | None:
    return float(value) if value else None


def parse_args(argv: Sequence[str] | None = None) -> Options:
    args = parser().parse_args(argv)
    namespaces = tuple(args.namespace) if args.namespace else args.env_namespaces
    if args.api_retries < 1 or args.relay_timeout <= 0 or args.api_timeout <= 0:
        parser().error("--api-retries, --relay-timeout and --api-timeout must be positive")
    return Options(
        namespaces=namespaces,
        standalone=args.standalone,
        kubeconfig=args.kubeconfig,
        context=args.context,
        relay_image=args.relay_image,
        liveness=args.liveness or None,
        metrics_port=args.metrics_port or None,
        metrics_host=args.metrics_host,
        relay_timeout=args.relay_timeout,
        resync_seconds=args.resync_seconds,
        status_refresh_seconds=args.status_refresh_seconds,
        delete_wait_seconds=args.delete_wait_seconds,
        api_retries=args.api_retries,
        api_timeout=args.api_timeout,
        peering=args.peering,
        log_level=args.log_level,
        operator_labels=args.operator_labels,
        operator_namespace=args.operator_namespace,
        metrics_scraper_labels=args.metrics_scraper_labels,
        metrics_scraper_namespace=args.metrics_scraper_namespace or None,
    )


def cache_namespaces(namespaces: Sequence[str]) -> list[str | None]:
    """Where the read cache watches: each `--namespace`, or all namespaces (None) without one. A pattern
    (Kopf accepts globs such as `team-*`) cannot be watched as one namespace, so it gets no informer and
    its MailRelays are read from the API server on every tick (correct, only costlier)."""
    if not namespaces:
        return [None]
    return [ns for ns in namespaces if not any(ch in ns for ch in "*?[]!")]


async def run(
    options: Options,
    *,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    serve_metrics: bool = True,
) -> None:
    """Run the operator until `stop_flag` is set (or a signal arrives when it is None)."""
    client = await kube.Kube.connect(
        options.kubeconfig,
        options.context,
        kube.RetryPolicy(attempts=options.api_retries, timeout=options.api_timeout),
    )
    relays = relayclient.RelayClient(timeout=options.relay_timeout)
    read_cache = cache.Cache.of(
        client, (kube.DEPLOYMENTS, kube.PODS), cache_namespaces(options.namespaces),
        {manifests.NAME_LABEL: manifests.APP_NAME}, index_label=manifests.INSTANCE_LABEL,
    )
    runtime = reconcile.Runtime(
        kube=client,
        relays=relays,
        config=reconcile.Config(
            relay_image=options.relay_image,
            relay_timeout=options.relay_timeout,
            resync_seconds=options.resync_seconds,
            status_refresh_seconds=options.status_refresh_seconds,
            delete_wait_seconds=options.delete_wait_seconds,
            operator_labels=options.operator_labels,
            operator_namespace=options.operator_namespace,
            metrics_scraper_labels=options.metrics_scraper_labels,
            metrics_scraper_namespace=options.metrics_scraper_namespace,
        ),
        read_cache=read_cache,
    )
    registry = kopf.OperatorRegistry()
    handlers.register(registry, runtime)
    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    stop_metrics = None
    if serve_metrics and options.metrics_port:
        stop_metrics = metrics.serve(options.metrics_port, options.metrics_host)
    read_cache.start()
    try:
        await kopf.operator(
            registry=registry,
            settings=settings,
            standalone=options.standalone or None,
            peering_name=options.peering,
            clusterwide=not options.namespaces,
            namespaces=list(options.namespaces),
            liveness_endpoint=options.liveness,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
            memo=kopf.Memo(),
        )
    finally:
        if stop_metrics is not None:
            stop_metrics()
        await read_cache.stop()
        await relays.close()
        await client.close()


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (a dependency on Linux): the operator is mostly HTTP client work (API calls
    and relay scrapes), which uvloop's transports do with less CPU than asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    logging.basicConfig(
        level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            runner.run(run(options))
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
