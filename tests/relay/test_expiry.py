"""When a message that failed temporarily is tried again or expires: a table, and the hypothesis property
that no retry is scheduled past the queue lifetime."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailrelay_common import backoff
from mailrelay_relay import expiry

S = backoff.Schedule(base=1.0, factor=2.0, cap=300.0, jitter=0.25)


@pytest.mark.parametrize(
    ("received_at", "now", "lifetime", "expected"),
    [
        (0.0, 10.0, 100.0, expiry.Retry(at=10.0 + 4.0)),  # attempts=3 below
        (0.0, 99.0, 100.0, expiry.Retry(at=100.0)),  # clamped to the end of the lifetime
        (0.0, 100.0, 100.0, expiry.Expire(age=100.0)),
        (50.0, 500.0, 100.0, expiry.Expire(age=450.0)),
    ],
)
def test_after_temporary_failure_table(
    received_at: float, now: float, lifetime: float, expected: expiry.Decision
) -> None:
    got = expiry.after_temporary_failure(
        S, attempts=3, received_at=received_at, now=now, queue_lifetime=lifetime, rand=0.0
    )
    assert got == expected


schedules = st.builds(
    backoff.Schedule,
    base=st.floats(0.001, 100.0),
    factor=st.floats(1.0, 10.0),
    cap=st.floats(100.0, 100_000.0),
    jitter=st.floats(0.0, 0.99),
)
rands = st.floats(0.0, 1.0, exclude_max=True)


@given(
    s=schedules,
    n=st.integers(1, 100),
    r=rands,
    received_at=st.floats(0, 1e9),
    age=st.floats(0, 1e7),
    lifetime=st.floats(0.001, 1e7),
)
def test_decision_never_schedules_past_expiry(
    s: backoff.Schedule, n: int, r: float, received_at: float, age: float, lifetime: float
) -> None:
    now = received_at + age
    decision = expiry.after_temporary_failure(
        s, attempts=n, received_at=received_at, now=now, queue_lifetime=lifetime, rand=r
    )
    if now - received_at >= lifetime:
        assert isinstance(decision, expiry.Expire)
    else:
        assert isinstance(decision, expiry.Retry)
        assert now <= decision.at <= received_at + lifetime
        # (now + delay) - now may exceed delay by float rounding at large `now`: allow ulps, not seconds.
        assert decision.at - now <= s.cap + 1e-9 * max(1.0, abs(now))
