"""Memory per idle session and the latency of a 421 at the session cap.

Idle memory: the server's process tree (all workers; for Postfix the master and every smtpd) is read from
/proc/PID/smaps_rollup before and after N sessions have greeted, said EHLO and gone idle; the delta over N
is the cost of one idle session, as RSS and as PSS (PSS splits shared pages, which is fairer to Postfix's
forked smtpd processes).

421 latency: the relay runs with --max-sessions CAP, CAP idle sessions are held open, and probes connect
one after another and time connect() -> the 421 line. The same probes against an idle relay time
connect() -> 220 as the reference. Postfix at default_process_limit = CAP has no 421: a probe waits in the
listen backlog until an smtpd is free, which is what the table shows for it.

What it must not do: count a probe that got anything but 421 as a 421 (codes are tallied).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Sequence

from mailrelay_sandbox import proctree

from bench import client, postfix, relay, report, server, sink, stats, workdir


@dataclasses.dataclass(frozen=True)
class Config:
    idle_sessions: int = 1000  # relay
    idle_postfix: int = 200  # one smtpd process each
    cap: int = 50
    probes: int = 300
    workers: tuple[int, ...] = (2, 1)


FULL = Config()
QUICK = Config(idle_sessions=20, idle_postfix=10, cap=10, probes=20, workers=(1,))


async def idle_memory(target: server.Server, count: int) -> dict[str, float]:
    before_rss, before_pss = proctree.memory_kib(target.pids())
    held = client.IdleSessions()
    await held.open(target.port, count)
    await asyncio.sleep(1.0)
    after_rss, after_pss = proctree.memory_kib(target.pids())
    opened = len(held.writers)
    await held.close()
    return {
        "sessions": float(opened),
        "failed": float(held.failed),
        "rss_kib_per_session": (after_rss - before_rss) / max(opened, 1),
        "pss_kib_per_session": (after_pss - before_pss) / max(opened, 1),
        "rss_kib_idle_server": float(before_rss),
        "pss_kib_idle_server": float(before_pss),
    }


async def probe(port: int, count: int, limit: float) -> list[client.Outcome]:
    return [await client.greet(port, limit=limit) for _ in range(count)]


def _latency_summary(outcomes: Sequence[client.Outcome], code: int) -> dict[str, object]:
    hits = [o.latency * 1000.0 for o in outcomes if o.code == code]
    codes = collections.Counter(str(o.code or o.detail) for o in outcomes)
    return {
        "probes": len(outcomes),
        "codes": dict(codes),
        "p50_ms": stats.percentile(hits, 50),
        "p99_ms": stats.percentile(hits, 99),
        "max_ms": max(hits) if hits else float("nan"),
    }


async def cap_latency(target: server.Server, cap: int, probes: int, expect: int) -> dict[str, object]:
    unloaded = _latency_summary(await probe(target.port, probes, limit=5.0), 220)
    held = client.IdleSessions()
    await held.open(target.port, cap)
    await asyncio.sleep(0.5)
    at_cap = _latency_summary(await probe(target.port, probes, limit=2.0), expect)
    held_count = len(held.writers)
    await held.close()
    return {"held": held_count, "held_failed": held.failed, "unloaded_220": unloaded, "at_cap": at_cap}


def run(run_dir: workdir.RunDir, out: report.Report, config: Config = FULL) -> dict[str, object]:
    results: dict[str, object] = {}
    up = sink.Sink(run_dir).start()
    try:
        out.section(
            f"Memory per idle session (after EHLO; relay {config.idle_sessions} sessions, "
            f"Postfix {config.idle_postfix})"
        )
        rows = []
        memory: dict[str, dict[str, float]] = {}
        candidates: list[tuple[str, postfix.Postfix | relay.Relay]] = [
            (f"relay w{w}", relay.Relay(run_dir, up.port, workers=w, max_sessions=2 * config.idle_sessions,
                                        label=f"relay w{w} idle"))
            for w in config.workers
        ]  # fmt: skip
        candidates.append(
            ("postfix", postfix.Postfix(run_dir, up.port, config.idle_postfix + 10, label="postfix-idle"))
        )
        for name, target in candidates:
            try:
                with target:
                    count = config.idle_postfix if name == "postfix" else config.idle_sessions
                    memory[name] = asyncio.run(idle_memory(target, count))
            except (RuntimeError, TimeoutError) as error:
                out.line(f"{name}: could not run ({error})")
                continue
            m = memory[name]
            rows.append(
                [
                    name,
                    f"{m['sessions']:.0f}" + (f" ({m['failed']:.0f} failed)" if m["failed"] else ""),
                    stats.fmt(m["rss_kib_per_session"]),
                    stats.fmt(m["pss_kib_per_session"]),
                    stats.fmt(m["pss_kib_idle_server"] / 1024.0),
                ]
            )
        out.table(["server", "sessions", "RSS KiB/session", "PSS KiB/session", "idle server PSS MiB"], rows)
        if "postfix" in memory:
            for name, m in memory.items():
                if name != "postfix":
                    factor = stats.ratio(memory["postfix"]["pss_kib_per_session"], m["pss_kib_per_session"])
                    out.line(f"{name}: a Postfix idle session costs {stats.fmt_ratio(factor)} its PSS")
        results["idle_memory"] = memory

        out.section(f"Latency of the greeting at the session cap (cap {config.cap}, {config.probes} probes)")
        caps: dict[str, dict[str, object]] = {}
        rows = []
        cap_targets: list[tuple[str, postfix.Postfix | relay.Relay, int, int]] = [
            (f"relay w{w}", relay.Relay(run_dir, up.port, workers=w, max_sessions=config.cap,
                                        label=f"relay w{w} cap"), 421, config.probes)
            for w in config.workers
        ]  # fmt: skip
        cap_targets.append(
            ("postfix", postfix.Postfix(run_dir, up.port, config.cap, label="postfix-cap"), 220, 5)
        )
        for name, target, expect, count in cap_targets:
            try:
                with target:
                    caps[name] = asyncio.run(cap_latency(target, config.cap, count, expect))
            except (RuntimeError, TimeoutError) as error:
                out.line(f"{name}: could not run ({error})")
                continue
            c = caps[name]
            unloaded = c["unloaded_220"]
            at_cap = c["at_cap"]
            assert isinstance(unloaded, dict) and isinstance(at_cap, dict)
            rows.append(
                [
                    name,
                    f"{c['held']}",
                    stats.fmt(float(unloaded["p50_ms"]), 2),
                    stats.fmt(float(unloaded["p99_ms"]), 2),
                    stats.fmt(float(at_cap["p50_ms"]), 2),
                    stats.fmt(float(at_cap["p99_ms"]), 2),
                    " ".join(f"{k}:{v}" for k, v in sorted(dict(at_cap["codes"]).items())),
                ]
            )
        out.table(
            ["server", "held", "220 p50 ms", "220 p99 ms", "cap p50 ms", "cap p99 ms", "replies at cap"],
            rows,
        )
        out.line(
            "relay: 'at cap' is connect -> 421. postfix: there is no 421; a probe at the cap waits in the "
            "backlog, so its replies are TimeoutError after 2 s (a 220 once an smtpd frees up)."
        )
        results["cap_latency"] = caps
    finally:
        up.stop()
    out.record("sessions", results)
    return results
