"""The sandbox ReplicaSet's scale-down order: pending, NotReady, lowest deletion cost, then youngest."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailrelay_sandbox import podorder


def pod(name: str, phase: str = "Running", ready: bool = True, cost: int = 0, created: float = 100.0
        ) -> podorder.PodFacts:
    return podorder.PodFacts(name=name, phase=phase, ready=ready, deletion_cost=cost, created_at=created)


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        # pending before anything running, even a NotReady one
        ([pod("a"), pod("b", phase="Pending", ready=False), pod("c", ready=False)], ["b", "c", "a"]),
        # NotReady before ready, even with a higher cost
        ([pod("a", cost=-1000), pod("b", ready=False, cost=5)], ["b", "a"]),
        # the drained relay: NotReady with cost -1000 goes before an older NotReady at cost 0
        ([pod("old", ready=False, created=1), pod("drained", ready=False, cost=-1000, created=50)],
         ["drained", "old"]),
        # among ready pods, the lowest cost first
        ([pod("a", cost=10), pod("b", cost=-5), pod("c", cost=0)], ["b", "c", "a"]),
        # same cost: the youngest first
        ([pod("old", created=1), pod("young", created=9), pod("mid", created=5)], ["young", "mid", "old"]),
        # cost wins over age
        ([pod("young", created=9), pod("old", created=1, cost=-1)], ["old", "young"]),
        ([], []),
    ],
)
def test_deletion_order(pods: list[podorder.PodFacts], expected: list[str]) -> None:
    assert podorder.deletion_order(pods) == expected


@pytest.mark.parametrize(
    ("annotations", "cost"),
    [
        (None, 0),
        ({}, 0),
        ({podorder.DELETION_COST: "-1000"}, -1000),
        ({podorder.DELETION_COST: "12"}, 12),
        ({podorder.DELETION_COST: "abc"}, 0),
        ({podorder.DELETION_COST: str(2**31)}, 0),
    ],
)
def test_parse_cost(annotations: dict[str, str] | None, cost: int) -> None:
    assert podorder.parse_cost(annotations) == cost


pods_strategy = st.lists(
    st.builds(
        podorder.PodFacts,
        name=st.text(min_size=1, max_size=5),
        phase=st.sampled_from(["Pending", "Running", "Unknown"]),
        ready=st.booleans(),
        deletion_cost=st.integers(-2000, 2000),
        created_at=st.floats(0, 1000),
    ),
    max_size=8,
    unique_by=lambda p: p.name,
)


@given(pods_strategy, st.integers(0, 10))
def test_victims_never_take_a_ready_pod_while_a_not_ready_one_is_spared(
    pods: list[podorder.PodFacts], count: int
) -> None:
    chosen = set(podorder.victims(pods, count))
    assert len(chosen) == min(count, len(pods))
    spared = [p for p in pods if p.name not in chosen]
    for victim in (p for p in pods if p.name in chosen):
        for other in spared:
            assert podorder.deletion_key(victim) <= podorder.deletion_key(other)
            if victim.ready and victim.phase == "Running" and other.phase == "Running":
                assert other.ready
