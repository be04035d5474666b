"""A live stack for the observability tests: real relays, the real operator, a real Prometheus.

What it is for: one scenario, run once per test session (tests/chart/conftest.py), whose results several
tests read:

- the emulated API server (sandbox kubeemu) and the simulated control plane, which runs every relay pod
  as a real `mailrelay-relay` process on its own loopback address;
- an upstream sink (sandbox sink) that rejects one recipient with 550, so dead-letters happen;
- the real `mailrelay-operator`, started with the args the chart renders for its Deployment (ports moved
  to free ones), with its own token, so the API requests it makes can be told apart from the control
  plane's;
- the Debian `prometheus` on loopback with a temporary config and storage, loading the alert rules and
  scraping with the jobs and relabeling rules of docs/observability.md (jobs `mailrelay-relay` and
  `mailrelay-operator`, labels `namespace`/`mailrelay`/`pod`, as the chart's PodMonitors set them). That
  Prometheus build has no Kubernetes discovery, so file discovery hands it the same targets with the
  pod meta labels Kubernetes discovery would give, including ports the relabeling must drop;
- SMTP load through smtplib: enough sessions to overload a MailRelay capped at 2 relays (so it scales
  up, sheds with 421 and reports Overloaded), a message with too many recipients (452), a message to the
  rejected recipient (dead-letter); then quiet, so the operator drains a relay and scales down; then the
  MailRelay is deleted (finalizer path).

What it must not do: leave processes behind, or reach anything but loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.chart import helmutil, promql

NAMESPACE = "mail"
NAME = "outbound"
OPERATOR_TOKEN = "operator-token"
BOUNCE = "bounce@example.org"
SCRAPE = "1s"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RecordedCall:
    method: str
    path: str
    params: dict[str, str]


@dataclass
class Stack:
    prometheus_url: str = ""
    started: float = 0.0
    finished: float = 0.0
    operator_calls: list[RecordedCall] = field(default_factory=list)
    operator_args: list[str] = field(default_factory=list)
    liveness_status: int | None = None
    events: list[str] = field(default_factory=list)  # what the scenario saw happen, for failure messages
    error: BaseException | None = None
    prometheus_process: subprocess.Popen[bytes] | None = None
    targets: dict[str, Any] = field(default_factory=dict)  # /api/v1/targets right after the load
    workdir: Path | None = None

    def note(self, text: str) -> None:
        self.events.append(f"{time.time() - self.started:6.1f}s {text}")

    def query_range(self, expr: str, start: float | None = None, step: str = "1s") -> list[dict[str, Any]]:
        params = urllib.parse.urlencode(
            {
                "query": expr,
                "start": f"{start or self.started:.3f}",
                "end": f"{self.finished:.3f}",
                "step": step,
            }
        )
        with urllib.request.urlopen(f"{self.prometheus_url}/api/v1/query_range?{params}", timeout=30) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def label_values(self, label: str, match: str) -> list[str]:
        params = urllib.parse.urlencode(
            {"match[]": match, "start": f"{self.started:.3f}", "end": f"{self.finished:.3f}"}
        )
        with urllib.request.urlopen(
            f"{self.prometheus_url}/api/v1/label/{label}/values?{params}", timeout=30
        ) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return list(body["data"])


def _prometheus_config(workdir: Path) -> Path:
    """The scrape jobs of docs/observability.md, with Kubernetes discovery replaced by files whose targets
    carry the pod meta labels Kubernetes discovery would give (see `_pod_target`)."""
    jobs = []
    for job in promql.docs_prometheus_config()["scrape_configs"]:
        job = dict(job)
        job.pop("kubernetes_sd_configs")
        job["file_sd_configs"] = [
            {"files": [str(workdir / f"{job['job_name']}.json")], "refresh_interval": "1s"}
        ]
        jobs.append(job)
    config = {
        "global": {"scrape_interval": SCRAPE, "evaluation_interval": SCRAPE, "scrape_timeout": SCRAPE},
        "rule_files": [str(promql.ALERTS_FILE)],
        "scrape_configs": jobs,
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _pod_target(
    address: str, *, namespace: str, pod: str, labels: dict[str, str], port_name: str
) -> dict[str, Any]:
    """A target as Kubernetes pod discovery describes one container port."""
    meta = {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_container_port_name": port_name,
    }
    for key, value in labels.items():
        meta["__meta_kubernetes_pod_label_" + key.replace(".", "_").replace("/", "_").replace("-", "_")] = (
            value
        )
    return {"targets": [address], "labels": meta}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _chart_operator_args(health_port: int, metrics_port: int) -> list[str]:
    docs = helmutil.template(
        sets=[f"operator.healthPort={health_port}", f"operator.metricsPort={metrics_port}"]
    )
    (deploy,) = helmutil.by_kind(docs, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return [*container["args"], "--metrics-host=127.0.0.1"]


def _smtp_session(host: str, port: int, *, rcpts: list[str], hold: float) -> str:
    """One client session: a message, then `hold` seconds idle before QUIT. Returns what happened."""
    try:
        with smtplib.SMTP(host, port, timeout=20) as client:
            client.ehlo("load.test")
            refused = client.sendmail("load@example.com", rcpts, b"Subject: load\r\n\r\nhello\r\n")
            time.sleep(hold)
            return "refused-rcpt" if refused else "sent"
    except smtplib.SMTPConnectError as exc:
        return f"connect-{exc.smtp_code}"
    except smtplib.SMTPRecipientsRefused:
        return "all-rcpts-refused"
    except (smtplib.SMTPException, OSError) as exc:
        return f"error-{type(exc).__name__}"


async def _load(plane: Any, stack: Stack, seconds: float, sessions: int, hold: float) -> dict[str, int]:
    """Keep `sessions` concurrent client sessions going against the ready relays for `seconds`."""
    outcomes: dict[str, int] = {}
    deadline = time.monotonic() + seconds

    async def worker(index: int) -> None:
        turn = 0
        while time.monotonic() < deadline:
            endpoints = plane.endpoints()
            if not endpoints:
                await asyncio.sleep(0.2)
                continue
            endpoint = endpoints[(index + turn) % len(endpoints)]
            turn += 1
            rcpts = [f"user{index}@example.org"]
            if index == 0 and turn % 5 == 1:
                rcpts = [f"r{i}@example.org" for i in range(12)]  # more than maxRecipients: 452
            if index == 1 and turn % 5 == 1:
                rcpts = [BOUNCE]  # the upstream answers 550: dead-letter
            result = await asyncio.to_thread(
                _smtp_session, endpoint.host, endpoint.port, rcpts=rcpts, hold=hold
            )
            outcomes[result] = outcomes.get(result, 0) + 1
            if result.startswith("connect-"):
                await asyncio.sleep(0.3)  # refused (421): back off a little, as an MTA would (longer)

    await asyncio.gather(*(worker(i) for i in range(sessions)))
    stack.note(f"load done: {outcomes}")
    return outcomes


async def _publish_targets(plane: Any, path: Path, stop: asyncio.Event) -> None:
    """Keep the relay targets equal to the running relay pods: each pod's admin port, and its smtp port as
    a decoy that the scrape config's relabeling must drop."""
    from mailrelay_operator import manifests

    while not stop.is_set():
        targets = []
        for name, runtime in list(plane.runtimes.items()):
            labels = manifests.labels(NAME)
            for port, port_name in ((runtime.admin_port, "admin"), (runtime.smtp_port, "smtp")):
                targets.append(
                    _pod_target(
                        f"{runtime.ip}:{port}",
                        namespace=NAMESPACE,
                        pod=name,
                        labels=labels,
                        port_name=port_name,
                    )
                )
        _write_json(path, targets)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.5)


