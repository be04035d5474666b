"""`make demo`: the real operator scaling real relays under real SMTP load, on a real control plane.

`python -m mailrelay_sandbox.demo` starts a real Kubernetes control plane on loopback (`kubecluster`:
etcd, kube-apiserver with RBAC, kube-controller-manager, kube-scheduler; built once by
scripts/install-kube.sh), applies `crds/` with kubectl and installs the chart with helm, as the README
tells a user to. The operator runs as a local process with a token of the chart's ServiceAccount (the
chart's own operator Deployment is installed with replicaCount 0: no image is built here). The relay
pods run as `mailrelay-relay` processes under the sandbox's process kubelet (`kubelet`, the one simulated
part); the load generator reaches them through the Service's EndpointSlices, as kube-proxy would. It
plays a scripted scenario of about 2.5 minutes: ramp-up (scale-up), overload beyond max (421 shedding,
Overloaded), ramp-down (drain, then scale-in), maintenance on and off. Each second it redraws one line;
at the end it prints `sent / accepted / delivered / lost / sessions reset` and writes a PNG chart.

`--spool persistent` runs the relays with persistent spools (a StatefulSet, a claim per relay) and adds
a "node lost" step while the upstream throttles: the relay holding the most mail is SIGKILLed and its
pod force-deleted, as when its node dies; its ordinal comes back on the same claim and delivers what it
held. The live line shows `NODE-LOST` until that mail is delivered; the chart marks the moment with the
count it held and the count lost.

`--compare-naive` plays the same load again with drain turned off, as plain HPA scaling does it: no
operator; an HPA-like scaler runs the operator's own pure policy on the same metrics and sets the
Deployment's replicas directly; the real ReplicaSet controller picks victims by its own rule; the kubelet
sends SIGTERM to relays started with `--drain-timeout 0` (so SIGTERM stops them at once), and a removed
pod's spool (an emptyDir) goes with it. Its resets and losses are printed beside ours.

This module is the demo's shell only: the decisions it shows are the operator's and the relays'. It must
not be imported by `relay/` or `operator/`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import email.parser
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mailrelay_sandbox import apiclient, kubecluster, kubelet, loadgen, scenario, timeline

NAMESPACES = {"operator": "mail", "naive": "mail-naive"}
NAME = "outbound"
DRAIN_STARTED = "mailrelay.dev/drain-started"


def deployment_path(namespace: str) -> str:
    return f"/apis/apps/v1/namespaces/{namespace}/deployments"


@dataclasses.dataclass(frozen=True)
class Action:
    at: float
    sessions: int | None = None      # MTA sessions at most (load generator concurrency)
    rate: float | None = None        # offered msg/s
    maintenance: bool | None = None
    throttle: bool | None = None     # True: the upstream answers 451 to every message; False: it recovers
    lose_node: bool = False          # persistent spools only: the relay holding the most mail dies undrained


@dataclasses.dataclass(frozen=True)
class Script:
    phases: tuple[timeline.Phase, ...]
    actions: tuple[Action, ...]
    end: float
    relay: dict[str, Any]            # keyword arguments of scenario.mailrelay()


FULL = Script(
    phases=(
        timeline.Phase(0, 12, "steady"),
        timeline.Phase(12, 42, "ramp-up"),
        timeline.Phase(42, 72, "overload"),
        timeline.Phase(72, 112, "ramp-down"),
        timeline.Phase(112, 132, "maintenance"),
        timeline.Phase(132, 148, "steady"),
    ),
    actions=(
        Action(0, sessions=3, rate=12),
        Action(12, sessions=8, rate=32),
        Action(22, sessions=14, rate=56),
        Action(32, sessions=20, rate=80),
        Action(42, sessions=60, rate=120),
        Action(72, sessions=12, rate=48),
        Action(74, throttle=True),
        Action(80, lose_node=True),
        Action(86, sessions=4, rate=16),
        Action(98, throttle=False),
        Action(112, maintenance=True),
        Action(126, maintenance=False),
    ),
    end=148,
    relay={"min_replicas": 1, "max_replicas": 4, "interval": 2, "sessions_per_pod": 5,
           "max_sessions_per_pod": 10, "scale_down_stabilization": 8, "scale_down_step": 1,
           "drain_timeout": 60},
)

QUICK = Script(
    phases=(
        timeline.Phase(0, 5, "steady"),
        timeline.Phase(5, 20, "ramp-up"),
        timeline.Phase(20, 32, "overload"),
        timeline.Phase(32, 55, "ramp-down"),
        timeline.Phase(55, 65, "maintenance"),
        timeline.Phase(65, 70, "steady"),
    ),
    actions=(
        Action(0, sessions=3, rate=12),
        Action(5, sessions=12, rate=48),
        Action(20, sessions=40, rate=100),
        Action(32, sessions=3, rate=12),
        Action(33, throttle=True),
        Action(38, lose_node=True),
        Action(48, throttle=False),
        Action(55, maintenance=True),
        Action(62, maintenance=False),
    ),
    end=70,
    relay={"min_replicas": 1, "max_replicas": 3, "interval": 1, "sessions_per_pod": 5,
           "max_sessions_per_pod": 10, "scale_down_stabilization": 4, "scale_down_step": 1,
           "drain_timeout": 30},
)


@dataclasses.dataclass(frozen=True)
class NodeLoss:
    """A relay lost with its node: SIGKILLed and its pod force-deleted, nothing drained or flushed."""

    t: float
    pod: str
    held: frozenset[str]            # Message-IDs in its spool when it died: answered 250, not delivered

    def lost(self, delivered: set[str]) -> int:
        return len(self.held - delivered)

    def live(self, delivered: set[str]) -> str:
        """The live line's flag while some of what it held is undelivered; "" once all of it is."""
        done = len(self.held & delivered)
        return "" if done == len(self.held) else f"{self.pod} held {len(self.held)}, {done} delivered"

    def label(self, delivered: set[str]) -> str:
        return f"node lost: {self.pod} held {len(self.held)}, lost {self.lost(delivered)}"

    def report(self, delivered: set[str]) -> str:
        return (f"node lost at {self.t:.0f} s: {self.pod} was SIGKILLed and its pod force-deleted holding "
                f"{len(self.held):,} accepted messages; its ordinal came back on its claim and delivered "
                f"{len(self.held & delivered):,} of them; lost {self.lost(delivered):,}")


