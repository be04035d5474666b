"""The shared retry schedule: a table of known delays, one row per caller's parameters, and hypothesis
properties (monotone upper bound, cap, jitter range)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailrelay_common import backoff

S = backoff.Schedule(base=1.0, factor=2.0, cap=300.0, jitter=0.25)


@pytest.mark.parametrize(
    ("attempts", "nominal"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (8, 128.0), (9, 256.0), (10, 300.0), (11, 300.0), (10_000, 300.0)],
)
def test_nominal_delay_table(attempts: int, nominal: float) -> None:
    assert backoff.nominal_delay(S, attempts) == nominal
    assert backoff.delay(S, attempts, 0.0) == nominal
    assert backoff.delay(S, attempts, 0.5) == pytest.approx(nominal * 0.875)


# Each caller's schedule: (schedule, failures, rand) -> delay. The relay's delivery, the relay's upstream
# gate, the operator's API client (half jittered), its read cache's relists (no jitter), the load generator.
@pytest.mark.parametrize(
    ("schedule", "attempts", "rand", "expected"),
    [
        (backoff.Schedule(), 1, 0.0, 1.0),
        (backoff.Schedule(base=0.1, factor=2.0, cap=5.0, jitter=0.25), 4, 0.0, 0.8),
        (backoff.Schedule(base=0.1, factor=2.0, cap=5.0, jitter=0.25), 4, 0.5, 0.7),
        (backoff.Schedule(base=0.2, factor=2.0, cap=5.0, jitter=0.5), 1, 0.5, 0.15),
        (backoff.Schedule(base=0.2, factor=2.0, cap=5.0, jitter=0.5), 6, 0.999, 2.5025),
        (backoff.Schedule(base=1.0, factor=2.0, cap=30.0, jitter=0.0), 5, 0.9, 16.0),
        (backoff.Schedule(base=1.0, factor=2.0, cap=30.0, jitter=0.0), 6, 0.9, 30.0),
        (backoff.Schedule(base=0.4, factor=2.0, cap=3.0, jitter=0.5), 3, 0.0, 1.6),
        (backoff.Schedule(base=0.4, factor=2.0, cap=3.0, jitter=0.5), 4, 0.0, 3.0),
    ],
)
def test_delay_table(schedule: backoff.Schedule, attempts: int, rand: float, expected: float) -> None:
    assert backoff.delay(schedule, attempts, rand) == pytest.approx(expected)


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
