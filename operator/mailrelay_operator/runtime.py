"""What the operator's handlers share: the operator-wide settings (`Config`), the clients (`Runtime`),
and the per-MailRelay memory of the running process (`Memory`).

Every step is restart-safe, so `Memory` only saves work: drain state lives on the pods (annotations), the
policy's stabilization window in `status.recommendations`, the admin token in its Secret, and a
restarted operator rebuilds the rest from the cluster.

What it must not do: hold decisions or make calls; it is data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mailrelay_operator import cache, kube, policy, relayclient


@dataclass(frozen=True)
class Config:
    """Operator-wide settings from the command line."""

    relay_image: str = "mailrelay-relay:latest"
    relay_timeout: float = 2.0  # per admin call
    resync_seconds: float = 60.0  # how often the scaling loop re-checks the owned objects for drift
    status_refresh_seconds: float = 15.0  # sessions/queueMessages alone are written at most this often
    delete_wait_seconds: float | None = None  # bound of the finalizer's wait; None: spec drain timeout
    operator_labels: Mapping[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "mailrelay-operator"}
    )
    operator_namespace: str | None = None  # where the operator runs (NetworkPolicy peer); None: any
    # The metrics scraper (Prometheus) admitted to the relays' admin port: its pods' labels and namespace
    # (manifests.scraper_peer); both empty: none.
    metrics_scraper_labels: Mapping[str, str] = field(default_factory=dict)
    metrics_scraper_namespace: str | None = None


@dataclass
class Runtime:
    """What every handler shares: the API client, the relay client and the settings."""

    kube: kube.Kube
    relays: relayclient.RelayClient
    config: Config
    # Where the scaling loop reads Deployments and pods: the watch-fed cache, or the API when None.
    read_cache: cache.Cache | None = None

    @property
    def read(self) -> cache.Reader:
        return self.read_cache if self.read_cache is not None else self.kube


@dataclass
class Memory:
    """Per-MailRelay memory of the running operator (lost on restart, rebuilt from the cluster)."""

    history: tuple[policy.Recommendation, ...] | None = None  # None: load from status.recommendations
    token: str | None = None
    last_resync: float = 0.0
    observed_generation: int | None = None
    last_status_patch: float | None = None  # when this process last wrote the status (conditions.patch_due)
    held: set[str] = field(default_factory=set)  # drains held past their timeout, already announced
    orphans: dict[str, bool] = field(default_factory=dict)  # orphaned claims announced -> recovering


def meta(body: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name) of a MailRelay body."""
    metadata = body.get("metadata", {})
    return str(metadata.get("namespace")), str(metadata.get("name"))
