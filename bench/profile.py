"""Where the relay's time goes under the throughput load (2 KiB by default, 20 sessions, --workers 2).

py-spy samples every relay process (`record --subprocesses --threads --nonblocking`, so the relay is never
paused) while smtp-source sends; the raw collapsed stacks are kept in out/bench/profile-relay-<size>k.txt
(load them into speedscope or flamegraph.pl). Alongside: each process's CPU use over the window (busy or
waiting?), the relay's own histograms from /metrics (fsync time per group commit, messages per commit,
time from 250 to the upstream's 250), and the anatomy of a session (median time of each SMTP phase,
relay against Postfix, from a client that timestamps every reply).

What it must not do: change the relay (it profiles the process as a user runs it).
"""

from __future__ import annotations

import asyncio
import collections
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

from mailrelay_sandbox import proctree

from bench import client, commit, postfix, relay, report, server, sink, source, stats, workdir

# Leaf-frame categories, first match wins (function name and file as py-spy prints them).
# Leaf frames of a pool thread waiting for work: idle, though py-spy samples them (they wait on a lock).
IDLE = r"^\[[^]]*\] (_worker \(concurrent/futures/thread\.py|Condition\.wait \(threading\.py)"

# Frames of the spool's commit thread (one file per group) and of the removal thread after delivery.
COMMIT_FRAMES = r"_commit_group|_write_all"
REMOVAL_FRAMES = r"_remove_batch|Spool\.remove|_leave_shared|_unlink_quietly"

CATEGORIES = (
    ("spool commit: create, write, fdatasync, rename the group's file", COMMIT_FRAMES),
    ("spool commit: fsync of the queue directory", r"_fsync_dir"),
    ("spool: removal after delivery (unlink, .done list)", REMOVAL_FRAMES),
    ("spool: encode the record (its CRC in the commit thread)", r"Spool\.store|encode_record|encode_header"),
    ("delivery: aiosmtplib client", r"aiosmtplib/"),
    ("metrics: prometheus_client (multiprocess mmap)", r"prometheus_client/"),
    ("logging", r"logging/|mailrelay_relay/logs\.py"),
    ("SMTP session (relay smtp.py/policy.py)", r"mailrelay_relay/(smtp|policy)\.py"),
    ("pod state (shared counters, locks)", r"podstate\.py|multiprocessing/synchronize"),
    ("thread pool hand-off", r"concurrent/futures|threading\.py"),
    ("asyncio machinery", r"asyncio/"),
)


def spy_path() -> str | None:
    local = pathlib.Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def parse(
    path: pathlib.Path,
) -> tuple[int, collections.Counter[str], collections.Counter[str], dict[str, int]]:
    """(total samples, leaf-frame counts, inclusive frame counts, samples per thread kind)."""
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        kind = "event loop"
        if "Thread._bootstrap" in stack:
            kind = "other threads"
            if re.search(COMMIT_FRAMES, stack):
                kind = "spool commit thread"
            elif re.search(REMOVAL_FRAMES, stack):
                kind = "spool removal thread"
        name = f"[{kind}] {frames[-1]}"
        if re.search(IDLE, name):
            kind = "idle pool threads"
        threads[kind] += count
        if kind == "idle pool threads":
            continue
        leaf[name] += count
        for frame in set(frames):
            inclusive[frame] += count
    return total, leaf, inclusive, dict(threads)


def categorise(leaf: collections.Counter[str]) -> collections.Counter[str]:
    out: collections.Counter[str] = collections.Counter()
    for frame, count in leaf.items():
        for name, pattern in CATEGORIES:
            if re.search(pattern, frame):
                out[name] += count
                break
        else:
            out["other"] += count
    return out


def scrape(port: int) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


async def _anatomy(port: int, sessions: int, seconds: float) -> dict[str, float]:
    """p50 milliseconds of each SMTP phase over closed-loop sessions (one message each)."""
    payload = client.message(2048)
    marks: list[list[float]] = []
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        while time.monotonic() < deadline:
            got: list[float] = []
            outcome = await client.send_one(port, payload, marks=got)
            if outcome.kind == "accepted" and len(got) == len(client.PHASES):
                marks.append(got)

    await asyncio.gather(*(loop() for _ in range(sessions)))
    columns = list(zip(*marks, strict=False)) if marks else [() for _ in client.PHASES]
    result = {name: 1000 * stats.median(list(col)) for name, col in zip(client.PHASES, columns, strict=False)}
    result["sessions measured"] = float(len(marks))
    return result


def anatomy(run_dir: workdir.RunDir, out: report.Report, seconds: float = 5.0) -> dict[str, object]:
    """Median time of each phase of a session, relay against Postfix, with 20 sessions in parallel."""
    out.line("")
    out.line(f"Anatomy of a session under load (20 closed-loop sessions, 2 KiB, {seconds:.0f} s, median ms):")
    up = sink.Sink(run_dir).start()
    found: dict[str, dict[str, float]] = {}
    try:
        targets: list[tuple[str, postfix.Postfix | relay.Relay]] = [
            ("relay w2", relay.Relay(run_dir, up.port, workers=2, label="relay anatomy")),
            ("postfix", postfix.Postfix(run_dir, up.port, 100, label="postfix-anatomy")),
        ]
        for name, target in targets:
            try:
                with target:
                    found[name] = asyncio.run(_phases(target, seconds))
            except (RuntimeError, TimeoutError) as error:
                out.line(f"{name}: could not run ({error})")
    finally:
        up.stop()
    names = list(found)
    rows = [
        [phase, *(stats.fmt(found[n].get(phase, float("nan")), 2) for n in names)] for phase in client.PHASES
    ]
    rows.append(["sessions measured", *(f"{found[n]['sessions measured']:.0f}" for n in names)])
    out.table(["phase", *names], rows)
    return {"anatomy": found}


