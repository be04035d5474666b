"""Which pods a ReplicaSet deletes first on scale-down: the sandbox's copy of Kubernetes' rule (pure).

Kubernetes (`controller.ActivePodsWithRanks`) removes, in this order: pods not yet running (pending),
then pods that are not ready, then pods with the lowest `controller.kubernetes.io/pod-deletion-cost`,
then the youngest. The operator relies on exactly this: it marks a drained relay NotReady with a low
deletion cost, so that lowering the Deployment's replicas removes that relay and no other.

No I/O, no clock: times come in as numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


@dataclasses.dataclass(frozen=True)
class PodFacts:
    name: str
    phase: str               # Pending, Running, Unknown, ...
    ready: bool
    deletion_cost: int
    created_at: float        # unix seconds


_PHASE_RANK = {"Pending": 0, "Unknown": 1, "Running": 2}


def deletion_key(pod: PodFacts) -> tuple[int, int, int, float, str]:
    """Sort key: the smallest key is deleted first."""
    return (
        _PHASE_RANK.get(pod.phase, 0),
        1 if pod.ready else 0,
        pod.deletion_cost,
        -pod.created_at,
        pod.name,
    )


def deletion_order(pods: Sequence[PodFacts]) -> list[str]:
    """Names in the order a ReplicaSet deletes them."""
    return [pod.name for pod in sorted(pods, key=deletion_key)]


def victims(pods: Sequence[PodFacts], count: int) -> list[str]:
    return deletion_order(pods)[: max(0, count)]


def parse_cost(annotations: Mapping[str, Any] | None) -> int:
    """The deletion cost annotation as Kubernetes reads it: an int32, 0 when absent or invalid."""
    raw = (annotations or {}).get(DELETION_COST)
    try:
        value = int(str(raw))
    except (TypeError, ValueError):
        return 0
    return value if -(2**31) <= value < 2**31 else 0
