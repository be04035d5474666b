"""The parts of issue 6 §1 that wait on other parts of the project. Each prints "not yet measured" with
what it will measure and what it waits for, so `python -m bench` shows the gap instead of a number.

What it must not do: print a figure. When a part lands, replace its hook here with a real module.
"""

from __future__ import annotations

from bench import report


def scale_in(out: report.Report) -> None:
    out.pending(
        "scale_in",
        "Scale-in under steady load (issue 6 §1.3)",
        "will compare sessions reset and messages at risk when a pod is removed under steady load, the "
        "operator's drain against the Demo issue's naive scale-in (`make demo-compare`); waits for a "
        "scenario API in mailrelay_sandbox that returns those counts",
    )


def operator(out: report.Report) -> None:
    out.pending(
        "operator",
        "The operator: reaction time and footprint (issue 6 §1.4)",
        "will measure the time from load crossing the scale-up threshold to the new replica count, and "
        "from a scale-in decision to the drained pod's deletion, plus the operator's RSS and CPU at idle "
        "and while reconciling; waits for the Operator issue's standalone run against the emulated API",
    )