def spooled_ids(spool: Path) -> frozenset[str]:
    """The Message-IDs of the messages in a relay's spool folder (read with the relay's own decoder)."""
    from mailrelay_relay import spool as relay_spool

    parser = email.parser.BytesHeaderParser()
    found: set[str] = set()
    for record in relay_spool.read_queue(spool):
        msgid = parser.parsebytes(record.content).get("Message-ID")
        if msgid:
            found.add(str(msgid).strip())
    return frozenset(found)


@dataclasses.dataclass
class RunResult:
    mode: str
    summary: loadgen.Summary
    samples: list[timeline.Sample]
    terminations: list[kubelet.Termination]
    png: Path | None = None
    killed: int = 0
    stranded: int = 0
    queued_at_end: int = 0          # messages still queued on running relays when the demo stopped
    node_loss: NodeLoss | None = None
    delivered: set[str] = dataclasses.field(default_factory=set)


class NaiveScaler:
    """An HPA stand-in: the operator's pure policy on the relays' load, replicas set directly, no drain."""

    def __init__(self, plane: kubelet.ProcessKubelet, api: apiclient.Api, namespace: str,
                 relay: dict[str, Any]) -> None:
        from mailrelay_operator import spec as specmod

        self.plane = plane
        self.api = api
        self.namespace = namespace
        self.spec = specmod.parse(relay["spec"])
        self.desired = self.spec.replicas.min
        self.overloaded = False
        self._history: tuple[Any, ...] = ()

    async def run(self) -> None:
        from mailrelay_operator import policy

        while True:
            await asyncio.sleep(self.spec.scaling.interval_seconds)
            path = f"{deployment_path(self.namespace)}/{NAME}"
            try:
                deployment = await self.api.request("GET", path)
            except apiclient.ApiError:
                continue
            current = int(deployment["spec"].get("replicas", 1))
            loads = []
            for runtime in self.plane.runtimes.values():
                if runtime.ready and not runtime.terminating and runtime.last_status:
                    status = runtime.last_status
                    loads.append(policy.PodLoad(runtime.name, int(status.get("sessions", 0)),
                                                int(status.get("queue", {}).get("messages", 0))))
            decision = policy.decide(current, loads, self.spec, time.time(), self._history)
            self._history = decision.history
            self.desired, self.overloaded = decision.desired, decision.overloaded
            if decision.desired != current:
                with contextlib.suppress(apiclient.ApiError):
                    await self.api.patch(path, {"spec": {"replicas": decision.desired}})