async def _phases(target: server.Server, seconds: float) -> dict[str, float]:
    await _anatomy(target.port, 20, 1.0)  # warm-up
    return await _anatomy(target.port, 20, seconds)


def run(
    run_dir: workdir.RunDir,
    out: report.Report,
    messages: int = 3000,
    workers: int = 2,
    size: int = 2048,
    with_anatomy: bool = True,
) -> dict[str, object]:
    kib = size // 1024
    out.section(f"Profile: relay --workers {workers}, {kib} KiB x 20 sessions, {messages} messages (py-spy)")
    spy = spy_path()
    if spy is None:
        out.line("not measured: py-spy is not installed (pip install py-spy)")
        return {}
    result: dict[str, object] = {}
    up = sink.Sink(run_dir).start()
    target = relay.Relay(run_dir, up.port, workers=workers, label="relay profiled")
    try:
        target.start()
        source.run(target.port, 300, 20, size, timeout=120)
        up.wait_quiet(0.3, 10)
        before = scrape(target.process.admin_port)
        raw = run_dir.path / "profile-relay.txt"
        assert target.process.pid is not None
        recorder = subprocess.Popen(
            [spy, "record", "--pid", str(target.process.pid), "--subprocesses", "--threads", "--nonblocking",
             "--rate", "100", "--format", "raw", "--output", str(raw)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        run_dir.register(recorder.pid)
        time.sleep(2.0)
        pids = target.pids()
        cpu_before = {pid: proctree.cpu_seconds([pid]) for pid in pids}
        base = up.count
        started = time.monotonic()
        source.run(target.port, messages, 20, size, timeout=600)
        arrived = up.wait_for(base + messages, timeout=120)
        wall = (arrived or time.monotonic()) - started
        cpu = {pid: proctree.cpu_seconds([pid]) - cpu_before.get(pid, 0.0) for pid in pids}
        recorder.send_signal(signal.SIGINT)
        spy_out = recorder.communicate(timeout=60)[0].decode(errors="replace")
        after = scrape(target.process.admin_port)
    except (RuntimeError, TimeoutError) as error:
        out.line(f"could not profile ({error})")
        return {}
    finally:
        target.stop()
        up.stop()
    rate = stats.rate(messages, wall) if arrived else float("nan")
    out.line(f"throughput while profiled: {stats.fmt(rate)} msg/s (py-spy costs a little CPU)")
    usage = ", ".join(
        f"{'supervisor' if i == 0 else f'worker {i}'} {100 * c / wall:.0f}%"
        for i, c in enumerate(cpu.values())
    )
    out.line(f"CPU use over the window (100% = one core): {usage}")
    result["rate"] = rate
    result["cpu_percent"] = {str(pid): 100 * c / wall for pid, c in cpu.items()}
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    commits = delta.get("mailrelay_relay_spool_fsync_duration_seconds_count", 0.0)
    accepted = delta.get("mailrelay_relay_messages_accepted_total", 0.0)
    if commits:
        fsync_ms = 1000 * delta.get("mailrelay_relay_spool_fsync_duration_seconds_sum", 0.0) / commits
        delivery_ms = (
            1000
            * delta.get("mailrelay_relay_delivery_duration_seconds_sum", 0.0)
            / max(delta.get("mailrelay_relay_delivery_duration_seconds_count", 0.0), 1.0)
        )
        out.line(
            f"relay metrics over the window: {accepted:.0f} accepted in {commits:.0f} group commits "
            f"({accepted / commits:.1f} messages per commit), mean commit (fdatasync each file + rename + "
            f"fsync dir) {fsync_ms:.1f} ms, mean 250 -> upstream 250 {delivery_ms:.0f} ms"
        )
        result.update(commits=commits, accepted=accepted, commit_ms=fsync_ms, delivery_ms=delivery_ms)
    if not raw.exists():
        out.line(f"py-spy wrote no profile: {spy_out.strip()[-300:]}")
        return result
    keep = pathlib.Path(f"out/bench/profile-relay-{kib}k.txt")
    keep.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(raw, keep)
    every, leaf, inclusive, threads = parse(raw)
    idle = threads.get("idle pool threads", 0)
    total = max(every - idle, 1)
    out.line(
        f"{every} samples; {idle} of them are pool threads waiting for work (idle, left out below); "
        f"raw stacks in {keep}"
    )
    busy = sorted((k, v) for k, v in threads.items() if k != "idle pool threads")
    out.line("by thread (busy samples): " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in busy))
    out.line("where the samples are (leaf frame, by category):")
    for name, count in categorise(leaf).most_common():
        out.line(f"  {100 * count / total:5.1f}%  {name}")
    out.line("top leaf frames:")
    for frame, count in leaf.most_common(12):
        out.line(f"  {100 * count / total:5.1f}%  {frame}")
    out.line("top relay frames, inclusive:")
    shown = 0
    for frame, count in inclusive.most_common():
        if "mailrelay_relay/" in frame and not re.search(r"app\.py|cli\.py", frame):
            out.line(f"  {100 * count / total:5.1f}%  {frame}")
            shown += 1
            if shown == 12:
                break
    if with_anatomy:
        result.update(anatomy(run_dir, out))
        commit.run(run_dir.path, out)
    result["categories"] = {k: v / max(total, 1) for k, v in categorise(leaf).items()}
    result["top_leaf"] = [(f, c / max(total, 1)) for f, c in leaf.most_common(20)]
    out.record(f"profile_{kib}k", result)
    return result