async def _wait(check: Any, within: float, what: str, stack: Stack) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            stack.note(what)
            return True
        await asyncio.sleep(0.3)
    stack.note(f"TIMEOUT waiting for: {what}")
    return False


async def _crash_one_relay(plane: Any, stack: Stack, after: float) -> None:
    await asyncio.sleep(after)
    for name, runtime in list(plane.runtimes.items()):
        if runtime.process is not None and runtime.process.returncode is None and not runtime.terminating:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(runtime.process.pid, signal.SIGKILL)
            stack.note(f"killed relay {name}")
            return


OWNED_PATHS = (
    f"/api/v1/namespaces/{NAMESPACE}/secrets/{NAME}-admin",
    f"/api/v1/namespaces/{NAMESPACE}/services/{NAME}",
    f"/apis/policy/v1/namespaces/{NAMESPACE}/poddisruptionbudgets/{NAME}",
    f"/apis/networking.k8s.io/v1/namespaces/{NAMESPACE}/networkpolicies/{NAME}",
)


async def _tamper_and_update(client: Any, api: Any, stack: Stack) -> None:
    """Someone edits the owned objects by hand, then the MailRelay's spec changes: the operator repairs
    the drift (this is the path that patches Secrets, Services, PDBs and NetworkPolicies)."""
    from mailrelay_sandbox import scenario

    for path in OWNED_PATHS:
        await client.patch(path, {"metadata": {"labels": {"app.kubernetes.io/managed-by": "someone-else"}}})
    await client.patch(scenario.mailrelay_path(NAMESPACE, NAME), {"spec": {"limits": {"maxRecipients": 11}}})

    async def repaired() -> bool:
        for path in OWNED_PATHS:
            obj = await client.request("GET", path)
            if obj["metadata"]["labels"].get("app.kubernetes.io/managed-by") != "mailrelay-operator":
                return False
        return True

    await _wait(repaired, 30, "hand edits of owned objects repaired", stack)


