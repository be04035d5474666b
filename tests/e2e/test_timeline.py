"""The demo's timeline: the terminal line, the flag spans and the PNG chart (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mailrelay_sandbox import demo, loadgen, timeline


def sample(t: float, **flags: bool) -> timeline.Sample:
    return timeline.Sample(t=t, desired=3, ready=2, draining=1, sessions=17, queue=42, msg_per_s=93.4,
                           refused_per_s=12.0, resets=0, phase="overload", **flags)


def test_line_is_compact_and_shows_every_figure() -> None:
    text = timeline.line(sample(58, overloaded=True))
    assert len(text) <= 140
    for part in ("58s", "overload", " 3 desired", " 2 ready", " 1 draining", "sessions  17", "93 msg/s",
                 "421/s   12", "queue   42", "OVERLOADED"):
        assert part in text, part
    assert "MAINTENANCE" not in text


@pytest.mark.parametrize(
    ("flags", "spans"),
    [
        ([False, False, False], []),
        ([True, True, False, False], [(-0.5, 1.5)]),
        ([False, True, False, True], [(0.5, 1.5), (2.5, 3.5)]),
        ([False, False, True], [(1.5, 2.5)]),
    ],
)
def test_runs(flags: list[bool], spans: list[tuple[float, float]]) -> None:
    samples = [sample(float(i), overloaded=on) for i, on in enumerate(flags)]
    assert timeline.runs(samples, "overloaded") == spans


def test_png_is_written(tmp_path: Path) -> None:
    samples = [sample(float(i), overloaded=20 <= i < 30, maintenance=40 <= i < 45, throttled=i > 50)
               for i in range(60)]
    phases = [timeline.Phase(0, 20, "ramp-up"), timeline.Phase(20, 60, "overload")]
    path = timeline.render_png(samples, phases, tmp_path / "chart.png", "title", footer="footer")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 20_000


def test_summary_and_comparison_text() -> None:
    summary = loadgen.Summary(sent=10, accepted=9, delivered=9, lost=0, sessions_reset=0, unsent=1,
                              rejected=0)
    assert demo.summary_line(summary) == "sent 10 / accepted 9 / delivered 9 / lost 0 / sessions reset 0"
    assert "2 messages" in demo.held_line(summary)
    naive = loadgen.Summary(sent=10, accepted=10, delivered=7, lost=3, sessions_reset=2, unsent=0,
                            rejected=0)
    table = demo.comparison(demo.RunResult("operator", summary, [], []),
                            demo.RunResult("naive", naive, [], []))
    lost_row = next(row for row in table.splitlines() if row.startswith("lost"))
    assert lost_row.split()[-2:] == ["0", "3"]
