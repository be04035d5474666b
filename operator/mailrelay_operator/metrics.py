"""The operator's Prometheus metrics (names and labels from docs/contracts.md) and their HTTP listener.

Metrics live in their own CollectorRegistry so that several operators in one test process do not clash
on names, and labels stay bounded (namespace and MailRelay name, removed when the MailRelay goes).
It must not decide anything; callers record what happened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mailrelay_operator import drain

REGISTRY = CollectorRegistry(auto_describe=True)
_PER_RELAY = ("namespace", "mailrelay")

DESIRED_REPLICAS = Gauge("mailrelay_operator_desired_replicas", "Serving relays the operator wants.",
                         _PER_RELAY, registry=REGISTRY)
READY_REPLICAS = Gauge("mailrelay_operator_ready_replicas", "Relay pods that are ready.",
                       _PER_RELAY, registry=REGISTRY)
DRAINING_PODS = Gauge("mailrelay_operator_draining_pods", "Relay pods being drained.",
                      _PER_RELAY, registry=REGISTRY)
OVERLOADED = Gauge("mailrelay_operator_overloaded",
                   "1 when the load needs more relays than spec.replicas.max.", _PER_RELAY, registry=REGISTRY)
SCALE_EVENTS = Counter("mailrelay_operator_scale_events", "Scale decisions applied, by direction.",
                       (*_PER_RELAY, "direction"), registry=REGISTRY)
DRAIN_DURATION = Histogram("mailrelay_operator_drain_duration_seconds",
                           "From the start of a relay's drain to its end, by outcome.", ("outcome",),
                           buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600), registry=REGISTRY)
SCRAPE_ERRORS = Counter("mailrelay_operator_scrape_errors", "Relay /status calls that failed.",
                        _PER_RELAY, registry=REGISTRY)
RECONCILE_ERRORS = Counter("mailrelay_operator_reconcile_errors", "Handler runs that failed, by handler.",
                           ("handler",), registry=REGISTRY)
CACHE_RELISTS = Counter("mailrelay_operator_cache_relists",
                        "Lists of the read cache after its watch broke, expired or was refused, by resource.",
                        ("resource",), registry=REGISTRY)
ORPHANED_SPOOLS = Gauge("mailrelay_operator_orphaned_spools",
                        "Spool claims outside the StatefulSet that may hold mail (status.orphanedSpools).",
                        _PER_RELAY, registry=REGISTRY)
LAST_RECONCILE = Gauge("mailrelay_operator_last_reconcile_timestamp_seconds",
                       "Unix time of the last finished scaling tick.", _PER_RELAY, registry=REGISTRY)

_PER_RELAY_METRICS: tuple[Gauge | Counter, ...] = (
    DESIRED_REPLICAS, READY_REPLICAS, DRAINING_PODS, OVERLOADED, ORPHANED_SPOOLS, SCRAPE_ERRORS,
    LAST_RECONCILE)

# Label values known in advance. Their series are created at import (operator-wide ones) or at a
# MailRelay's first tick (per-MailRelay ones), so a healthy operator exposes 0 rather than nothing, and
# rate() and alerts see them. The handlers, scaling and finalizer use exactly these names.
HANDLER_OWNED, HANDLER_SCALING, HANDLER_DELETE = "owned", "scaling", "delete"
HANDLERS = (HANDLER_OWNED, HANDLER_SCALING, HANDLER_DELETE)
OUTCOME_CANCELLED = "cancelled"  # demand rose mid-drain: the relay resumed service
DRAIN_OUTCOMES = (drain.OUTCOME_DRAINED, drain.OUTCOME_TIMEOUT, OUTCOME_CANCELLED)
DIRECTIONS = ("up", "down")
CACHED_RESOURCES = ("deployments", "statefulsets", "pods", "persistentvolumeclaims")  # cache.py


def _initialise_operator_series() -> None:
    for handler in HANDLERS:
        RECONCILE_ERRORS.labels(handler)
    for outcome in DRAIN_OUTCOMES:
        DRAIN_DURATION.labels(outcome)
    for resource in CACHED_RESOURCES:
        CACHE_RELISTS.labels(resource)


_initialise_operator_series()


def initialise(namespace: str, name: str) -> None:
    """Create the counters of one MailRelay at 0 (its first tick), so they exist before any event."""
    SCRAPE_ERRORS.labels(namespace, name)
    for direction in DIRECTIONS:
        SCALE_EVENTS.labels(namespace, name, direction)


def forget(namespace: str, name: str) -> None:
    """Drop every series of a deleted MailRelay."""
    for metric in _PER_RELAY_METRICS:
        with contextlib.suppress(KeyError):
            metric.remove(namespace, name)
    for direction in DIRECTIONS:
        with contextlib.suppress(KeyError):
            SCALE_EVENTS.remove(namespace, name, direction)


def serve(port: int, host: str = "0.0.0.0") -> Callable[[], None]:
    """Start the /metrics listener (a daemon thread of prometheus_client; not in the asyncio loop).

    Returns a function that stops it."""
    server, thread = prometheus_client.start_http_server(port, addr=host, registry=REGISTRY)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


def exposition() -> bytes:
    """The current exposition text (for tests and debugging)."""
    return bytes(prometheus_client.generate_latest(REGISTRY))