def _operator_metric(port: int, name: str, labels: str = "") -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _scenario(stack: Stack, workdir: Path, prometheus: str) -> None:
    from mailrelay_sandbox import controlplane, kubeemu, scenario, sink

    upstream = sink.Sink(keep_content=False)
    upstream.start()
    upstream.fail("rcpt", 550, recipients={BOUNCE})
    health_port, metrics_port, prom_port = free_port(), free_port(), free_port()
    stack.prometheus_url = f"http://127.0.0.1:{prom_port}"
    prom_dir = workdir / "prometheus"
    prom_dir.mkdir()
    (workdir / "mailrelay-relay.json").write_text("[]")
    operator_labels = {"app.kubernetes.io/name": "mailrelay-operator", "app.kubernetes.io/instance": "mr"}
    _write_json(
        workdir / "mailrelay-operator.json",
        [
            _pod_target(
                f"127.0.0.1:{port}",
                namespace="mailrelay-system",
                pod="mr-operator",
                labels=operator_labels,
                port_name=port_name,
            )
            for port, port_name in ((metrics_port, "metrics"), (health_port, "health"))
        ],
    )
    prom = _start_prometheus(prometheus, workdir, prom_dir, prom_port)
    stack.prometheus_process = prom  # stays up for the queries; `running` stops it
    await asyncio.to_thread(_wait_prometheus_ready, stack.prometheus_url)
    operator: asyncio.subprocess.Process | None = None
    stop_targets = asyncio.Event()
    try:
        async with kubeemu.serve(namespaces=[NAMESPACE], graceful_pod_deletion=True) as api:
            kubeconfig = kubeemu.write_kubeconfig(
                workdir / "operator.kubeconfig", api.url, token=OPERATOR_TOKEN
            )
            async with controlplane.ControlPlane(
                api.url,
                NAMESPACE,
                workdir / "pods",
                upstream.address,
                extra_env={"MAILRELAY_LOG_LEVEL": "warning"},
            ) as plane:
                targets = asyncio.create_task(
                    _publish_targets(plane, workdir / "mailrelay-relay.json", stop_targets)
                )
                stack.operator_args = _chart_operator_args(health_port, metrics_port)
                env = {**os.environ, "KUBECONFIG": str(kubeconfig), "POD_NAMESPACE": "mailrelay-system"}
                with (workdir / "operator.log").open("wb") as log:
                    operator = await asyncio.create_subprocess_exec(
                        str(Path(sys.executable).with_name("mailrelay-operator")),
                        *stack.operator_args,
                        env=env,
                        stdout=log,
                        stderr=log,
                        start_new_session=True,
                    )
                stack.started = time.time()
                stack.note("operator started")
                relay = scenario.mailrelay(
                    NAME,
                    NAMESPACE,
                    min_replicas=1,
                    max_replicas=2,
                    interval=1,
                    sessions_per_pod=2,
                    max_sessions_per_pod=3,
                    scale_down_stabilization=2,
                    drain_timeout=20,
                )
                async with controlplane.Api(api.url) as client:
                    await client.request("POST", scenario.mailrelay_path(NAMESPACE), relay)
                    await _wait(lambda: len(plane.endpoints()) >= 1, 90, "first relay ready", stack)
                    stack.liveness_status = await asyncio.to_thread(
                        _get_status, f"http://127.0.0.1:{health_port}/healthz"
                    )
                    await _tamper_and_update(client, api, stack)
                    # Load: 8 concurrent sessions against at most 2 relays x 3 sessions: overload, 421s.
                    # Midway, one relay crashes (SIGKILL) and is restarted by the kubelet: the operator's
                    # /status scrapes of it fail meanwhile, and Prometheus sees it down.
                    await asyncio.gather(
                        _load(plane, stack, seconds=25, sessions=8, hold=1.0),
                        _crash_one_relay(plane, stack, after=10),
                    )
                    stack.targets = await asyncio.to_thread(_targets, stack.prometheus_url)
                    await _wait(
                        lambda: (
                            _operator_metric(
                                metrics_port, "mailrelay_operator_scale_events_total", 'direction="up"'
                            )
                            >= 1
                        ),
                        30,
                        "scaled up",
                        stack,
                    )
                    # Quiet, with a trickle: the operator drains one relay and scales down.
                    trickle = asyncio.create_task(_load(plane, stack, seconds=15, sessions=1, hold=0.0))
                    await _wait(
                        lambda: (
                            _operator_metric(metrics_port, "mailrelay_operator_drain_duration_seconds_count")
                            >= 1
                        ),
                        60,
                        "a drain finished",
                        stack,
                    )
                    await trickle
                    # Delete: the finalizer drains the last relay, then lets the objects go.
                    await client.request("DELETE", scenario.mailrelay_path(NAMESPACE, NAME))
                    await _wait(
                        lambda: api.emulator.peek(kubeemu.MAILRELAYS, NAMESPACE, NAME) is None,
                        60,
                        "MailRelay deleted (finalizer released)",
                        stack,
                    )
                    await asyncio.sleep(3)  # a few more scrapes
                    stack.finished = time.time()
                stop_targets.set()
                await targets
            # Operator requests: those sent with the operator's token, as (method, path, params).
            for request in api.emulator:
                if request.headers.get("Authorization") == f"Bearer {OPERATOR_TOKEN}":
                    stack.operator_calls.append(
                        RecordedCall(
                            str(getattr(request.method, "value", request.method)).upper(),
                            request.url.path,
                            dict(request.params),
                        )
                    )
            if operator is not None and operator.returncode is None:
                operator.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(operator.wait(), timeout=15)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(operator.pid, signal.SIGKILL)
                    await operator.wait()
    finally:
        if operator is not None and operator.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(operator.pid, signal.SIGKILL)
        upstream.stop()
        stack.note("scenario over")


