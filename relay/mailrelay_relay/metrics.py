"""Prometheus metrics of the relay: the module-level objects named in docs/contracts.md, and rendering.

What it is for: one place that defines every `mailrelay_relay_*` metric (exact names, base units, bounded
labels) and renders the exposition for the admin API's `/metrics`. Callers use the objects directly,
e.g. `metrics.REPLIES.labels(code="421").inc()`, or the small helpers below.

What it must not do: no I/O beyond prometheus_client's own files, no SMTP or spool logic, no label
values taken from user input (codes are the relay's own three-digit reply codes, reasons and results
are fixed sets).

Multiprocess mode (`--workers N` with N > 1)
--------------------------------------------
prometheus_client chooses between in-process values and mmap-backed per-process files *when the
package is first imported*, by looking at the environment variable PROMETHEUS_MULTIPROC_DIR. So the
process model's owner (cli.py sets the variable, app.py forks and reaps the workers) must, when it runs
more than one worker:

1. create an empty private directory (e.g. `tempfile.mkdtemp(prefix="mailrelay-metrics-")`, or a
   directory it wipes at start: stale files from an earlier run would be summed in);
2. set `os.environ["PROMETHEUS_MULTIPROC_DIR"]` to it *before* anything imports `prometheus_client` (so
   before importing this module, or `admin`/`delivery`, which import it), in the supervisor, so that
   every worker inherits it (fork or spawn both work: values re-open their files after a fork);
3. when a worker exits, call `metrics.mark_process_dead(pid)` in the supervisor, so that its live
   gauges (sessions, queue, in-flight bytes) stop counting; counters keep the dead worker's totals;
4. serve `/metrics` from any one process: `render()` then aggregates every worker's files through
   `prometheus_client.multiprocess.MultiProcessCollector`, so the pod exposes one coherent view.

Gauges aggregate across workers as follows: per-worker amounts (sessions, queue messages and bytes,
in-flight bytes) are summed over live workers (`livesum`); the oldest queue age and the draining flag
take the maximum over live workers (`livemax`); build_info and max_sessions (a per-pod setting, the same
in every worker) take the maximum (`max`). Without PROMETHEUS_MULTIPROC_DIR everything is in-process and
`render()` uses the default registry.
"""

from __future__ import annotations

import os

import prometheus_client
from prometheus_client import multiprocess

from mailrelay_relay import __version__

PREFIX = "mailrelay_relay_"

# Bucket choices (base units: seconds, bytes).
DELIVERY_DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
    14400.0, 86400.0,
)
MESSAGE_SIZE_BUCKETS = (
    1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0,
)
FSYNC_DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)

CONNECTION_RESULTS = ("accepted", "refused_busy", "refused_draining")
DEAD_LETTER_REASONS = ("permanent", "expired")
ATTEMPT_RESULTS = ("success", "temporary", "permanent", "connection_error")
NOTIFICATION_KINDS = ("failed", "delayed", "relayed")

