"""`mailrelay-operator`: parse the command line (each flag also has an environment variable) and run the
Kopf operator in-process, with its liveness endpoint and a Prometheus metrics listener.

`parse_args` builds argparse from `config.FLAGS` and exits 2 naming a bad setting; `run` is the coroutine
tests call (with stop/ready flags); `main` is the console entry point, which also sets up the logs (JSON
lines by default). This module must not hold handler logic (that is `handlers` and the modules they call).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
from collections.abc import Mapping, Sequence

import kopf
from mailrelay_common import flags, jsonlog

from mailrelay_operator import (
    __version__,
    cache,
    config,
    handlers,
    kube,
    manifests,
    metrics,
    relayclient,
    runtime,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mailrelay-operator",
        description="Kopf operator for MailRelay: drain-aware scaling of outbound SMTP relays.",
        epilog="Every flag also reads an environment variable: --metrics-port is "
        f"{config.PREFIX}METRICS_PORT; a repeatable flag takes a comma-separated list from its variable.",
    )
    p.add_argument("--version", action="version", version=f"mailrelay-operator {__version__}")
    flags.add_arguments(p, config.FLAGS)
    return p


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> config.Options:
    """Options from the command line and the environment (`os.environ` unless given). A bad value ends
    the program with exit code 2 and a message naming the flag (and its variable when it came from there)."""
    p = parser()
    args = p.parse_args(argv)
    try:
        values = flags.gather(args, os.environ if environ is None else environ, config.FLAGS)
        return config.from_values(values)
    except config.ConfigError as error:
        p.error(f"{flags.origin(config.FLAG_BY_NAME[error.flag], args)}: {error.reason}")


def cache_namespaces(namespaces: Sequence[str]) -> list[str | None]:
    """Where the read cache watches: each `--namespace`, or all namespaces (None) without one. A pattern
    (Kopf accepts globs such as `team-*`) cannot be watched as one namespace, so it gets no informer and
    its MailRelays are read from the API server on every tick (correct, only costlier)."""
    if not namespaces:
        return [None]
    return [ns for ns in namespaces if not any(ch in ns for ch in "*?[]!")]


async def run(
    options: config.Options,
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
        client, (kube.DEPLOYMENTS, kube.STATEFULSETS, kube.PODS, kube.PVCS),
        cache_namespaces(options.namespaces),
        {manifests.NAME_LABEL: manifests.APP_NAME}, index_label=manifests.INSTANCE_LABEL,
    )
    shared = runtime.Runtime(
        kube=client,
        relays=relays,
        config=runtime.Config(
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
    handlers.register(registry, shared)
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


def setup_logging(level: str, log_format: str) -> None:
    """Every logger (the operator's and Kopf's) to stderr at `level`: JSON lines in the relay's fields, or
    plain text for a terminal."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(jsonlog.JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    setup_logging(options.log_level, options.log_format)
    try:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            runner.run(run(options))
    except KeyboardInterrupt:
        return 0
    except kube.NoCluster as error:
        print(f"mailrelay-operator: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
