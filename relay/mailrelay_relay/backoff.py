"""The retry schedule of delivery: exponential backoff with jitter, a cap, and queue-lifetime expiry.

What it is for: deciding, after a failed delivery attempt, whether a message is retried and when, or
whether it has outlived the queue lifetime and goes to dead-letter. Pure: time and randomness are
parameters (`now`, `rand` in [0, 1)), so every decision is reproducible in tests.

What it must not do: read a clock, draw random numbers, sleep, or touch the spool.

The schedule: the nominal delay before attempt n+1 (n >= 1 failed attempts so far) is
`min(cap, base * factor ** (n - 1))`. Jitter takes up to `jitter` (a fraction) off it:
`delay = nominal * (1 - jitter * rand)`, so the delay lies in `[nominal * (1 - jitter), nominal]`, never
exceeds the cap, and its upper bound never decreases with n. Subtracting (rather than adding) jitter keeps
the cap a true maximum while still spreading out messages that failed together.

Expiry: a message whose age (`now - received_at`) has reached the queue lifetime after a temporary
failure is expired. Otherwise its next attempt is clamped to the moment it expires, so the last attempt
happens at the end of its lifetime rather than the message being dead-lettered without one.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Backoff parameters, in seconds. Defaults suit a relay that drains on demand (retry_now)."""

    base: float = 1.0
    factor: float = 2.0
    cap: float = 300.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if not (self.base > 0 and math.isfinite(self.base)):
            raise ValueError("base must be a positive number of seconds")
        if not (self.factor >= 1 and math.isfinite(self.factor)):
            raise ValueError("factor must be >= 1")
        if not (self.cap >= self.base and math.isfinite(self.cap)):
            raise ValueError("cap must be >= base")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class Retry:
    """Try again at `at` (same time base as `now`)."""

    at: float


@dataclasses.dataclass(frozen=True)
class Expire:
    """The message has outlived the queue lifetime: dead-letter it."""

    age: float


Decision = Retry | Expire


def nominal_delay(schedule: Schedule, attempts: int) -> float:
    """The delay before the next attempt without jitter, after `attempts` (>= 1) failed attempts."""
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    # Compare exponents rather than computing a huge power: factor ** n overflows for large n.
    if schedule.factor == 1:
        return min(schedule.cap, schedule.base)
    limit = math.log(schedule.cap / schedule.base, schedule.factor)
    if attempts - 1 >= limit:
        return schedule.cap
    return min(schedule.cap, schedule.base * schedule.factor ** (attempts - 1))


def delay(schedule: Schedule, attempts: int, rand: float) -> float:
    """The jittered delay before the next attempt; `rand` is a uniform draw in [0, 1)."""
    if not 0 <= rand < 1:
        raise ValueError("rand must be in [0, 1)")
    return nominal_delay(schedule, attempts) * (1 - schedule.jitter * rand)


def expired(*, received_at: float, now: float, queue_lifetime: float) -> bool:
    """True when a message received at `received_at` has reached the queue lifetime at `now`."""
    return now - received_at >= queue_lifetime


def after_temporary_failure(
    schedule: Schedule,
    *,
    attempts: int,
    received_at: float,
    now: float,
    queue_lifetime: float,
    rand: float,
) -> Decision:
    """What to do after the `attempts`-th failed attempt with a temporary (4xx / connection) error."""
    if expired(received_at=received_at, now=now, queue_lifetime=queue_lifetime):
        return Expire(age=now - received_at)
    at = now + delay(schedule, attempts, rand)
    return Retry(at=min(at, received_at + queue_lifetime))
