"""Scale-in under steady load (issue 6 §1.3): sessions reset and messages at risk or lost when relays are
removed while mail flows, the operator's drain-first scale-in against the naive scale-in of the Demo issue.

Both runs reuse the sandbox of `make demo` (`mailrelay_sandbox`): the real control plane (`kubecluster`:
etcd, kube-apiserver, controller-manager with the real ReplicaSet controller, scheduler) with the CRD and
the chart installed, the process kubelet running every pod as a real `mailrelay-relay` process on its pod
IP (`kubelet`), the load reaching the relays through the Service's EndpointSlices, the recording upstream
(`scenario.upstream_sink`) and the MTA-like load generator (`loadgen`, which counts a connection dropped
without an SMTP reply as a reset session and tracks every Message-ID from 250 to the upstream). Three
relays carry a steady load; after a warm-up the count is forced down to one while the load goes on:

- drain-first: the real `mailrelay-operator` manages a MailRelay with a count fixed at 3 through
  `spec.replicas.fixed` (what `kubectl scale mailrelay --replicas` sets); the bench sets it to 1. The
  operator drains two relays (new sessions get 421, open ones finish, the queue flushes), then deletes
  them and lowers the Deployment.
- naive: no operator, the Deployment of the same manifest (`mailrelay_operator.manifests`) at 3 replicas;
  the bench sets its replicas to 1 (what `kubectl scale deployment` or an HPA does). The real ReplicaSet picks
  the victims by its own rule and the kubelet sends SIGTERM to relays started with `--drain-timeout 0`
  (the demo's `--compare-naive` convention: SIGTERM stops them at once); a removed pod's emptyDir spool
  goes with it.
With `--defer-upstream S` the upstream answers 451 from 5 s before the scale-in for S seconds, so the relays
hold a queue when the scale-in starts (a throttling smarthost): the case where messages are at risk.

What it must not do: judge (tests assert only that it ran), or leave relays behind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mailrelay_sandbox import apiclient, demo, kubelet, loadgen, scenario, waiting

from bench import environment, report

NAMESPACE = "mail"
NAME = demo.NAME
DEPLOYMENT = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{NAME}"
MODES = ("drain-first", "naive")


@dataclass(frozen=True)
class Config:
    sessions: int          # steady MTA sessions
    rate: float            # steady offered msg/s
    warmup: float          # seconds of steady load before the scale-in
    after: float           # seconds of steady load after the scale-in finished
    defer_upstream: float  # seconds of upstream 451 around the scale-in (0: none)
    interval: int          # the operator's intervalSeconds


FULL = Config(sessions=6, rate=30.0, warmup=12.0, after=10.0, defer_upstream=0.0, interval=2)
QUICK = Config(sessions=3, rate=10.0, warmup=3.0, after=1.0, defer_upstream=0.0, interval=1)


@dataclass
class ModeResult:
    mode: str
    sent: int
    accepted: int
    delivered: int
    lost: int                   # answered 250, never reached the upstream
    unsent: int                 # still held by the clients at the end (never answered 250: not lost)
    sessions_reset: int         # during the whole run
    resets_before: int          # before the scale-in was ordered (should be 0 in both modes)
    refused_421: int            # after the scale-in was ordered (draining relays shed; clients retry)
    duplicates: int             # a message accepted twice (its session reset between '.' and the 250)
    removed: int                # relays that served and were removed
    killed: int                 # of those, SIGKILLed after the grace period
    spool_left: int             # messages queued on removed relays when their emptyDir went: at risk / lost
    queued_at_force: int        # messages queued on the relays when the scale-in was ordered
    scale_in_seconds: float     # order -> one relay left, the others gone
    accepted_during: int        # messages accepted between the order and the end of the scale-in


def _relay_manifest(cfg: Config) -> dict[str, Any]:
    relay = scenario.mailrelay(NAME, NAMESPACE, min_replicas=1, max_replicas=3, interval=cfg.interval,
                               sessions_per_pod=2, max_sessions_per_pod=20, scale_down_stabilization=0,
                               scale_down_step=3, drain_timeout=60)
    relay["spec"]["replicas"]["fixed"] = 3
    return relay


def _queued(plane: kubelet.ProcessKubelet) -> int:
    statuses = [r.last_status or {} for r in plane.runtimes.values()]
    return sum(int(status.get("queue", {}).get("messages", 0)) for status in statuses)


async def run_mode(mode: str, cfg: Config, workdir: pathlib.Path) -> ModeResult:
    relay = _relay_manifest(cfg)
    extra_env = {"MAILRELAY_LOG_LEVEL": "warning"}
    if mode == "naive":
        extra_env["MAILRELAY_DRAIN_TIMEOUT"] = "0"
    async with scenario.platform(workdir) as platform:
        cluster = platform.cluster
        await asyncio.to_thread(cluster.create_namespace, NAMESPACE, node="bench-scalein")
        async with (scenario.upstream_sink() as upstream,
                    cluster.api() as api,
                    kubelet.ProcessKubelet.on(cluster, "bench-scalein",
                                           workdir / "pods", upstream.address, extra_env=extra_env) as plane,
                    kubelet.ServiceEndpoints(api, NAMESPACE, NAME) as service):
            return await _play(mode, cfg, relay, workdir, platform, api, plane, service, upstream)


async def _play(mode: str, cfg: Config, relay: dict[str, Any], workdir: pathlib.Path,
                platform: scenario.Platform, api: apiclient.Api, plane: kubelet.ProcessKubelet,
                service: kubelet.ServiceEndpoints, upstream: scenario.Upstream) -> ModeResult:
    operator: scenario.OperatorProcess | None = None
    gen: loadgen.LoadGenerator | None = None
    try:
        if mode == "naive":
            await scenario.create_naive(api, relay, replicas=3, token=secrets.token_urlsafe(16))
        else:
            await api.request("POST", scenario.mailrelay_path(NAMESPACE), relay)
            operator = scenario.OperatorProcess(platform.operator_kubeconfig, NAMESPACE,
                                                workdir / "operator.log",
                                                "--liveness", "", "--metrics-port", "0")
            await operator.start()
        try:
            await waiting.eventually(lambda: len(service.endpoints()) == 3, within=120, every=0.1,
                                     what="3 ready relays")
        except TimeoutError as exc:
            tail = operator.log_tail() if operator else ""
            raise RuntimeError(f"{mode}: {exc}\n{tail}") from exc
        gen = loadgen.LoadGenerator(service.endpoints)
        gen.set_load(cfg.rate, cfg.sessions)
        if cfg.defer_upstream > 0:
            await asyncio.sleep(max(0.0, cfg.warmup - 5.0))
            upstream.defer(451)
            await asyncio.sleep(min(5.0, cfg.warmup))
        else:
            await asyncio.sleep(cfg.warmup)
        before = gen.counters.snapshot()
        queued_at_force = _queued(plane)
        ordered = time.monotonic()
        if mode == "naive":
            await api.patch(DEPLOYMENT, {"spec": {"replicas": 1}})
        else:
            await api.patch(scenario.mailrelay_path(NAMESPACE, NAME),
                                  {"spec": {"replicas": {"fixed": 1}}})
        if cfg.defer_upstream > 0:
            await asyncio.sleep(max(0.0, cfg.defer_upstream - 5.0))
            upstream.defer(None)

        def one_left() -> bool:
            live = [p for p in plane.pods if not p["metadata"].get("deletionTimestamp")]
            return len(live) == 1 and len(plane.runtimes) == 1 and len(service.endpoints()) == 1

        await waiting.eventually(one_left, within=120, every=0.1, what="scale-in to one relay")
        scale_in = time.monotonic() - ordered
        accepted_during = gen.counters.accepted - before.accepted
        refused = gen.counters.refused_421 - before.refused_421
        await asyncio.sleep(cfg.after)
        await gen.finish(60)
        accepted_ids = set(gen.accepted_ids)
        deadline = time.monotonic() + 60
        while not accepted_ids <= upstream.delivered_ids() and time.monotonic() < deadline:
            if not plane.runtimes:   # nothing left that could still deliver
                break
            await asyncio.sleep(0.5)
        summary = gen.summary(upstream.delivered_ids())
        served = [t for t in plane.terminations if t.served]
        return ModeResult(
            mode=mode, sent=summary.sent, accepted=summary.accepted, delivered=summary.delivered,
            lost=summary.lost, unsent=summary.unsent, sessions_reset=summary.sessions_reset,
            resets_before=before.sessions_reset, refused_421=refused, duplicates=gen.counters.duplicates,
            removed=len(served), killed=sum(1 for t in served if t.killed),
            spool_left=sum(t.spool_left for t in served), queued_at_force=queued_at_force,
            scale_in_seconds=scale_in, accepted_during=accepted_during)
    finally:
        if gen is not None:
            await gen.close()
        if operator is not None:
            await operator.stop()


def _ratio(ours: float, theirs: float) -> str:
    if ours == 0 and theirs == 0:
        return "equal (0)"
    if ours == 0:
        return f"0 vs {theirs:,.0f}"
    return f"{theirs / ours:.1f}x fewer"


def run(out: report.Report, cfg: Config, *, keep: bool = False) -> dict[str, Any]:
    title = "Scale-in under steady load: drain-first (operator) vs naive, 3 relays -> 1"
    if cfg.defer_upstream:
        title += f", upstream 451 for {cfg.defer_upstream:.0f} s around it"
    out.section(title)
    out.line(f"steady load: {cfg.sessions} MTA sessions, {cfg.rate:.0f} msg/s offered; scale-in ordered "
             f"after {cfg.warmup:.0f} s")
    load_start = os.getloadavg()
    results: dict[str, ModeResult] = {}
    for mode in MODES:
        workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"mailrelay-bench-scalein-{mode}-"))
        try:
            results[mode] = asyncio.run(run_mode(mode, cfg, workdir))
        finally:
            if keep:
                out.line(f"({mode}: sandbox files kept in {workdir})")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    load_end = os.getloadavg()
    ours, naive = results["drain-first"], results["naive"]
    rows: list[tuple[str, str]] = [
        ("sessions_reset", "sessions reset (dropped without an SMTP reply)"),
        ("spool_left", "messages left queued on removed relays (at risk)"),
        ("lost", "lost (answered 250, never delivered)"),
        ("duplicates", "accepted twice (reset between '.' and 250)"),
        ("killed", "relays SIGKILLed"),
    ]
    table = [[label, f"{getattr(ours, key):,}", f"{getattr(naive, key):,}",
              _ratio(getattr(ours, key), getattr(naive, key))] for key, label in rows]
    table += [[label, f"{getattr(ours, key):,}", f"{getattr(naive, key):,}", ""] for key, label in (
        ("removed", "relays removed (that had served)"),
        ("queued_at_force", "queued on the relays when ordered"),
        ("refused_421", "421 replies after the order (clients retry)"),
        ("accepted_during", "accepted during the scale-in"),
        ("sent", "messages sent"), ("accepted", "accepted (250)"), ("delivered", "delivered upstream"),
        ("unsent", "still held by the clients (not lost)"),
    )]
    table.append(["scale-in: order -> one relay left", f"{ours.scale_in_seconds:.1f} s",
                  f"{naive.scale_in_seconds:.1f} s", ""])
    out.table(["", "drain-first", "naive", "drain-first vs naive"], table)
    loads = " / ".join(" ".join(f"{x:.1f}" for x in la) for la in (load_start, load_end))
    out.line(f"load average at start / end: {loads}; CPU pressure avg60 {environment.pressure('cpu')}")
    key = "scale_in_deferred_upstream" if cfg.defer_upstream else "scale_in"
    figures = {"config": asdict(cfg), "drain_first": asdict(ours), "naive": asdict(naive),
               "loadavg_start": load_start, "loadavg_end": load_end}
    out.record(key, figures)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scalein",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short and light: checks the harness")
    parser.add_argument("--defer-upstream", type=float, default=None, metavar="S",
                        help="the upstream answers 451 from 5 s before the scale-in for S seconds")
    parser.add_argument("--keep", action="store_true", help="keep the sandbox's logs and spools")
    parser.add_argument("--json", type=pathlib.Path, default=pathlib.Path("out/bench/scalein.json"))
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.defer_upstream is not None:
        cfg = Config(cfg.sessions, cfg.rate, max(cfg.warmup, 6.0), cfg.after, args.defer_upstream,
                     cfg.interval)
    return report.run_module(args.json, lambda out: run(out, cfg, keep=args.keep))


if __name__ == "__main__":
    sys.exit(main())
