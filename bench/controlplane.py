"""The sandbox's real control plane: how long it takes to start from a warm build, and what it weighs.

Each run starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler (`mailrelay_sandbox.
kubecluster.start`, which returns once all four answer their health checks), then applies `crds/` and
installs the chart as the README says (`scenario.install`), then stops everything. It reports the start
and install times, and the RSS of each process after the install. The target: the control plane starts in
10 s or less when its binaries are built.

What it must not do: judge (it prints the target beside the figures) or leave a process behind.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mailrelay_sandbox import kubecluster, proctree, scenario

from bench import report, stats

START_TARGET_SECONDS = 10.0


@dataclass(frozen=True)
class Config:
    runs: int


FULL = Config(runs=5)
QUICK = Config(runs=1)


def one_run(workdir: pathlib.Path) -> dict[str, Any]:
    began = time.monotonic()
    cluster = kubecluster.start(workdir / "kube")
    try:
        started = time.monotonic() - began
        scenario.install(cluster, workdir)
        installed = time.monotonic() - began - started
        rss = {name: proctree.memory_kib([process.pid])[0] / 1024
               for name, process in cluster.processes.items()}
        version = cluster.describe()
    finally:
        cluster.stop()
    return {"start_seconds": started, "install_seconds": installed, "rss_mib": rss, "describe": version}


def run(out: report.Report, cfg: Config) -> dict[str, Any]:
    out.section(f"Control plane: start and install, {cfg.runs} run(s)")
    kubecluster.ensure_binaries()
    results = []
    for _ in range(cfg.runs):
        workdir = pathlib.Path(tempfile.mkdtemp(prefix="mailrelay-bench-kube-"))
        try:
            results.append(one_run(workdir))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    starts = [r["start_seconds"] for r in results]
    installs = [r["install_seconds"] for r in results]
    out.line(results[-1]["describe"])
    out.table(["", "p50", "max", "target"], [
        ["start (all four healthy), s", f"{stats.percentile(starts, 50):.2f}", f"{max(starts):.2f}",
         f"<= {START_TARGET_SECONDS:.0f}"],
        ["kubectl apply -f crds/ + helm install, s", f"{stats.percentile(installs, 50):.2f}",
         f"{max(installs):.2f}", ""],
    ])
    out.line("RSS after the install, MiB: " + ", ".join(
        f"{name} {mib:.0f}" for name, mib in results[-1]["rss_mib"].items()))
    figures = {"runs": results, "start_p50": stats.percentile(starts, 50), "start_max": max(starts),
               "target_seconds": START_TARGET_SECONDS}
    out.record("controlplane", figures)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.controlplane",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run")
    parser.add_argument("--runs", type=int, help="number of starts (default 5)")
    parser.add_argument("--json", type=pathlib.Path, default=pathlib.Path("out/bench/controlplane.json"))
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    cfg = Config(runs=args.runs or cfg.runs)
    return report.run_module(args.json, lambda out: run(out, cfg))


if __name__ == "__main__":
    sys.exit(main())
