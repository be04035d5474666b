"""`python -m bench [part ...]`: run the chosen parts (all by default) and print every comparison.

What it must not do: leave servers running (every part stops what it started, and a dead run's leftovers
are swept at start).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time
from collections.abc import Sequence

from bench import overload, report, sessions, throughput, workdir

PARTS = ("throughput", "sessions", "overload", "profile", "scale-in", "operator")


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"any of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness only")
    parser.add_argument("--json", type=pathlib.Path, default=pathlib.Path("out/bench/results.json"))
    args = parser.parse_args(argv)
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    parts = args.parts or list(PARTS)
    out = report.Report()
    info = machine()
    out.line(f"mailrelay-operator bench: {info['nproc']} CPUs ({info['cpu']}), kernel {info['kernel']}")
    out.record("machine", info)
    for cleaned in workdir.sweep():
        out.line(f"swept leftovers of a dead run: {cleaned}")
    run_dir = workdir.RunDir()
    started = time.monotonic()
    try:
        if "throughput" in parts:
            throughput.run(run_dir, out, throughput.QUICK if args.quick else throughput.FULL)
        if "sessions" in parts:
            sessions.run(run_dir, out, sessions.QUICK if args.quick else sessions.FULL)
        if "overload" in parts:
            overload.run(run_dir, out, overload.QUICK if args.quick else overload.FULL)
    finally:
        run_dir.remove()
    out.line("")
    out.line(f"bench done in {time.monotonic() - started:.0f}s")
    out.save(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
