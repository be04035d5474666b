"""Operator footprint (issue 3 "Performance", issue 6 §1.4): one `mailrelay-operator` with 200 MailRelays of 3
emulated pods each, at 5 s intervals; its CPU (% of one core, from /proc over a steady window) and RSS.

How: the real control plane (`mailrelay_sandbox.kubecluster`: etcd, kube-apiserver, controller-manager
with the real Deployment and ReplicaSet controllers, scheduler), with the CRD and the chart installed as
the README says; the operator runs with the chart's ServiceAccount token. The MailRelays are spread over
20 namespaces (10 each), all pinned to one node, and created 25 at a time, each batch once the previous
one is ready. The node's kubelet is `FootprintKubelet`: the sandbox's process kubelet with the relay
containers emulated, which gives every pod bound to it a pod IP and reports it Running and Ready at once.
The relays behind those pods are emulated: 600 real
relay processes are too heavy for a 2-core machine, and the subject under test is the operator, not the
relay. One lightweight aiohttp process (this module, `--serve-admin`) binds one listener per pod address
and answers the admin API of docs/contracts.md (`/status`, `/drain`, `/resume` with the pod's bearer
token, `/healthz`, `/readyz`), with the same JSON: 5 sessions per pod (exactly the target, so the count
stays at 3) and a queue of 0-5 messages that changes on every scrape, so the operator patches each
MailRelay's status on most ticks (the busy steady state); `--quiet` keeps the queue at 0, so the status
does not change and is not patched (the idle steady state). The real operator runs as a
subprocess, exactly as in the demo. Once every MailRelay reports 3 ready relays, the operator's process
tree is sampled from /proc over the window: CPU = (utime + stime) delta / wall time, RSS and PSS from
smaps_rollup. The admin server's request counter checks that the operator really scraped every pod every
interval during the window. The operator's request rate to the API server comes from the API server's own
metrics: `apiserver_flowcontrol_dispatched_requests_total` of the `service-accounts` FlowSchema, which only
the operator's ServiceAccount falls in (the controllers use kube-system accounts, the scheduler its own
schema, the kubelet and the bench an exempt identity), with `apiserver_request_total` by verb and
resource over the same window for context.

What it must not do: judge (it prints the targets beside the figures) or leave processes behind.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import aiohttp.web
from mailrelay_sandbox import apiclient, kubecluster, kubelet, proctree, scenario

from bench import environment, profile, report

BATCH = 25              # MailRelays created at a time, the next batch once these are ready
NAMESPACE_COUNT = 20    # the MailRelays are spread over 20 namespaces, 10 each at full size


def namespace_of(index: int) -> str:
    return f"bench-{index % NAMESPACE_COUNT:02d}"

NODE = "bench-footprint"
ADMIN_PORT = 8025       # the relays' admin port in the operator's pod template
PODS_PER_RELAY = 3
SESSIONS_PER_POD = 5
CPU_TARGET_PERCENT = 25.0
RSS_TARGET_MIB = 250.0


@dataclass(frozen=True)
class Config:
    relays: int
    interval: int
    window: float  # seconds of steady state measured
    warmup: float  # seconds after every MailRelay is ready, before the window
    quiet: bool = False  # the relays' queue stays 0: the operator's status patch is skipped (idle state)
    profile: pathlib.Path | None = None  # py-spy's collapsed stacks of the operator over the window


FULL = Config(relays=200, interval=5, window=90.0, warmup=15.0)
QUICK = Config(relays=5, interval=1, window=8.0, warmup=1.0)


# --- the emulated relays' admin API (runs in its own process) -------------------------------------


class AdminServer:
    """Admin endpoints of many emulated relays: one listener per pod address, one shared app."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.tokens: dict[str, str] = {}
        self.draining: dict[str, bool] = {}
        self.requests: dict[str, int] = {"status": 0, "drain": 0, "resume": 0, "unauthorized": 0}
        self.app = aiohttp.web.Application()
        self.app.router.add_get("/status", self.status)
        self.app.router.add_post("/drain", self.drain)
        self.app.router.add_post("/resume", self.resume)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.runner = aiohttp.web.AppRunner(self.app, access_log=None)
        self.control = aiohttp.web.Application()
        self.control.router.add_post("/pods", self.add_pods)
        self.control.router.add_get("/stats", self.stats)
        self.control_runner = aiohttp.web.AppRunner(self.control, access_log=None)
        self.port = 0

    @staticmethod
    def _ip(request: aiohttp.web.Request) -> str:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        return str(sockname[0]) if sockname else ""

    def _body(self, ip: str) -> dict[str, Any]:
        draining = self.draining.get(ip, False)
        sessions = 0 if draining else SESSIONS_PER_POD
        queued = 0 if draining or self.quiet else random.randint(0, 5)
        return {
            "draining": draining,
            "drained": draining,
            "sessions": sessions,
            "max_sessions": 10,
            "inflight_bytes": 1024 * sessions,
            "queue": {"messages": queued, "bytes": 2048 * queued, "oldest_age_seconds": 0.1 * queued},
            "dead_letter": {"messages": 0},
            "hostname": f"emulated-{ip}",
            "version": "0.1.0",
        }

    def _authorized(self, request: aiohttp.web.Request, ip: str) -> bool:
        token = self.tokens.get(ip)
        if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
            self.requests["unauthorized"] += 1
            return False
        return True

    async def _answer(self, request: aiohttp.web.Request, kind: str) -> aiohttp.web.Response:
        ip = self._ip(request)
        if not self._authorized(request, ip):
            return aiohttp.web.Response(status=401, text="unauthorized")
        if kind == "drain":
            self.draining[ip] = True
        elif kind == "resume":
            self.draining[ip] = False
        self.requests[kind] += 1
        return aiohttp.web.json_response(self._body(ip))

    async def status(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        return await self._answer(request, "status")

    async def drain(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        return await self._answer(request, "drain")

    async def resume(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        return await self._answer(request, "resume")

    async def healthz(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(text="ok")

    async def readyz(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        draining = self.draining.get(self._ip(request), False)
        return aiohttp.web.Response(status=503 if draining else 200, text="draining" if draining else "ok")

    async def add_pods(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        """Control: `[{"ip": ..., "token": ...}]`: start listening on each new address."""
        for pod in await request.json():
            ip = str(pod["ip"])
            if ip not in self.tokens:
                await aiohttp.web.TCPSite(self.runner, ip, self.port, reuse_address=True).start()
            self.tokens[ip] = str(pod["token"])
        return aiohttp.web.json_response({"pods": len(self.tokens)})

    async def stats(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"pods": len(self.tokens), **self.requests})


async def serve_admin(port: int, control_port: int, quiet: bool) -> None:
    server = AdminServer(quiet)
    server.port = port
    await server.runner.setup()
    await server.control_runner.setup()
    await aiohttp.web.TCPSite(server.control_runner, "127.0.0.1", control_port).start()
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.runner.cleanup()
    await server.control_runner.cleanup()


# --- the node: the process kubelet with emulated relays ----------------------------------------


class FootprintKubelet(kubelet.ProcessKubelet):
    """The sandbox's process kubelet, with the relay containers emulated: a pod bound to this node gets a
    pod IP, is registered with the admin server (its token from the MailRelay's admin Secret), and is
    reported Running and Ready at once. Deletion ends with the kubelet's final DELETE, as usual."""

    def __init__(self, cluster: kubecluster.Cluster, workdir: pathlib.Path, control_url: str) -> None:
        super().__init__(cluster.url, cluster.kubelet_token, cluster.ca_file, NODE, workdir, "unused:25",
                         sync_period=2.0, observe_status=False)
        self.control_url = control_url
        self.tokens: dict[tuple[str, str], str] = {}

    async def _token(self, namespace: str, relay: str) -> str | None:
        if (namespace, relay) not in self.tokens:
            secret = await self.api.get_or_none(f"/api/v1/namespaces/{namespace}/secrets/{relay}-admin")
            raw = ((secret or {}).get("data") or {}).get("token")
            if raw is None:
                return None
            self.tokens[namespace, relay] = base64.b64decode(raw).decode()
        return self.tokens[namespace, relay]

    async def start_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        token = await self._token(meta["namespace"], meta["labels"]["app.kubernetes.io/instance"])
        if token is None:
            return  # the Secret is not there yet: the next sync tries again
        ip = self._allocate_ip()
        assert self._http is not None
        async with self._http.post(f"{self.control_url}/pods", json=[{"ip": ip, "token": token}]) as answer:
            answer.raise_for_status()
        runtime = kubelet.PodRuntime(
            name=meta["name"], namespace=meta["namespace"], uid=str(meta.get("uid")), ip=ip,
            ports={"admin": ADMIN_PORT}, workdir=self.workdir, spool=self.workdir / "none", token_file=None,
            grace=float(pod["spec"].get("terminationGracePeriodSeconds", 30)), ready=True, started=True)
        self.runtimes[runtime.name] = runtime
        started = kubelet.now_iso()
        await self._report(runtime, started, started)

    async def stop_pod(self, runtime: kubelet.PodRuntime, grace: float, *, finalize: bool) -> None:
        self.runtimes.pop(runtime.name, None)
        if finalize:
            await self._finalize(runtime.namespace, runtime.name, runtime.uid)


def apiserver_counts(cluster: kubecluster.Cluster) -> dict[str, float]:
    """The API server's own request counters: dispatched requests per FlowSchema, requests per verb and
    resource (summed over the other labels)."""
    request = urllib.request.Request(cluster.url + "/metrics",
                                     headers={"Authorization": f"Bearer {cluster.admin_token}"})
    with urllib.request.urlopen(request, context=cluster.ssl_context(), timeout=30) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("apiserver_flowcontrol_dispatched_requests_total{"):
            key = "flow_schema=" + _label(line, "flow_schema")
        elif line.startswith("apiserver_request_total{"):
            key = f"{_label(line, 'verb')} {_label(line, 'resource')}"
        else:
            continue
        counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def _label(line: str, name: str) -> str:
    marker = f'{name}="'
    start = line.find(marker)
    if start < 0:
        return ""
    start += len(marker)
    return line[start:line.index('"', start)]


# --- the measurement ------------------------------------------------------------------------------


async def all_ready(api: apiclient.Api) -> int:
    """How many MailRelays report readyReplicas == 3 in their status."""
    ready = 0
    for relay in await api.items("/apis/mailrelay.dev/v1alpha1/mailrelays"):
        if int((relay.get("status") or {}).get("readyReplicas") or 0) == PODS_PER_RELAY:
            ready += 1
    return ready


async def _stats(http: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with http.get(f"{url}/stats") as response:
        result: dict[str, int] = await response.json()
        return result


def start_admin_server(workdir: pathlib.Path, quiet: bool) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start the emulated relays' admin server (this module, `--serve-admin`); wait for its "ready"."""
    admin_port = ADMIN_PORT
    control_port = scenario.free_port()
    command = [sys.executable, "-m", "bench.operator_footprint", "--serve-admin", str(admin_port),
               "--control-port", str(control_port), *(["--quiet"] if quiet else [])]
    with (workdir / "admin.log").open("wb") as log:
        admin = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    assert admin.stdout is not None
    if admin.stdout.readline().strip() != b"ready":
        proctree.stop(admin)
        raise RuntimeError(f"admin server did not start: {(workdir / 'admin.log').read_text()}")
    return admin, admin_port, control_port


async def create_relays(api: apiclient.Api, cfg: Config, indexes: range) -> None:
    for index in indexes:
        relay = scenario.mailrelay(
            f"relay-{index:03d}", namespace_of(index), min_replicas=PODS_PER_RELAY, max_replicas=6,
            interval=cfg.interval, sessions_per_pod=SESSIONS_PER_POD, max_sessions_per_pod=10,
            scale_down_stabilization=300, drain_timeout=600)
        await api.request("POST", scenario.mailrelay_path(namespace_of(index)), relay)


async def measure(cfg: Config, workdir: pathlib.Path, admin_port: int, control_port: int) -> dict[str, Any]:
    rng = random.Random()
    control_url = f"http://127.0.0.1:{control_port}"
    namespaces = sorted({namespace_of(index) for index in range(cfg.relays)})
    async with scenario.platform(workdir) as platform:
        cluster = platform.cluster
        for namespace in namespaces:
            await asyncio.to_thread(cluster.create_namespace, namespace, node=NODE)
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
            cluster.api(timeout=60) as api,
            FootprintKubelet(cluster, workdir / "pods", control_url) as node,
        ):
            node._subnet = (rng.randint(0, 1), rng.randint(0, 150))
            operator = scenario.OperatorProcess(
                platform.operator_kubeconfig,
                namespaces[0],
                workdir / "operator.log",
                *(arg for namespace in namespaces[1:] for arg in ("--namespace", namespace)),
                "--liveness",
                "",
                "--metrics-port",
                str(scenario.free_port()),
                "--metrics-host",
                "127.0.0.1",
            )
            started = time.monotonic()
            await operator.start()
            try:
                assert operator.process is not None
                pid = operator.process.pid
                deadline = started + max(300.0, cfg.relays * 3.0)
                created = 0
                while (ready := await all_ready(api)) < cfg.relays:
                    if ready >= created:  # created in batches (see the docstring)
                        batch = range(created, min(created + BATCH, cfg.relays))
                        await create_relays(api, cfg, batch)
                        created = batch.stop
                    if not operator.running:
                        raise RuntimeError(f"mailrelay-operator exited:\n{operator.log_tail()}")
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"only {ready} of {cfg.relays} MailRelays "
                            f"ready after {deadline - started:.0f}s\n{operator.log_tail()}"
                        )
                    await asyncio.sleep(2.0)
                startup = time.monotonic() - started
                rss_start, _ = proctree.memory_kib(proctree.tree(pid))
                await asyncio.sleep(cfg.warmup)
                load_start = os.getloadavg()
                before = await _stats(http, control_url)
                requests_before = await asyncio.to_thread(apiserver_counts, cluster)
                spy = start_profile(pid, cfg)
                cpu0 = proctree.cpu_seconds(proctree.tree(pid))
                t0 = time.monotonic()
                rss_samples: list[int] = []
                pss_samples: list[int] = []
                while time.monotonic() - t0 < cfg.window:
                    rss, pss = proctree.memory_kib(proctree.tree(pid))
                    rss_samples.append(rss)
                    pss_samples.append(pss)
                    await asyncio.sleep(min(2.0, max(0.0, cfg.window - (time.monotonic() - t0))))
                cpu1 = proctree.cpu_seconds(proctree.tree(pid))
                elapsed = time.monotonic() - t0
                requests_after = await asyncio.to_thread(apiserver_counts, cluster)
                if spy is not None:
                    await asyncio.to_thread(spy.wait)
                after = await _stats(http, control_url)
                load_end = os.getloadavg()
                if not operator.running:
                    raise RuntimeError(f"mailrelay-operator exited:\n{operator.log_tail()}")
                command = " ".join(operator.command)
            finally:
                await operator.stop()
            pods = len(await api.items(f"/api/v1/pods?fieldSelector=spec.nodeName%3D{NODE}"))
            control_plane = cluster.describe()
    rates = {key: (requests_after.get(key, 0.0) - requests_before.get(key, 0.0)) / elapsed
             for key in requests_after}
    scrapes = after["status"] - before["status"]
    expected = cfg.relays * PODS_PER_RELAY * elapsed / cfg.interval
    return {
        "relays": cfg.relays,
        "pods": pods,
        "interval_seconds": cfg.interval,
        "window_seconds": elapsed,
        "cpu_percent_of_one_core": 100.0 * (cpu1 - cpu0) / elapsed,
        "rss_mib_max": max(rss_samples) / 1024,
        "rss_mib_end": rss_samples[-1] / 1024,
        "pss_mib_max": max(pss_samples) / 1024,
        "rss_mib_after_startup": rss_start / 1024,
        "startup_seconds": startup,
        "status_scrapes": scrapes,
        "status_scrapes_expected": expected,
        "drains": after["drain"] - before["drain"],
        "unauthorized": after["unauthorized"],
        "operator_command": command,
        "control_plane": control_plane,
        "operator_requests_per_second": rates.get("flow_schema=service-accounts", 0.0),
        "operator_requests_total": requests_after.get("flow_schema=service-accounts", 0.0),
        "apiserver_requests_per_second": {k: v for k, v in sorted(rates.items())
                                          if v > 0 and not k.startswith("flow_schema=")},
        "quiet": cfg.quiet,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
    }


def start_profile(pid: int, cfg: Config) -> subprocess.Popen[bytes] | None:
    """py-spy over the operator for the window (`--profile`): it samples from outside, at 50 Hz, without
    stopping the process (`--nonblocking`), so the CPU figure barely moves; the stacks say where it goes."""
    if cfg.profile is None:
        return None
    spy = profile.spy_path()
    if spy is None:
        raise RuntimeError("--profile needs py-spy (the test extras install it)")
    cfg.profile.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--duration", str(int(cfg.window)), "--rate", "50",
         "--nonblocking", "--format", "raw", "--output", str(cfg.profile)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(out: report.Report, cfg: Config, *, keep: bool = False) -> dict[str, Any]:
    out.section(
        f"Operator footprint: {cfg.relays} MailRelays x {PODS_PER_RELAY} pods (emulated relays), "
        f"intervalSeconds {cfg.interval}" + (", quiet (constant load: status unchanged)" if cfg.quiet else "")
    )
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="mailrelay-bench-footprint-"))
    admin, admin_port, control_port = start_admin_server(workdir, cfg.quiet)
    try:
        figures = asyncio.run(measure(cfg, workdir, admin_port, control_port))
    finally:
        proctree.stop(admin)
        if keep:
            out.line(f"(logs kept in {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    cpu, rss = figures["cpu_percent_of_one_core"], figures["rss_mib_max"]
    out.line(
        f"{figures['relays']} MailRelays, {figures['pods']} pods ready after "
        f"{figures['startup_seconds']:.0f} s; steady window {figures['window_seconds']:.0f} s "
        f"(after {cfg.warmup:.0f} s warm-up)"
    )
    out.table(
        ["", "measured", "target", "measured / target"],
        [
            [
                "CPU, % of one core",
                f"{cpu:.1f}",
                f"< {CPU_TARGET_PERCENT:.0f}",
                f"{cpu / CPU_TARGET_PERCENT:.2f}x",
            ],
            ["RSS max, MiB", f"{rss:.1f}", f"< {RSS_TARGET_MIB:.0f}", f"{rss / RSS_TARGET_MIB:.2f}x"],
        ],
    )
    out.line(
        f"RSS after start-up {figures['rss_mib_after_startup']:.1f} MiB, at end {figures['rss_mib_end']:.1f} "
        f"MiB, PSS max {figures['pss_mib_max']:.1f} MiB"
    )
    out.line(
        f"/status scrapes in the window: {figures['status_scrapes']:,} of "
        f"{figures['status_scrapes_expected']:,.0f} if every pod were scraped every interval; drains "
        f"{figures['drains']}, unauthorized {figures['unauthorized']}"
    )
    if figures["status_scrapes"]:
        period = figures["pods"] * figures["window_seconds"] / figures["status_scrapes"]
        out.line(f"effective scrape period per pod: {period:.2f} s (intervalSeconds {cfg.interval} plus the "
                 "tick's own duration: the scaling daemon sleeps the interval after each tick)")
    out.line(f"operator requests to the API server: {figures['operator_requests_per_second']:.2f}/s in the "
             f"window, {figures['operator_requests_total']:.0f} since it started "
             "(apiserver_flowcontrol_dispatched_requests_total, FlowSchema service-accounts)")
    busiest = sorted(figures["apiserver_requests_per_second"].items(), key=lambda kv: -kv[1])[:8]
    out.line("all API requests over the window, per second (apiserver_request_total): "
             + ", ".join(f"{key} {rate:.2f}" for key, rate in busiest))
    out.line(figures["control_plane"])
    loads = " / ".join(
        " ".join(f"{x:.1f}" for x in la) for la in (figures["loadavg_start"], figures["loadavg_end"])
    )
    out.line(f"load average at window start / end: {loads}; CPU pressure avg60 {environment.pressure('cpu')}")
    out.record("operator_footprint", figures)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.operator_footprint", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="5 MailRelays, 8 s window: checks the harness")
    parser.add_argument("--relays", type=int, help="number of MailRelays (default 200)")
    parser.add_argument("--window", type=float, help="seconds of steady state measured (default 90)")
    parser.add_argument(
        "--json", type=pathlib.Path, default=pathlib.Path("out/bench/operator_footprint.json")
    )
    parser.add_argument("--keep", action="store_true", help="keep the operator's and admin server's logs")
    parser.add_argument("--quiet", action="store_true",
                        help="constant relay load (queue 0): the status never changes, so it is not patched")
    parser.add_argument("--profile", type=pathlib.Path, metavar="FILE",
                        help="py-spy the operator over the window; collapsed stacks to FILE")
    parser.add_argument("--serve-admin", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--control-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_admin:
        asyncio.run(serve_admin(args.serve_admin, args.control_port, args.quiet))
        return 0
    cfg = QUICK if args.quick else FULL
    cfg = Config(
        relays=args.relays or cfg.relays,
        interval=cfg.interval,
        window=args.window or cfg.window,
        warmup=cfg.warmup,
        quiet=args.quiet,
        profile=args.profile,
    )
    return report.run_module(args.json, lambda out: run(out, cfg, keep=args.keep))


if __name__ == "__main__":
    sys.exit(main())
