"""When a message that failed temporarily is tried again, or whether it goes to dead-letter.

What it is for: after a failed delivery attempt, either the time of the next attempt (on the shared
`mailrelay_common.backoff` schedule) or expiry. Pure: time and randomness are parameters (`now`, `rand` in
[0, 1)), so every decision is reproducible in tests.

What it must not do: read a clock, draw random numbers, sleep, or touch the spool.

Expiry: a message whose age (`now - received_at`) has reached the queue lifetime after a temporary
failure is expired. Otherwise its next attempt is clamped to the moment it expires, so the last attempt
happens at the end of its lifetime rather than the message being dead-lettered without one.
"""

from __future__ import annotations

import dataclasses

from mailrelay_common import backoff


@dataclasses.dataclass(frozen=True)
class Retry:
    """Try again at `at` (same time base as `now`)."""

    at: float


@dataclasses.dataclass(frozen=True)
class Expire:
    """The message has outlived the queue lifetime: dead-letter it."""

    age: float


Decision = Retry | Expire


def expired(*, received_at: float, now: float, queue_lifetime: float) -> bool:
    """True when a message received at `received_at` has reached the queue lifetime at `now`."""
    return now - received_at >= queue_lifetime


def after_temporary_failure(
    schedule: backoff.Schedule,
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
    at = now + backoff.delay(schedule, attempts, rand)
    return Retry(at=min(at, received_at + queue_lifetime))