BUILD_INFO = prometheus_client.Gauge(
    PREFIX + "build_info", "Build information; always 1.", ["version"], multiprocess_mode="max"
)
SESSIONS = prometheus_client.Gauge(
    PREFIX + "sessions", "Open SMTP sessions.", multiprocess_mode="livesum"
)
MAX_SESSIONS = prometheus_client.Gauge(
    PREFIX + "max_sessions", "Configured session cap per pod.", multiprocess_mode="max"
)
CONNECTIONS = prometheus_client.Counter(
    PREFIX + "connections", "SMTP connections by what happened at the greeting.", ["result"]
)
REPLIES = prometheus_client.Counter(
    PREFIX + "replies", "SMTP replies sent, by three-digit code.", ["code"]
)
MESSAGES_ACCEPTED = prometheus_client.Counter(
    PREFIX + "messages_accepted", "Messages answered 250 after being spooled."
)
MESSAGES_DELIVERED = prometheus_client.Counter(
    PREFIX + "messages_delivered", "Messages handed on to the upstream and removed from the spool."
)
MESSAGES_DEAD_LETTERED = prometheus_client.Counter(
    PREFIX + "messages_dead_lettered", "Messages moved to the dead-letter folder, by reason.", ["reason"]
)
NOTIFICATIONS = prometheus_client.Counter(
    PREFIX + "notifications",
    "Delivery status notifications the relay queued for a sender, by what they report.", ["kind"]
)
DELIVERY_ATTEMPTS = prometheus_client.Counter(
    PREFIX + "delivery_attempts", "Delivery attempts to the upstream, by result.", ["result"]
)
QUEUE_MESSAGES = prometheus_client.Gauge(
    PREFIX + "queue_messages", "Messages in the delivery queue (waiting or in flight).",
    multiprocess_mode="livesum",
)
QUEUE_BYTES = prometheus_client.Gauge(
    PREFIX + "queue_bytes", "Content bytes in the delivery queue.", multiprocess_mode="livesum"
)
QUEUE_OLDEST_AGE = prometheus_client.Gauge(
    PREFIX + "queue_oldest_age_seconds", "Age of the oldest queued message.", multiprocess_mode="livemax"
)
INFLIGHT_BYTES = prometheus_client.Gauge(
    PREFIX + "inflight_bytes", "Sum of declared sizes of open SMTP transactions.",
    multiprocess_mode="livesum",
)
DRAINING = prometheus_client.Gauge(
    PREFIX + "draining", "1 while the relay drains, else 0.", multiprocess_mode="livemax"
)
DELIVERY_DURATION = prometheus_client.Histogram(
    PREFIX + "delivery_duration_seconds",
    "Time from the relay's 250 to the upstream's 250.",
    buckets=DELIVERY_DURATION_BUCKETS,
)
MESSAGE_SIZE = prometheus_client.Histogram(
    PREFIX + "message_size_bytes", "Size of accepted messages.", buckets=MESSAGE_SIZE_BUCKETS
)
SPOOL_FSYNC_DURATION = prometheus_client.Histogram(
    PREFIX + "spool_fsync_duration_seconds",
    "Duration of one spool group commit (file fsyncs, renames, directory fsync).",
    buckets=FSYNC_DURATION_BUCKETS,
)

BUILD_INFO.labels(version=__version__).set(1)
# Create every bounded label child up front so each series is exposed (as 0) from the start.
for _result in CONNECTION_RESULTS:
    CONNECTIONS.labels(result=_result)
for _reason in DEAD_LETTER_REASONS:
    MESSAGES_DEAD_LETTERED.labels(reason=_reason)
for _result in ATTEMPT_RESULTS:
    DELIVERY_ATTEMPTS.labels(result=_result)
for _kind in NOTIFICATION_KINDS:
    NOTIFICATIONS.labels(kind=_kind)

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


def multiprocess_dir() -> str | None:
    """The multiprocess directory in use, or None when metrics live in this process only."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def render() -> bytes:
    """The text exposition of every relay metric (aggregated over workers in multiprocess mode)."""
    if multiprocess_dir():
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return prometheus_client.generate_latest(registry)
    return prometheus_client.generate_latest(prometheus_client.REGISTRY)


def mark_process_dead(pid: int) -> None:
    """Call in the supervisor when worker `pid` exits (multiprocess mode only; no-op otherwise)."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def dead_lettered(reason: str) -> None:
    """Count one dead-lettered message (reason is one of DEAD_LETTER_REASONS)."""
    if reason not in DEAD_LETTER_REASONS:
        raise ValueError(f"unknown dead-letter reason {reason!r}")
    MESSAGES_DEAD_LETTERED.labels(reason=reason).inc()


def notification(kind: str) -> None:
    """Count one queued notification (kind is one of NOTIFICATION_KINDS)."""
    if kind not in NOTIFICATION_KINDS:
        raise ValueError(f"unknown notification kind {kind!r}")
    NOTIFICATIONS.labels(kind=kind).inc()


def attempt(result: str) -> None:
    """Count one delivery attempt (result is one of ATTEMPT_RESULTS)."""
    if result not in ATTEMPT_RESULTS:
        raise ValueError(f"unknown attempt result {result!r}")
    DELIVERY_ATTEMPTS.labels(result=result).inc()


def set_queue(messages: int, nbytes: int, oldest_age_seconds: float) -> None:
    """Publish the delivery queue's size (called by delivery on changes and on a timer)."""
    QUEUE_MESSAGES.set(messages)
    QUEUE_BYTES.set(nbytes)
    QUEUE_OLDEST_AGE.set(oldest_age_seconds)
