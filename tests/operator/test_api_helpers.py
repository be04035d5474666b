"""Pure helpers of the operator's I/O shell: which fields the operator's server-side apply owns, the retry
backoff, and the compact stabilization window kept in status.recommendations (restart safety of the
policy)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailrelay_operator import kube, policy, status


def managed(*entries: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
    return {"metadata": {"managedFields": [
        {"manager": m, "operation": op, "fieldsType": "FieldsV1", "fieldsV1": fields}
        for m, op, fields in entries
    ]}}


REPLICAS = {"f:spec": {"f:replicas": {}, "f:template": {}}}


@pytest.mark.parametrize(
    ("obj", "path", "owned"),
    [
        (managed(("mailrelay-operator", "Apply", REPLICAS)), ("spec", "replicas"), True),
        (managed(("mailrelay-operator", "Apply", REPLICAS)), ("spec", "template"), True),
        (managed(("mailrelay-operator", "Apply", REPLICAS)), ("spec", "selector"), False),
        # the scaling loop's merge patches are an Update entry of the same manager name: not the apply's
        (managed(("mailrelay-operator", "Update", REPLICAS)), ("spec", "replicas"), False),
        (managed(("kubectl", "Apply", REPLICAS)), ("spec", "replicas"), False),
        (managed(("kubectl", "Apply", REPLICAS), ("mailrelay-operator", "Apply", {"f:spec": {}})),
         ("spec", "replicas"), False),
        ({"metadata": {}}, ("spec", "replicas"), False),
        (managed(("mailrelay-operator", "Apply", {"f:spec": {"f:replicas": 3}})),
         ("spec", "replicas"), False),
    ],
)
def test_manager_owns(obj: dict[str, Any], path: tuple[str, ...], owned: bool) -> None:
    assert kube.manager_owns(obj, path) is owned


SERVICE: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Service",
    "metadata": {"name": "s", "namespace": "n", "labels": {"a": "1"}},
    "spec": {"selector": {"app": "r"}, "ports": [{"name": "smtp", "port": 25, "targetPort": "smtp"}]},
}


def live_of(applied: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """What the server would hold after `applied`: its defaults and others' fields added."""
    live = copy.deepcopy(applied)
    live["metadata"]["labels"]["someone-else"] = "x"
    live["metadata"]["resourceVersion"] = "7"
    live["spec"]["clusterIP"] = "10.96.0.9"
    live["spec"]["ports"][0]["protocol"] = "TCP"
    live["spec"].update(changes)
    return live


def test_an_apply_that_would_change_nothing_is_known() -> None:
    applied = kube.with_applied_digest(SERVICE)
    assert kube.already_applied(live_of(applied), applied)
    # the same desired object gets the same digest; another one another
    assert kube.with_applied_digest(SERVICE) == applied
    other = kube.with_applied_digest({**SERVICE, "spec": {**SERVICE["spec"], "selector": {"app": "q"}}})
    assert not kube.already_applied(live_of(applied), other)        # a field we now set differently
    dropped = kube.with_applied_digest({**SERVICE, "metadata": {"name": "s", "namespace": "n"}})
    assert not kube.already_applied(live_of(applied), dropped)      # a field we stopped setting
    drifted = live_of(applied, ports=[{"name": "smtp", "port": 2500, "targetPort": "smtp"}])
    assert not kube.already_applied(drifted, applied)               # someone changed a field we own
    assert not kube.already_applied(live_of(SERVICE), applied)      # applied before digests existed
    # a resourceVersion precondition is not content: the digest is the same with one
    with_version = {**SERVICE, "metadata": {**SERVICE["metadata"], "resourceVersion": "41"}}
    assert kube.with_applied_digest(with_version)["metadata"]["annotations"] == \
        applied["metadata"]["annotations"]


@pytest.mark.parametrize(
    ("live", "desired", "held"),
    [
        ({"a": 1, "b": 2}, {"a": 1}, True),
        ({"a": 1}, {"a": 1, "b": 2}, False),
        ({"l": [{"x": 1, "y": 2}]}, {"l": [{"x": 1}]}, True),
        ({"l": [{"x": 1}, {"x": 2}]}, {"l": [{"x": 1}]}, False),   # lists: same length
        ({"a": "1"}, {"a": 1}, False),
        ({"a": {"b": None}}, {"a": {"b": None}}, True),
    ],
)
def test_contains(live: Any, desired: Any, held: bool) -> None:
    assert kube.contains(live, desired) is held


@given(st.integers(min_value=1, max_value=20))
def test_backoff_is_bounded_and_grows(attempt: int) -> None:
    retry = kube.RetryPolicy(base_delay=0.2, max_delay=5.0)
    ceiling = min(5.0, 0.2 * 2 ** (attempt - 1))
    assert ceiling / 2 <= retry.delay(attempt) <= ceiling


histories = st.lists(
    st.builds(
        policy.Recommendation,
        at=st.floats(min_value=0, max_value=10_000, allow_nan=False),
        replicas=st.integers(min_value=0, max_value=50),
    ),
    max_size=30,
)


@given(histories, st.floats(min_value=0, max_value=2_000), st.floats(min_value=0, max_value=100))
def test_persisted_window_is_never_shorter_and_never_blocks_scale_up(
    history: list[policy.Recommendation],
    window: float,
    later: float,
) -> None:
    now = max((r.at for r in history), default=0.0) + later
    body = {"status": {"recommendations": status.persisted_history(history)}}
    loaded = status.load_history(body, now)
    original_in_window = {r.replicas for r in history if r.at > now - window}
    loaded_in_window = {r.replicas for r in loaded if r.at > now - window}
    assert original_in_window <= loaded_in_window  # a scale-down is held at least as long
    assert loaded_in_window <= {r.replicas for r in history}  # and only by counts really recommended
    assert not [r for r in loaded if r.at > now]  # a zero scale-up window is never blocked
    assert len(loaded) == len({r.replicas for r in history})


def test_persisted_window_changes_slowly_in_a_steady_state() -> None:
    ticks = [policy.Recommendation(at=1000.0 + 5 * i, replicas=3) for i in range(5)]
    assert status.persisted_history(ticks[:1]) == status.persisted_history(ticks)
