"""Pure helpers of the operator's I/O shell: the drift patch of `kube.ensure`, the retry backoff, and the
compact stabilization window kept in status.recommendations (restart safety of the policy)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailrelay_operator import kube, policy, reconcile

LIVE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {
        "name": "s",
        "labels": {"a": "1", "extra": "x"},
        "ownerReferences": [{"uid": "u1"}],
        "resourceVersion": "7",
    },
    "spec": {
        "type": "ClusterIP",
        "clusterIP": "10.0.0.1",
        "selector": {"app": "r"},
        "ports": [{"name": "smtp", "port": 25, "targetPort": "smtp", "protocol": "TCP"}],
    },
}


@pytest.mark.parametrize(
    ("desired", "keep", "create_only", "expected"),
    [
        # Nothing drifted: server-side defaults (clusterIP, protocol) and foreign labels are left alone.
        (
            {
                "kind": "Service",
                "metadata": {"labels": {"a": "1"}, "ownerReferences": [{"uid": "u1"}]},
                "spec": {
                    "selector": {"app": "r"},
                    "ports": [{"name": "smtp", "port": 25, "targetPort": "smtp"}],
                },
            },
            (),
            False,
            {},
        ),
        # A changed port: the whole list is sent (a merge patch replaces lists).
        (
            {"kind": "Service", "metadata": {}, "spec": {"ports": [{"name": "smtp", "port": 2525}]}},
            (),
            False,
            {"spec": {"ports": [{"name": "smtp", "port": 2525}]}},
        ),
        # Kept keys are never patched; labels and a missing owner are repaired even in create-only mode.
        (
            {
                "kind": "Service",
                "metadata": {"labels": {"a": "2"}, "ownerReferences": [{"uid": "u2"}]},
                "spec": {"selector": {"app": "other"}},
            },
            ("selector",),
            False,
            {"metadata": {"labels": {"a": "2"}, "ownerReferences": [{"uid": "u1"}, {"uid": "u2"}]}},
        ),
        ({"kind": "Service", "metadata": {}, "spec": {"type": "NodePort"}}, (), True, {}),
        # Top-level fields other than spec (a Secret's type, for instance).
        ({"kind": "Service", "metadata": {}, "type": "Opaque"}, (), False, {"type": "Opaque"}),
    ],
)
def test_drift_patch(
    desired: dict[str, Any], keep: tuple[str, ...], create_only: bool, expected: dict[str, Any]
) -> None:
    assert kube.drift_patch(LIVE, desired, keep=keep, create_only=create_only) == expected


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