class Demo:
    def __init__(self, platform: scenario.Platform, mode: str, script: Script, workdir: Path, *, live: bool,
                 out: Path, persistent: bool = False) -> None:
        self.platform = platform
        self.persistent = persistent and mode == "operator"
        self.node_loss: NodeLoss | None = None
        self.plane: kubelet.ProcessKubelet | None = None
        self.namespace = NAMESPACES[mode]
        self.node = f"sandbox-{mode}"
        self.mode = mode
        self.script = script
        self.workdir = workdir
        self.live = live
        self.out = out
        self.samples: list[timeline.Sample] = []
        self.maintenance = False
        self.throttled = False
        self.upstream: scenario.Upstream | None = None
        self.api: apiclient.Api | None = None
        self.service: kubelet.ServiceEndpoints | None = None
        self.phase = ""

    # -- helpers -------------------------------------------------------------------------------
    def _print(self, text: str, *, keep: bool) -> None:
        if self.live:
            # a wrapped line cannot be redrawn in place: cut it to the terminal's width
            width = shutil.get_terminal_size((120, 24)).columns
            sys.stdout.write("\r\x1b[K" + text[: max(20, width - 1)] + ("\n" if keep else ""))
        elif keep:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()

    async def _mailrelay(self) -> dict[str, Any]:
        assert self.api is not None
        try:
            return await self.api.request("GET", scenario.mailrelay_path(self.namespace, NAME))
        except apiclient.ApiError:
            return {}

    def endpoints(self) -> list[loadgen.Endpoint]:
        """The Service's ready endpoints, from its EndpointSlices (what kube-proxy would balance over)."""
        return self.service.endpoints() if self.service is not None else []

    def _phase_at(self, t: float) -> str:
        for phase in self.script.phases:
            if phase.start <= t < phase.end:
                return phase.label
        return "settle"

    async def _sample(self, plane: kubelet.ProcessKubelet, gen: loadgen.LoadGenerator,
                      naive: NaiveScaler | None, t: float, before: loadgen.Counters,
                      elapsed: float) -> tuple[timeline.Sample, loadgen.Counters]:
        now = gen.counters.snapshot()
        runtimes = [r for r in plane.runtimes.values() if r.process and r.process.returncode is None]
        sessions = sum(int((r.last_status or {}).get("sessions", 0)) for r in runtimes)
        queue = sum(int((r.last_status or {}).get("queue", {}).get("messages", 0)) for r in runtimes)
        if naive is not None:
            desired, overloaded = naive.desired, naive.overloaded
            draining = sum(1 for r in plane.runtimes.values() if r.terminating)
        else:
            relay = await self._mailrelay()
            status = relay.get("status") or {}
            desired = int(status.get("desiredReplicas", 0))
            overloaded = any(c.get("type") == "Overloaded" and c.get("status") == "True"
                             for c in status.get("conditions") or [])
            draining = sum(1 for p in plane.pods
                           if DRAIN_STARTED in (p["metadata"].get("annotations") or {})
                           or p["metadata"].get("deletionTimestamp"))
        span = max(elapsed, 1e-3)
        sample = timeline.Sample(
            t=t, desired=desired, ready=len(self.endpoints()), draining=draining, sessions=sessions,
            queue=queue, msg_per_s=(now.accepted - before.accepted) / span,
            refused_per_s=(now.refused_421 - before.refused_421) / span, resets=now.sessions_reset,
            overloaded=overloaded, maintenance=self.maintenance, throttled=self.throttled,
            phase=self._phase_at(t),
            node_lost=self.node_loss.live(self.upstream.delivered_ids())
            if self.node_loss is not None and self.upstream is not None else "")
        return sample, now

    # -- the run -------------------------------------------------------------------------------
    async def run(self) -> RunResult:
        relay = scenario.mailrelay(NAME, self.namespace, **self.script.relay,
                                   spool_persistent="64Mi" if self.persistent else None)
        cluster = self.platform.cluster
        await asyncio.to_thread(cluster.create_namespace, self.namespace, node=self.node)
        async with (scenario.upstream_sink() as upstream,
                    cluster.api() as api):
            self.upstream, self.api = upstream, api
            extra_env = {"MAILRELAY_LOG_LEVEL": "warning"}
            if self.mode == "naive":
                extra_env["MAILRELAY_DRAIN_TIMEOUT"] = "0"
            # A slower kubelet cadence than the tests use: the demo process also runs the sink and the
            # load generator, and every millisecond of its loop counts.
            async with (kubelet.ProcessKubelet.on(cluster, self.node, self.workdir / "pods", upstream.address,
                                               extra_env=extra_env, sync_period=0.7,
                                               probe_period=1.0) as plane,
                        kubelet.ServiceEndpoints(api, self.namespace, NAME) as service):
                self.service = service
                self.plane = plane
                operator: scenario.OperatorProcess | None = None
                naive: NaiveScaler | None = None
                background: list[asyncio.Task[None]] = []
                try:
                    if self.mode == "naive":
                        naive = NaiveScaler(plane, api, self.namespace, relay)
                        await scenario.create_naive(api, relay, replicas=naive.spec.replicas.min)
                        background.append(asyncio.create_task(naive.run()))
                    else:
                        await api.request("POST", scenario.mailrelay_path(self.namespace), relay)
                        operator = scenario.OperatorProcess(
                            self.platform.operator_kubeconfig, self.namespace, self.workdir / "operator.log",
                            "--liveness", "", "--metrics-port", "0")
                        await operator.start()
                    await self._wait_ready(operator)
                    return await self._play(plane, upstream, naive)
                finally:
                    for task in background:
                        task.cancel()
                    if operator is not None:
                        await operator.stop()

    async def _wait_ready(self, operator: scenario.OperatorProcess | None) -> None:
        deadline = time.monotonic() + 120
        while not self.endpoints():
            if operator is not None and not operator.running:
                raise RuntimeError(f"mailrelay-operator exited:\n{operator.log_tail()}")
            if time.monotonic() > deadline:
                tail = operator.log_tail() if operator else ""
                raise RuntimeError(f"no relay became ready within 120 s\n{tail}")
            await asyncio.sleep(0.2)

    async def _play(self, plane: kubelet.ProcessKubelet, upstream: scenario.Upstream,
                    naive: NaiveScaler | None) -> RunResult:
        gen = loadgen.LoadGenerator(self.endpoints)
        start = time.monotonic()
        actions = list(self.script.actions)
        before = gen.counters.snapshot()
        last = start
        next_tick = start
        while True:
            t = time.monotonic() - start
            while actions and actions[0].at <= t:
                await self._apply(actions.pop(0), gen)
            if t >= self.script.end:
                break
            next_tick += 1.0
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            now = time.monotonic()
            sample, before = await self._sample(plane, gen, naive, now - start, before, now - last)
            last = now
            self.samples.append(sample)
            keep = sample.phase != self.phase
            if keep and self.phase and self.live:
                self._print(timeline.line(self.samples[-2]), keep=True)
            self.phase = sample.phase
            self._print(timeline.line(sample), keep=not self.live)
        # Stop offering new mail; let the clients send their backlog and the relays flush their queues.
        gen.set_load(0, max(gen.counters.sessions_open, 4))
        settle_until = time.monotonic() + 60
        while time.monotonic() < settle_until:
            now = time.monotonic()
            sample, before = await self._sample(plane, gen, naive, now - start, before, now - last)
            last = now
            self.samples.append(sample)
            self._print(timeline.line(sample), keep=not self.live)
            queued = sum(int((r.last_status or {}).get("queue", {}).get("messages", 0))
                         for r in plane.runtimes.values())
            terminating = any(r.terminating for r in plane.runtimes.values())
            if gen.backlog == 0 and gen.counters.sessions_open == 0 and queued == 0 and not terminating:
                break
            await asyncio.sleep(1.0)
        await gen.close()
        await asyncio.sleep(2.0)   # last deliveries in flight
        queued_at_end = sum(int((r.last_status or {}).get("queue", {}).get("messages", 0))
                            for r in plane.runtimes.values() if not r.terminating)
        if self.live:
            sys.stdout.write("\n")
        delivered = upstream.delivered_ids()
        summary = gen.summary(delivered)
        terminations = list(plane.terminations)
        return RunResult(mode=self.mode, summary=summary, samples=self.samples, terminations=terminations,
                         killed=sum(1 for x in terminations if x.killed),
                         stranded=sum(x.spool_left for x in terminations), queued_at_end=queued_at_end,
                         node_loss=self.node_loss, delivered=set(delivered))

    async def _lose_node(self) -> None:
        """The relay holding the most mail dies as with its node: SIGKILL to its processes, then its pod
        force-deleted (grace 0). Its spool, on its claim, is read once the relay is dead."""
        if self.plane is None or self.api is None:
            return
        running = [r for r in self.plane.runtimes.values()
                   if r.process is not None and r.process.returncode is None and not r.terminating]
        if not running:
            return
        victim = max(running, key=lambda r: int((r.last_status or {}).get("queue", {}).get("messages", 0)))
        assert victim.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(victim.process.pid, signal.SIGKILL)
        await victim.process.wait()
        held = await asyncio.to_thread(spooled_ids, victim.spool)
        self.node_loss = NodeLoss(t=self.samples[-1].t if self.samples else 0.0, pod=victim.name, held=held)
        with contextlib.suppress(apiclient.ApiError):
            await self.api.request("DELETE", f"/api/v1/namespaces/{self.namespace}/pods/{victim.name}",
                                   {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0})

    async def _apply(self, action: Action, gen: loadgen.LoadGenerator) -> None:
        if action.lose_node and self.persistent:
            await self._lose_node()
        if action.sessions is not None or action.rate is not None:
            gen.set_load(action.rate if action.rate is not None else 0.0,
                         action.sessions if action.sessions is not None else 0)
        if action.throttle is not None and self.upstream is not None:
            self.throttled = action.throttle
            self.upstream.defer(451 if action.throttle else None)
        if action.maintenance is not None and self.mode == "operator":   # the naive run has no maintenance
            self.maintenance = action.maintenance
            if self.mode == "operator" and self.api is not None:
                await self.api.patch(scenario.mailrelay_path(self.namespace, NAME),
                                     {"spec": {"maintenance": action.maintenance}})


