"""The pure retry schedule: table of known delays, and hypothesis properties (monotone upper bound, cap,
jitter range, expiry clamping)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailrelay_relay import backoff

S = backoff.Schedule(base=1.0, factor=2.0, cap=300.0, jitter=0.25)


@pytest.mark.parametrize(
    ("attempts", "nominal"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (8, 128.0), (9, 256.0), (10, 300.0), (11, 300.0), (10_000, 300.0)],
)
def test_nominal_delay_table(attempts: int, nominal: float) -> None:
    assert backoff.nominal_delay(S, attempts) == nominal
    assert backoff.delay(S, attempts, 0.0) == nominal
    assert backoff.delay(S, attempts, 0.5) == pytest.approx(nominal * 0.875)


@pytest.mark.parametrize(
    ("received_at", "now", "lifetime", "expected"),
    [
        (0.0, 10.0, 100.0, backoff.Retry(at=10.0 + 4.0)),  # attempts=3 below
        (0.0, 99.0, 100.0, backoff.Retry(at=100.0)),  # clamped to the end of the lifetime
        (0.0, 100.0, 100.0, backoff.Expire(age=100.0)),
        (50.0, 500.0, 100.0, backoff.Expire(age=450.0)),
    ],
)
def test_after_temporary_failure_table(
    received_at: float, now: float, lifetime: float, expected: backoff.Decision
) -> None:
    got = backoff.after_temporary_failure(
        S, attempts=3, received_at=received_at, now=now, queue_lifetime=lifetime, rand=0.0
    )
    assert got == expected


@pytest.mark.parametrize(
    "kwargs",
    [{"base": 0.0}, {"base": -1.0}, {"factor": 0.5}, {"cap": 0.5}, {"jitter": 1.0}, {"jitter": -0.1},
     {"base": float("inf")}],
)
def test_invalid_schedules_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        backoff.Schedule(**kwargs)


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        backoff.nominal_delay(S, 0)
    with pytest.raises(ValueError):
        backoff.delay(S, 1, 1.0)


schedules = st.builds(
    backoff.Schedule,
    base=st.floats(0.001, 100.0),
    factor=st.floats(1.0, 10.0),
    cap=st.floats(100.0, 100_000.0),
    jitter=st.floats(0.0, 0.99),
)
rands = st.floats(0.0, 1.0, exclude_max=True)


@given(s=schedules, n=st.integers(1, 5000), r=rands)
def test_delay_is_within_jitter_range_and_cap(s: backoff.Schedule, n: int, r: float) -> None:
    nominal = backoff.nominal_delay(s, n)
    d = backoff.delay(s, n, r)
    assert 0 < d <= nominal <= s.cap
    assert d >= nominal * (1 - s.jitter) * (1 - 1e-12)


@given(s=schedules, n=st.integers(1, 5000))
def test_upper_bound_is_monotone(s: backoff.Schedule, n: int) -> None:
    assert backoff.nominal_delay(s, n) <= backoff.nominal_delay(s, n + 1)
    assert backoff.nominal_delay(s, 1) == pytest.approx(min(s.base, s.cap))


@given(s=schedules, n=st.integers(1, 200))
def test_cap_is_reached(s: backoff.Schedule, n: int) -> None:
    # With factor > 1 every schedule reaches the cap eventually; with factor == 1 it stays at base.
    if s.factor > 1.0001:
        assert backoff.nominal_delay(s, 100_000) == s.cap


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
    decision = backoff.after_temporary_failure(
        s, attempts=n, received_at=received_at, now=now, queue_lifetime=lifetime, rand=r
    )
    if now - received_at >= lifetime:
        assert isinstance(decision, backoff.Expire)
    else:
        assert isinstance(decision, backoff.Retry)
        assert now <= decision.at <= received_at + lifetime
        # (now + delay) - now may exceed delay by float rounding at large `now`: allow ulps, not seconds.
        assert decision.at - now <= s.cap + 1e-9 * max(1.0, abs(now))
