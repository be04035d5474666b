"""Overload: 4x the session cap offered to the relay and to Postfix, against a run at the cap.

Clients are closed loops on one asyncio loop (uvloop when installed): connect, send one 2 KiB message, QUIT,
again. A client that gets a 421 waits RETRY seconds (an MTA would wait minutes; a short wait keeps the
offered load at 4x for the whole window) and connects again. The reference run offers exactly CAP
clients: the server's peak with nothing refused, and the unloaded latency of a session. Postfix runs with
default_process_limit = CAP, so its extra connections wait in the listen backlog instead of getting 421.

Figures: goodput (messages answered 250 per second, client side, within the window) under overload
against the reference; p99 of connect -> 421; p50/p99 of connect -> 250 after DATA for accepted sessions,
overload against the reference; sessions that ended in an error (reset, timeout).

What it must not do: count a message as goodput unless its DATA got 250.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time

from bench import client, postfix, relay, report, server, sink, stats, workdir


@dataclasses.dataclass(frozen=True)
class Config:
    cap: int = 50
    factor: int = 4
    seconds: float = 8.0
    size: int = 2048
    retry: float = 0.1
    workers: int = 2


FULL = Config()
QUICK = Config(cap=5, seconds=1.5, workers=1)


@dataclasses.dataclass(frozen=True)
class Phase:
    clients: int
    seconds: float
    accepted: int
    refused: int
    rejected: int
    errors: int
    goodput: float
    accepted_p50_ms: float
    accepted_p99_ms: float
    refused_p50_ms: float
    refused_p99_ms: float
    details: dict[str, int]


async def drive(port: int, clients: int, seconds: float, size: int, retry: float) -> Phase:
    payload = client.message(size)
    outcomes: list[client.Outcome] = []
    started = time.monotonic()
    deadline = started + seconds

    async def loop() -> None:
        while time.monotonic() < deadline:
            outcome = await client.send_one(port, payload, limit=30.0)
            if time.monotonic() <= deadline:
                outcomes.append(outcome)
            if outcome.kind != "accepted":
                await asyncio.sleep(retry)

    tasks = [asyncio.create_task(loop()) for _ in range(clients)]
    await asyncio.sleep(seconds)
    # Sessions still in flight at the deadline do not count; give them a moment to finish cleanly.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=35)
    accepted = [o.latency * 1000 for o in outcomes if o.kind == "accepted"]
    refused = [o.latency * 1000 for o in outcomes if o.kind == "refused"]
    details = collections.Counter(f"{o.kind}:{o.code or o.detail}" for o in outcomes if o.kind != "accepted")
    return Phase(
        clients=clients,
        seconds=seconds,
        accepted=len(accepted),
        refused=len(refused),
        rejected=sum(1 for o in outcomes if o.kind == "rejected"),
        errors=sum(1 for o in outcomes if o.kind == "error"),
        goodput=stats.rate(len(accepted), seconds),
        accepted_p50_ms=stats.percentile(accepted, 50),
        accepted_p99_ms=stats.percentile(accepted, 99),
        refused_p50_ms=stats.percentile(refused, 50),
        refused_p99_ms=stats.percentile(refused, 99),
        details=dict(details),
    )


def _event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(run_dir: workdir.RunDir, out: report.Report, config: Config = FULL) -> dict[str, object]:
    _event_loop_policy()
    offered = config.cap * config.factor
    out.section(
        f"Overload: {offered} clients ({config.factor}x the cap of {config.cap}) against {config.cap} "
        f"clients, {config.seconds:.0f} s each, {config.size // 1024} KiB"
    )
    results: dict[str, object] = {}
    rows = []
    up = sink.Sink(run_dir).start()
    try:
        targets: list[tuple[str, postfix.Postfix | relay.Relay]] = [
            (f"relay w{config.workers}", relay.Relay(run_dir, up.port, workers=config.workers,
                                                    max_sessions=config.cap, label="relay overload")),
            ("postfix", postfix.Postfix(run_dir, up.port, config.cap, label="postfix-overload")),
        ]  # fmt: skip
        for name, target in targets:
            try:
                with target:
                    phases = _measure(target, config, offered)
            except (RuntimeError, TimeoutError) as error:
                out.line(f"{name}: could not run ({error})")
                continue
            reference, loaded = phases
            results[name] = {
                "reference": dataclasses.asdict(reference),
                "overload": dataclasses.asdict(loaded),
            }
            rows.append(
                [
                    name,
                    stats.fmt(reference.goodput),
                    stats.fmt(loaded.goodput),
                    stats.fmt_ratio(stats.ratio(loaded.goodput, reference.goodput)),
                    f"{stats.fmt(reference.accepted_p99_ms)} / {stats.fmt(loaded.accepted_p99_ms)}",
                    stats.fmt_ratio(stats.ratio(loaded.accepted_p99_ms, reference.accepted_p99_ms)),
                    f"{loaded.refused} / {stats.fmt(loaded.refused_p50_ms, 2)}"
                    f" / {stats.fmt(loaded.refused_p99_ms, 2)}",
                    str(reference.errors + loaded.errors),
                ]
            )
        out.table(
            ["server", "peak msg/s", "overload msg/s", "goodput/peak", "accepted p99 ms (peak/over)",
             "p99 ratio", "421s / p50 ms / p99 ms", "errors"],
            rows,
        )  # fmt: skip
        for name, value in results.items():
            assert isinstance(value, dict)
            details = value["overload"]["details"]
            if details:
                out.line(f"{name} overload, non-accepted sessions: {details}")
    finally:
        up.stop()
    out.record("overload", results)
    return results


def _measure(target: server.Server, config: Config, offered: int) -> tuple[Phase, Phase]:
    async def both() -> tuple[Phase, Phase]:
        # A short warm-up so that Postfix has its smtpd processes and the relay its upstream pool.
        await drive(target.port, config.cap, min(1.0, config.seconds), config.size, config.retry)
        reference = await drive(target.port, config.cap, config.seconds, config.size, config.retry)
        loaded = await drive(target.port, offered, config.seconds, config.size, config.retry)
        return reference, loaded

    return asyncio.run(both())