def summary_line(summary: loadgen.Summary) -> str:
    return (f"sent {summary.sent:,} / accepted {summary.accepted:,} / delivered {summary.delivered:,} / "
            f"lost {summary.lost:,} / sessions reset {summary.sessions_reset:,}")


def held_line(summary: loadgen.Summary) -> str:
    """What the clients still hold (never answered 250, so still theirs to send): not lost."""
    unconfirmed = summary.sent - summary.accepted
    if not summary.unsent and not unconfirmed:
        return ""
    return (f"(the clients still hold {summary.unsent + unconfirmed:,} messages the relays never answered "
            "250 to, as an MTA keeps deferred mail: not lost)")


def comparison(ours: RunResult, naive: RunResult) -> str:
    rows = [
        ("sent", ours.summary.sent, naive.summary.sent),
        ("accepted (250)", ours.summary.accepted, naive.summary.accepted),
        ("delivered", ours.summary.delivered, naive.summary.delivered),
        ("lost (250, never delivered)", ours.summary.lost, naive.summary.lost),
        ("still held by the clients", ours.summary.unsent + ours.summary.sent - ours.summary.accepted,
         naive.summary.unsent + naive.summary.sent - naive.summary.accepted),
        ("sessions reset", ours.summary.sessions_reset, naive.summary.sessions_reset),
        ("relays SIGKILLed", ours.killed, naive.killed),
        ("messages left on removed pods", ours.stranded, naive.stranded),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'drain-first (operator)':>24}  {'naive (no drain)':>18}"]
    lines += [f"{label:<{width}}  {a:>24,}  {b:>18,}" for label, a, b in rows]
    return "\n".join(lines)


