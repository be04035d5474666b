"""`python -m bench [part ...]`: run the chosen parts (all by default) and print every comparison.

Parts: throughput, sessions (idle memory, 421 latency at the cap), overload, profile, scale-in,
controlplane (the sandbox's real control plane: start time and weight), and operator (reaction and
footprint on the real control plane; only when asked by name: it takes longer than the default run).
`--quick` shrinks every size to check the harness only.

What it must not do: leave servers running (every part stops what it started, and a dead run's leftovers
are swept at start).
"""

from __future__ import annotations

import argparse
import pathlib
import signal
import sys
import time
from collections.abc import Sequence

from bench import (
    controlplane,
    environment,
    overload,
    pending,
    profile,
    report,
    scalein,
    sessions,
    throughput,
    workdir,
)

PARTS = ("throughput", "sessions", "overload", "profile", "scale-in", "controlplane", "operator")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"any of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness only")
    parser.add_argument(
        "--profile-size", type=int, default=2048, help="message bytes for the profile part (default 2048)"
    )
    parser.add_argument("--json", type=pathlib.Path, default=pathlib.Path("out/bench/results.json"))
    args = parser.parse_args(argv)
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    parts = args.parts or list(PARTS)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so every server is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = report.Report()
    info = environment.machine()
    out.line(f"mailrelay-operator bench: {info['nproc']} CPUs ({info['cpu']}), kernel {info['kernel']}")
    info["revision"] = environment.relay_revision()
    out.line(f"checkout: {info['revision']}")
    out.record("machine", info)
    for cleaned in workdir.sweep():
        out.line(f"swept leftovers of a dead run: {cleaned}")
    run_dir = workdir.RunDir()
    started = time.monotonic()
    try:
        snap = environment.snapshot(run_dir.path)
        out.line(f"at start: {environment.line(snap)}")
        out.record("environment_start", snap)
        if "throughput" in parts:
            if args.quick:
                throughput.run(run_dir, out, throughput.QUICK, warmup=20)
            else:
                throughput.run(run_dir, out, throughput.FULL)
        if "sessions" in parts:
            sessions.run(run_dir, out, sessions.QUICK if args.quick else sessions.FULL)
        if "overload" in parts:
            overload.run(run_dir, out, overload.QUICK if args.quick else overload.FULL)
        if "profile" in parts:
            messages = 300 if args.quick else 2000  # 5-20 s under py-spy at any size: enough samples
            size = args.profile_size
            profile.run(run_dir, out, messages=messages, size=size, with_anatomy=size == 2048)
        if "scale-in" in parts:
            scalein.run(out, scalein.QUICK if args.quick else scalein.FULL)
        if "controlplane" in parts:
            controlplane.run(out, controlplane.QUICK if args.quick else controlplane.FULL)
        if "operator" in parts:
            pending.operator(out, asked="operator" in args.parts, quick=args.quick)
        snap = environment.snapshot(run_dir.path)
        out.line("")
        out.line(f"at end: {environment.line(snap)}")
        out.record("environment_end", snap)
    finally:
        run_dir.remove()
    out.line(f"bench done in {time.monotonic() - started:.0f}s")
    out.save(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
