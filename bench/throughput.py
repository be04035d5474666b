"""Throughput, end to end: smtp-source -> server -> smtp-sink, Postfix against mailrelay-relay.

A run counts as done when smtp-sink has received every message (accepted AND handed on), so msg/s is
messages / (time of the last arrival at the sink - time smtp-source started). Each server gets its own
sink, a warm-up burst first, and the servers take turns within each repetition so that a noisy neighbour
hurts them alike. CPU is the server's whole process tree (Postfix: master, smtpd, cleanup, qmgr, smtp...;
the relay: every worker), per message.

What it must not do: report a rate for an incomplete run (it says "incomplete" with the count instead).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

from bench import postfix, relay, report, server, sink, source, stats, workdir


@dataclasses.dataclass(frozen=True)
class Scenario:
    size: int
    sessions: int
    messages: int
    repeats: int

    @property
    def label(self) -> str:
        kib = self.size // 1024
        return f"{kib} KiB x {self.sessions} sessions"


@dataclasses.dataclass(frozen=True)
class Sample:
    server: str
    scenario: str
    messages: int
    delivered: int
    e2e_rate: float
    accept_rate: float
    cpu_ms_per_msg: float
    note: str


FULL = (
    Scenario(size=2048, sessions=20, messages=1500, repeats=3),
    Scenario(size=2048, sessions=200, messages=1500, repeats=1),
    Scenario(size=102400, sessions=20, messages=400, repeats=1),
    Scenario(size=102400, sessions=200, messages=400, repeats=1),
)
QUICK = (Scenario(size=2048, sessions=10, messages=100, repeats=1),)


def measure(target: server.Server, upstream: sink.Sink, scenario: Scenario, warmup: int) -> Sample:
    if warmup:
        base = upstream.count
        source.run(target.port, warmup, min(scenario.sessions, 20), scenario.size, timeout=120)
        upstream.wait_for(base + warmup, timeout=60)
        upstream.wait_quiet(quiet=0.3, timeout=10)
    base = upstream.count
    cpu_before = target.cpu_seconds()
    started = time.monotonic()
    sent = source.run(target.port, scenario.messages, scenario.sessions, scenario.size, timeout=600)
    accepted_at = started + sent.seconds
    arrived = upstream.wait_for(base + scenario.messages, timeout=max(60.0, scenario.messages / 20))
    cpu = target.cpu_seconds() - cpu_before
    delivered = upstream.count - base
    note = "" if sent.returncode == 0 else f"smtp-source exit {sent.returncode}: {sent.errors}"
    if arrived is None:
        note = (note + f" incomplete: {delivered}/{scenario.messages} reached the sink").strip()
        e2e = math.nan
    else:
        e2e = stats.rate(scenario.messages, arrived - started)
    return Sample(
        server=target.name,
        scenario=scenario.label,
        messages=scenario.messages,
        delivered=delivered,
        e2e_rate=e2e,
        accept_rate=stats.rate(scenario.messages, accepted_at - started),
        cpu_ms_per_msg=1000.0 * cpu / max(delivered, 1),
        note=note,
    )


def run(
    run_dir: workdir.RunDir,
    out: report.Report,
    scenarios: Sequence[Scenario] = FULL,
    workers: Sequence[int] = (2, 1),
    warmup: int = 100,
) -> list[Sample]:
    out.section("Throughput: smtp-source -> server -> smtp-sink, end to end")
    out.line(
        "msg/s = messages / (last arrival at smtp-sink - smtp-source start); accept msg/s = until "
        "smtp-source exits; CPU = server process tree per message"
    )
    most_sessions = max(s.sessions for s in scenarios)
    samples: list[Sample] = []
    sinks: list[sink.Sink] = []
    servers: list[server.Server] = []
    stoppers: list[postfix.Postfix | relay.Relay] = []
    try:
        pf_sink = sink.Sink(run_dir).start()
        sinks.append(pf_sink)
        pf = postfix.Postfix(run_dir, pf_sink.port, process_limit=most_sessions).start()
        stoppers.append(pf)
        servers.append(pf)
        pairs: list[tuple[server.Server, sink.Sink]] = [(pf, pf_sink)]
        for count in workers:
            up = sink.Sink(run_dir).start()
            sinks.append(up)
            rl = relay.Relay(run_dir, up.port, workers=count, max_sessions=2 * most_sessions)
            stoppers.append(rl)
            try:
                rl.start()
            except (RuntimeError, TimeoutError) as error:
                out.line(f"{rl.name}: could not start ({error}); log tail: {rl.log_tail(3)}")
                continue
            pairs.append((rl, up))
        for scenario in scenarios:
            out.line("")
            out.line(f"-- {scenario.label}, {scenario.messages} messages, {scenario.repeats} run(s) each --")
            by_server: dict[str, list[Sample]] = {}
            for _ in range(scenario.repeats):
                for target, upstream in pairs:
                    sample = measure(target, upstream, scenario, warmup)
                    samples.append(sample)
                    by_server.setdefault(target.name, []).append(sample)
            _print_scenario(out, scenario, by_server)
        out.line("")
        out.line(f"cross-check: Postfix maillog status=sent {pf.sent_count()}, sink counted {pf_sink.count}")
    finally:
        for item in reversed(stoppers):
            item.stop()
        for up in sinks:
            up.stop()
    out.record("throughput", [dataclasses.asdict(s) for s in samples])
    return samples


def _print_scenario(out: report.Report, scenario: Scenario, by_server: dict[str, list[Sample]]) -> None:
    postfix_rate = stats.median([s.e2e_rate for s in by_server.get("postfix", [])])
    rows = []
    for name, runs in by_server.items():
        rates = [s.e2e_rate for s in runs]
        med = stats.median(rates)
        rows.append(
            [
                name,
                stats.fmt(med),
                " ".join(stats.fmt(r, 0) for r in rates),
                stats.fmt(stats.median([s.accept_rate for s in runs])),
                stats.fmt(stats.median([s.cpu_ms_per_msg for s in runs]), 2),
                "-" if name == "postfix" else stats.fmt_ratio(stats.ratio(med, postfix_rate)),
                "; ".join(s.note for s in runs if s.note) or "ok",
            ]
        )
    out.table(["server", "msg/s", "runs", "accept msg/s", "CPU ms/msg", "vs postfix", "notes"], rows)
