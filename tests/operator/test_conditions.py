"""Status conditions (mailrelay_operator.conditions): lastTransitionTime moves only with the status."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mailrelay_operator import conditions, kubetypes

T0 = "2027-01-15T08:00:00Z"
T1 = "2027-01-15T08:05:00Z"


def test_new_condition_gets_now() -> None:
    result = conditions.set_condition([], conditions.READY, "True", "RelaysReady", "3 of 3 ready", T0, 4)
    assert result == [
        {
            "type": "Ready",
            "status": "True",
            "reason": "RelaysReady",
            "message": "3 of 3 ready",
            "lastTransitionTime": T0,
            "observedGeneration": 4,
        }
    ]


@pytest.mark.parametrize(
    ("old_status", "new_status", "reason", "expected_time"),
    [
        ("True", "True", "RelaysReady", T0),  # unchanged: kept
        ("True", "True", "SomethingElse", T0),  # only the reason changed: kept
        ("True", "False", "ReplicasNotReady", T1),  # status changed: now
        ("False", "Unknown", "NoData", T1),
    ],
)
def test_transition_time(old_status: str, new_status: str, reason: str, expected_time: str) -> None:
    existing = conditions.set_condition([], "Ready", old_status, "RelaysReady", "m", T0)  # type: ignore[arg-type]
    result = conditions.set_condition(existing, "Ready", new_status, reason, "m2", T1)  # type: ignore[arg-type]
    (cond,) = result
    assert cond["lastTransitionTime"] == expected_time
    assert (cond["status"], cond["reason"], cond["message"]) == (new_status, reason, "m2")


def test_other_conditions_keep_their_order_and_the_input_is_untouched() -> None:
    existing: list[kubetypes.Condition] = []
    for type_ in conditions.TYPES:
        existing = conditions.set_condition(existing, type_, "False", "Init", "", T0)
    frozen = copy.deepcopy(existing)
    result = conditions.set_condition(existing, conditions.OVERLOADED, "True", "DemandAboveMaximum", "x", T1)
    assert existing == frozen
    assert [c["type"] for c in result] == list(conditions.TYPES)
    assert [c["lastTransitionTime"] for c in result] == [T0, T0, T1, T0]


def test_a_condition_without_a_time_gets_one() -> None:
    result = conditions.set_condition([{"type": "Ready", "status": "True"}], "Ready", "True", "Ok", "", T1)
    assert result[0]["lastTransitionTime"] == T1


def test_duplicates_collapse() -> None:
    existing: list[kubetypes.Condition] = [
        {"type": "Ready", "status": "True", "lastTransitionTime": T0},
        {"type": "Ready", "status": "False", "lastTransitionTime": T0},
    ]
    assert len(conditions.set_condition(existing, "Ready", "True", "Ok", "", T1)) == 1


@pytest.mark.parametrize("reason", ["", "has space", "1Leading", "ends-with-dash-"])
def test_bad_reason_is_rejected(reason: str) -> None:
    with pytest.raises(ValueError):
        conditions.set_condition([], "Ready", "True", reason, "", T0)


def test_bad_status_is_rejected() -> None:
    with pytest.raises(ValueError):
        conditions.set_condition([], "Ready", "yes", "Ok", "", T0)  # type: ignore[arg-type]


def test_status_of() -> None:
    assert (conditions.status_of(True), conditions.status_of(False)) == ("True", "False")


statuses = st.sampled_from(["True", "False", "Unknown"])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(conditions.TYPES), statuses), max_size=30))
def test_transition_time_is_the_time_of_the_last_status_change(steps: list[tuple[str, str]]) -> None:
    current: list[kubetypes.Condition] = []
    last_change: dict[str, tuple[str, str]] = {}  # type -> (status, time)
    for i, (type_, status) in enumerate(steps):
        now = f"2027-01-15T08:{i:02d}:00Z"
        current = conditions.set_condition(current, type_, status, "Step", str(i), now)  # type: ignore[arg-type]
        if type_ not in last_change or last_change[type_][0] != status:
            last_change[type_] = (status, now)
        assert len(current) == len(last_change)
    for cond in current:
        assert (cond["status"], cond["lastTransitionTime"]) == last_change[cond["type"]]


# -- when a status is written (conditions.patch_due) -------------------------------------------------

BASE = {
    "replicas": 3, "readyReplicas": 3, "sessions": 12, "queueMessages": 4, "conditions": [{"type": "Ready"}],
}


@pytest.mark.parametrize(
    ("change", "last_patch", "now", "due"),
    [
        ({}, 100.0, 200.0, False),                                  # nothing changed: never
        ({"sessions": 13}, 100.0, 110.0, False),                    # traffic only, 10 s after a patch
        ({"queueMessages": 0, "sessions": 1}, 100.0, 115.0, True),  # traffic only, refresh interval passed
        ({"sessions": 13}, None, 110.0, True),                      # no patch yet by this process
        ({"readyReplicas": 2}, 100.0, 101.0, True),                 # a relay count: at once
        ({"conditions": [{"type": "Ready", "status": "False"}]}, 100.0, 101.0, True),
        ({"sessions": 13, "replicas": 4}, 100.0, 101.0, True),       # traffic with something else: at once
        ({"observedGeneration": 7}, 100.0, 101.0, True),            # a new field
    ],
)
def test_patch_due(change: dict[str, object], last_patch: float | None, now: float, due: bool) -> None:
    assert conditions.patch_due(BASE, {**BASE, **change}, last_patch=last_patch, now=now,
                                refresh_seconds=15.0) is due


@given(
    sessions=st.integers(min_value=0, max_value=10_000),
    queue=st.integers(min_value=0, max_value=10_000),
    ready=st.integers(min_value=0, max_value=20),
    since=st.integers(min_value=0, max_value=1_000),  # whole seconds: no float rounding in the oracle
    refresh=st.integers(min_value=0, max_value=600),
)
def test_patch_due_delays_only_traffic_figures(sessions: int, queue: int, ready: int, since: int,
                                               refresh: int) -> None:
    wanted = {**BASE, "sessions": sessions, "queueMessages": queue, "readyReplicas": ready}
    due = conditions.patch_due(BASE, wanted, last_patch=1_000.0, now=1_000.0 + since, refresh_seconds=refresh)
    if wanted == BASE:
        assert not due
    elif ready != BASE["readyReplicas"]:
        assert due  # a change users and tools act on is never held back
    else:
        assert due is (since >= refresh)
