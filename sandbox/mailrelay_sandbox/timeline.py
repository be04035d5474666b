"""The demo's timeline: one sample per second, the compact terminal line, and the PNG chart.

`Sample` holds what the demo observed at one instant; `line()` formats it for the terminal (pure);
`render_png()` draws the run with matplotlib's Agg backend (no display needed). It must not observe
anything itself: the demo samples the sandbox and hands the numbers in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Sample:
    t: float                 # seconds since the load started
    desired: int             # replicas the scaler wants serving
    ready: int               # ready relays (Service endpoints)
    draining: int            # relays being drained
    sessions: int            # open SMTP sessions, summed over relays
    queue: int               # queued messages, summed over relays
    msg_per_s: float         # messages accepted (250) per second by the clients' count
    refused_per_s: float     # 421 replies per second
    resets: int              # sessions reset so far
    overloaded: bool = False
    maintenance: bool = False
    throttled: bool = False  # the upstream answers 451 (smarthost throttling)
    phase: str = ""
    node_lost: str = ""      # while a relay lost with its node is not yet delivered: what it held


@dataclasses.dataclass(frozen=True)
class Event:
    """A moment the chart marks with a line and a label (the demo's "node lost")."""

    t: float
    label: str


@dataclasses.dataclass(frozen=True)
class Phase:
    start: float
    end: float
    label: str


def line(sample: Sample) -> str:
    """One compact terminal line (about 120 columns with a flag; the live display cuts it to the width)."""
    flags = " ".join(f for f, on in (("OVERLOADED", sample.overloaded), ("MAINTENANCE", sample.maintenance),
                                     ("UPSTREAM-451", sample.throttled),
                                     (f"NODE-LOST {sample.node_lost}", bool(sample.node_lost))) if on)
    return (
        f"{sample.t:5.0f}s {sample.phase:<11.11} "
        f"replicas {sample.desired:>2} desired {sample.ready:>2} ready {sample.draining:>2} draining | "
        f"sessions {sample.sessions:>3} | {sample.msg_per_s:5.0f} msg/s | "
        f"421/s {sample.refused_per_s:4.0f} | "
        f"queue {sample.queue:>4} | resets {sample.resets:>3} {flags}"
    ).rstrip()


def runs(samples: Sequence[Sample], attribute: str) -> list[tuple[float, float]]:
    """Contiguous time spans where a flag of the samples is set (pure)."""
    spans: list[tuple[float, float]] = []
    start: float | None = None
    previous = 0.0
    for sample in samples:
        on = bool(getattr(sample, attribute))
        if on and start is None:
            start = sample.t - 0.5
        elif not on and start is not None:
            spans.append((start, previous + 0.5))
            start = None
        previous = sample.t
    if start is not None:
        spans.append((start, previous + 0.5))
    return spans


def render_png(samples: Sequence[Sample], phases: Sequence[Phase], path: Path, title: str,
               footer: str = "", events: Sequence[Event] = ()) -> Path:
    """Draw replicas, sessions/queue and msg/s / 421/s over time, with the scenario's phases shaded.

    Red bands: Overloaded; blue: maintenance; yellow: the upstream answers 451. Each event is a dashed
    vertical line, labelled on the relays' panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True,
                             gridspec_kw={"height_ratios": [1.1, 1, 1]})
    replicas, load, rates = axes
    shades = ["#f2f2f2", "#ffffff"]
    for index, phase in enumerate(phases):
        for ax in axes:
            ax.axvspan(phase.start, phase.end, color=shades[index % 2], zorder=0)
        replicas.text((phase.start + phase.end) / 2, 1.02, phase.label,
                      transform=replicas.get_xaxis_transform(), ha="center", va="bottom", fontsize=9,
                      color="#444444")
    bands = (("overloaded", "#fde0dc"), ("maintenance", "#dce6f7"), ("throttled", "#fff2c6"))
    for attribute, color in bands:
        for start, end in runs(samples, attribute):
            for ax in axes:
                ax.axvspan(start, end, color=color, zorder=0.5, lw=0)

    for event in events:
        for ax in axes:
            ax.axvline(event.t, color="#b22222", lw=1.2, ls="--", zorder=3)
        replicas.text(event.t, 0.96, " " + event.label, transform=replicas.get_xaxis_transform(), ha="left",
                      va="top", fontsize=8, color="#b22222")

    replicas.step(t, [s.desired for s in samples], where="post", label="desired", color="#1f77b4", lw=2)
    replicas.step(t, [s.ready for s in samples], where="post", label="ready", color="#2ca02c", lw=2)
    replicas.step(t, [s.draining for s in samples], where="post", label="draining", color="#ff7f0e", lw=2)
    replicas.set_ylabel("relays")
    replicas.set_ylim(bottom=0, top=max([s.desired for s in samples] + [s.ready for s in samples] + [1]) + 1)
    replicas.legend(loc="upper left", fontsize=8, ncol=3)
    replicas.set_title(title, pad=22)

    load.plot(t, [s.sessions for s in samples], label="open sessions", color="#9467bd", lw=1.6)
    load.set_ylabel("sessions")
    queue_ax = load.twinx()
    queue_ax.plot(t, [s.queue for s in samples], label="queued messages", color="#8c564b", lw=1.2, ls="--")
    queue_ax.set_ylabel("queue")
    queue_ax.set_ylim(bottom=0)
    load.set_ylim(bottom=0)
    handles = load.get_legend_handles_labels()[0] + queue_ax.get_legend_handles_labels()[0]
    labels = load.get_legend_handles_labels()[1] + queue_ax.get_legend_handles_labels()[1]
    load.legend(handles, labels, loc="upper left", fontsize=8)

    rates.plot(t, [s.msg_per_s for s in samples], label="accepted msg/s", color="#2ca02c", lw=1.6)
    rates.plot(t, [s.refused_per_s for s in samples], label="421/s (shed, retried)", color="#d62728", lw=1.4)
    rates.set_ylabel("per second")
    rates.set_xlabel("seconds")
    rates.set_ylim(bottom=0)
    resets_ax = rates.twinx()
    resets_ax.step(t, [s.resets for s in samples], where="post", label="sessions reset (total)",
                   color="#000000", lw=1.2, ls=":")
    resets_ax.set_ylabel("resets")
    resets_ax.set_ylim(bottom=0, top=max([s.resets for s in samples] + [1]) * 1.2)
    handles = rates.get_legend_handles_labels()[0] + resets_ax.get_legend_handles_labels()[0]
    labels = rates.get_legend_handles_labels()[1] + resets_ax.get_legend_handles_labels()[1]
    rates.legend(handles, labels, loc="upper right", fontsize=8)
    if t:
        rates.set_xlim(0, max(t))
    if footer:
        fig.text(0.5, 0.01, footer, ha="center", fontsize=10, family="monospace")
    fig.tight_layout(rect=(0, 0.03 if footer else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
