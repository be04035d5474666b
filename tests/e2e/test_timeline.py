"""The demo's timeline: the terminal line, the flag spans and the PNG chart (matplotlib, Agg)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from mailrelay_relay import spool as relay_spool
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


def test_node_lost_flag_on_the_live_line_until_what_it_held_is_delivered() -> None:
    loss = demo.NodeLoss(t=38.0, pod="outbound-1", held=frozenset({"<a@x>", "<b@x>", "<c@x>"}))
    assert loss.live(set()) == "outbound-1 held 3, 0 delivered"
    assert loss.live({"<a@x>", "<other@x>"}) == "outbound-1 held 3, 1 delivered"
    assert loss.live({"<a@x>", "<b@x>", "<c@x>"}) == ""
    text = timeline.line(dataclasses.replace(sample(40), node_lost=loss.live({"<a@x>"})))
    assert "NODE-LOST outbound-1 held 3, 1 delivered" in text
    assert "NODE-LOST" not in timeline.line(sample(40))
    assert loss.label({"<a@x>"}) == "node lost: outbound-1 held 3, lost 2"
    assert loss.lost({"<a@x>", "<b@x>", "<c@x>"}) == 0
    assert "holding 3 accepted messages" in loss.report(set()) and "lost 3" in loss.report(set())


def test_spooled_ids_reads_a_relays_spool_with_its_own_decoder(tmp_path: Path) -> None:
    envelope = relay_spool.Envelope("a@example.org", ("b@example.net",))
    queue = tmp_path / "queue"
    queue.mkdir()

    def record(n: int) -> bytes:
        content = f"Subject: {n}\r\nMessage-ID: <{n}@spool.test>\r\n\r\nbody\r\n".encode()
        return relay_spool.encode_record(f"id{n}", envelope, content, 1.0)

    (queue / "id0.msg").write_bytes(record(0))
    (queue / "id1.msg").write_bytes(record(1) + record(2) + record(4))  # one group commit
    (queue / "id1.done").write_bytes(b"id4\n")  # delivered already
    (queue / "m3.tmp").write_bytes(b"half a rec")  # a write cut short: never answered 250
    assert demo.spooled_ids(tmp_path) == {"<0@spool.test>", "<1@spool.test>", "<2@spool.test>"}


def test_png_marks_events(tmp_path: Path) -> None:
    samples = [sample(float(i)) for i in range(30)]
    phases = [timeline.Phase(0, 30, "ramp-down")]
    plain = timeline.render_png(samples, phases, tmp_path / "plain.png", "title").read_bytes()
    marked = timeline.render_png(samples, phases, tmp_path / "marked.png", "title",
                                 events=[timeline.Event(12.0, "node lost: outbound-1 held 3, lost 0")]
                                 ).read_bytes()
    assert marked.startswith(b"\x89PNG\r\n\x1a\n") and marked != plain
