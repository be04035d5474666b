"""The one retry schedule of the project: capped exponential backoff with subtractive jitter.

What it is for: the delay before the next try after `n` failures, for every retry loop (the relay's
delivery and its upstream gate, the operator's API client and read cache, the sandbox's load generator).
Pure: the random draw is a parameter (`rand` in [0, 1)), so every delay is reproducible in tests.

What it must not do: read a clock, draw random numbers, sleep, or know who retries what.

The schedule: the nominal delay after n >= 1 failures is `min(cap, base * factor ** (n - 1))`. Jitter
takes up to `jitter` (a fraction) off it: `delay = nominal * (1 - jitter * rand)`, so the delay lies in
`[nominal * (1 - jitter), nominal]`, never exceeds the cap, and its upper bound never decreases with n.
`jitter=0.5` is "equal jitter" (half fixed, half random), `jitter=0` no jitter. Subtracting (rather than
adding) jitter keeps the cap a true maximum while still spreading out callers that failed together.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Backoff parameters, in seconds."""

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


def nominal_delay(schedule: Schedule, attempts: int) -> float:
    """The delay before the next try without jitter, after `attempts` (>= 1) failures."""
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
    """The jittered delay before the next try; `rand` is a uniform draw in [0, 1)."""
    if not 0 <= rand < 1:
        raise ValueError("rand must be in [0, 1)")
    return nominal_delay(schedule, attempts) * (1 - schedule.jitter * rand)
