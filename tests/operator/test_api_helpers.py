"""Pure helpers of the operator's I/O shell: which fields the operator's server-side apply owns, the retry
backoff, and the compact stabilization window kept in status.recommendations (restart safety of the
policy)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailrelay_operator import kube, policy, reconcile


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
    body = {"status": {"recommendations": reconcile.persisted_history(history)}}
    loaded = reconcile._load_history(body, now)
    original_in_window = {r.replicas for r in history if r.at > now - window}
    loaded_in_window = {r.replicas for r in loaded if r.at > now - window}
    assert original_in_window <= loaded_in_window  # a scale-down is held at least as long
    assert loaded_in_window <= {r.replicas for r in history}  # and only by counts really recommended
    assert not [r for r in loaded if r.at > now]  # a zero scale-up window is never blocked
    assert len(loaded) == len({r.replicas for r in history})


def test_persisted_window_changes_slowly_in_a_steady_state() -> None:
    ticks = [policy.Recommendation(at=1000.0 + 5 * i, replicas=3) for i in range(5)]
    assert reconcile.persisted_history(ticks[:1]) == reconcile.persisted_history(ticks)
