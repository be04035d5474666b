"""Scale-in under load, drain-first (the operator) against naive (HPA-style SIGTERM, no drain): the Demo
issue's `python -m mailrelay_sandbox.demo --quick --compare-naive`, run as a user runs it, and its
comparison table read back (sessions reset, messages lost or stranded on removed pods, relays killed).

The load is the demo's quick script (steps up so the operator scales out, then down so it scales in),
not a flat rate; both modes get the same script.

What it must not do: invent a figure when the demo fails or prints something it cannot read: it says
"not measured" with the demo's last lines instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys

from bench import report, workdir


def parse(text: str) -> dict[str, tuple[int, int]]:
    """{row label: (drain-first, naive)} from the demo's comparison table; empty if there is none."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "drain-first (operator)" in line), None)
    if start is None:
        return {}
    found: dict[str, tuple[int, int]] = {}
    for line in lines[start + 1 :]:
        match = re.match(r"^(.*?)\s+([\d,]+)\s+([\d,]+)\s*$", line)
        if not match:
            break
        found[match.group(1).strip()] = (
            int(match.group(2).replace(",", "")),
            int(match.group(3).replace(",", "")),
        )
    return found


def _stop_group(proc: subprocess.Popen[str]) -> None:
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run(run_dir: workdir.RunDir, out: report.Report, timeout: float = 420.0) -> dict[str, object]:
    title = "Scale-in under load: drain-first (operator) against naive scale-in (issue 6 §1.3)"
    folder = run_dir.sub("demo")
    argv = [sys.executable, "-m", "mailrelay_sandbox.demo", "--quick", "--compare-naive", "--no-live",
            "--out", str(folder)]  # fmt: skip
    # Its own session: on a timeout or an interrupt the demo's relays and operator go down with it.
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    run_dir.register(proc.pid)
    try:
        text, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        text, code = f"timed out after {timeout:.0f} s", -1
    finally:
        if proc.poll() is None:
            _stop_group(proc)
    table = parse(text)
    if not table:
        tail = " | ".join(text.strip().splitlines()[-3:])
        out.pending("scale_in", title, f"the demo gave no comparison (exit {code}): {tail}")
        return {}
    out.section(title)
    shown = " ".join(["python", *argv[1:6]])
    out.line(f"`{shown}` (exit {code}); load steps up, the operator scales out, then in")
    rows = [[label, f"{a:,}", f"{b:,}"] for label, (a, b) in table.items()]
    out.table(["", "drain-first (operator)", "naive (no drain)"], rows)
    result: dict[str, object] = {label: {"drain_first": a, "naive": b} for label, (a, b) in table.items()}
    out.record("scale_in", result)
    return result