def _start_prometheus(prometheus: str, workdir: Path, storage: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            prometheus,
            f"--config.file={_prometheus_config(workdir)}",
            f"--storage.tsdb.path={storage}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "prometheus.log").open("wb"),
        start_new_session=True,
    )


def _targets(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/api/v1/targets?state=any", timeout=10) as response:
        return dict(json.loads(response.read())["data"])


def _get_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def _wait_prometheus_ready(url: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if _get_status(f"{url}/-/ready") == 200:
            return
        time.sleep(0.3)
    raise AssertionError("prometheus did not become ready")


@contextlib.contextmanager
def running(prometheus: str) -> Iterator[Stack]:
    """Run the scenario (in a thread with its own event loop), then yield the stack for queries."""
    stack = Stack()
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-live-"))

    def run() -> None:
        try:
            asyncio.run(_scenario(stack, workdir, prometheus))
        except BaseException as exc:  # handed to the tests
            stack.error = exc

    thread = threading.Thread(target=run, name="live-stack", daemon=True)
    thread.start()
    thread.join(timeout=400)
    prom = stack.prometheus_process
    stack.workdir = workdir
    try:
        yield stack
    finally:
        if prom is not None:
            prom.send_signal(signal.SIGTERM)
            try:
                prom.wait(timeout=20)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait()
        shutil.rmtree(workdir, ignore_errors=True)
