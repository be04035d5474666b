"""Pure arithmetic for the benchmark: percentiles, rates, ratios and their formatting.

What it must not do: any I/O or clock read; every input is a number or a sequence of numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100) of `values`; NaN for an empty sequence."""
    if not values:
        return math.nan
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"percentile out of range: {pct}")
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    """The median (mean of the two middle values for an even count); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2.0


def rate(count: int, seconds: float) -> float:
    """Events per second; NaN when no time passed."""
    if seconds <= 0.0:
        return math.nan
    return count / seconds


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs, NaN when either is missing or theirs is zero."""
    if math.isnan(ours) or math.isnan(theirs) or theirs == 0.0:
        return math.nan
    return ours / theirs


def fmt(value: float, digits: int = 1) -> str:
    """A number for a table; "n/a" for NaN."""
    if math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}"


def fmt_ratio(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def parse_sink_counter(text: str) -> int | None:
    """The message count from one `smtp-sink -c` status line ("sess=3 quit=3 mesg=3"), else None."""
    for field in text.split():
        key, _, value = field.partition("=")
        if key == "mesg" and value.isdigit():
            return int(value)
    return None