def render(result: RunResult, script: Script, out: Path, stamp: str) -> Path:
    title = ("mailrelay-operator demo: drain-first scaling" if result.mode == "operator"
             else "same load, naive scaling: no drain (HPA-style SIGTERM)")
    events: list[timeline.Event] = []
    if result.node_loss is not None:
        title += ", persistent spools, a node lost"
        events.append(timeline.Event(result.node_loss.t, result.node_loss.label(result.delivered)))
    path = out / f"mailrelay-demo-{result.mode}-{stamp}.png"
    return timeline.render_png(result.samples, script.phases, path, title,
                               footer=summary_line(result.summary), events=events)


async def main_async(args: argparse.Namespace) -> int:
    script = QUICK if args.quick else FULL
    out = Path(args.out)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    live = sys.stdout.isatty() and not args.no_live
    modes = ["operator"] + (["naive"] if args.compare_naive else [])
    if args.naive_only:
        modes = ["naive"]
    results: dict[str, RunResult] = {}
    root = Path(tempfile.mkdtemp(prefix="mailrelay-demo-"))
    try:
        await asyncio.to_thread(kubecluster.ensure_binaries)
        cluster = await asyncio.to_thread(kubecluster.start, root / "kube")
    except (kubecluster.ClusterError, OSError, RuntimeError) as error:
        print(f"demo failed: the control plane did not start: {error}", file=sys.stderr)
        print(f"(logs kept in {root})", file=sys.stderr)
        return 1
    try:
        print(cluster.describe())
        print(f"(started in {cluster.started_in:.1f} s; `export KUBECONFIG={cluster.kubeconfig}` to look "
              "with kubectl while it runs)")
        platform = await asyncio.to_thread(scenario.install, cluster, root)
        print(f"installed: kubectl apply -f crds/; helm install {scenario.RELEASE} charts/mailrelay-operator "
              f"-n {scenario.OPERATOR_NAMESPACE} (the operator runs with its ServiceAccount's token)")
        for mode in modes:
            workdir = root / mode
            workdir.mkdir()
            heading = ("drain-first: the real operator scales the relays" if mode == "operator"
                       else "naive: HPA-style scaling, relays stopped by SIGTERM without drain")
            if mode == "operator" and args.spool == "persistent":
                heading += " (persistent spools; a node is lost while the upstream throttles)"
            print(f"== {heading} ({script.end:.0f} s of load, then the queues settle)")
            try:
                result = await Demo(platform, mode, script, workdir, live=live, out=out,
                                    persistent=args.spool == "persistent").run()
            except (RuntimeError, apiclient.ApiError) as error:
                print(f"demo failed: {error}", file=sys.stderr)
                print(f"(logs kept in {root})", file=sys.stderr)
                args.keep = True
                return 1
            result.png = render(result, script, out, stamp)
            results[mode] = result
            print(summary_line(result.summary))
            if result.node_loss is not None:
                print(result.node_loss.report(result.delivered))
            if held_line(result.summary):
                print(held_line(result.summary))
            if result.queued_at_end:
                print(f"({result.queued_at_end:,} messages were still queued on running relays when the "
                      "demo stopped: they count as not delivered above)")
            print(f"chart: {result.png}")
    finally:
        await asyncio.to_thread(cluster.stop)
        if args.keep:
            print(f"(sandbox files kept in {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if "naive" in results and "operator" in results:
        print()
        print(comparison(results["operator"], results["naive"]))
    if os.environ.get("MAILRELAY_DEMO_DEBUG"):
        for result in results.values():
            for t in result.terminations:
                print(f"{result.mode} {t.pod}: exit {t.exited_at - t.signalled_at:.1f}s, finalized "
                      f"{t.finalized_at - t.signalled_at:.1f}s, rc {t.returncode}, spool {t.spool_left}")
    ours = results.get("operator")
    if ours is None:
        return 0
    lost = ours.summary.lost + (ours.node_loss.lost(ours.delivered) if ours.node_loss else 0)
    return 3 if lost else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mailrelay_sandbox.demo",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--compare-naive", action="store_true",
                        help="run the same load again with drain turned off and compare")
    parser.add_argument("--naive-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a shorter scenario (about 70 s)")
    parser.add_argument("--spool", choices=("emptyDir", "persistent"), default="emptyDir",
                        help="the relays' spool mode; persistent adds a \"node lost\" step")
    parser.add_argument("--out", default=os.environ.get("MAILRELAY_DEMO_OUT", "build/demo"),
                        help="folder for the PNG charts (default: build/demo)")
    parser.add_argument("--keep", action="store_true", help="keep the sandbox's files (logs, spools)")
    parser.add_argument("--no-live", action="store_true", help="print one line per second, no redraw")
    args = parser.parse_args(argv)
    args.out = os.path.abspath(args.out)
    logging.basicConfig(level=logging.ERROR)
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
