"""A live stack for the observability tests: real relays, the real operator, a real Prometheus, on the
session's real control plane.

What it is for: one scenario, run once per test session (tests/chart/conftest.py), whose results the
tests of test_promql_live.py read:

- the session's control plane (tests/kubeenv.py: real etcd, kube-apiserver with RBAC, controller-manager
  and scheduler) and a namespace of the stack's own, pinned to a node of its own; the real Deployment,
  ReplicaSet, EndpointSlice and garbage-collector controllers do their work there;
- a process kubelet for that node (sandbox kubelet, the one simulated part of the cluster): every relay
  pod runs as a real `mailrelay-relay` process on its own pod IP;
- an upstream sink (sandbox sink) that rejects one recipient with 550, so dead-letters happen;
- the real `mailrelay-operator`, started with the args the chart renders for its Deployment (ports moved
  to free ones, `operator.watchNamespaces` set to the stack's namespace: the control plane is shared with
  other tests, so a cluster-wide operator would act on their MailRelays), with a token of the chart's
  ServiceAccount (`kube.operator_kubeconfig`), so the API server enforces the chart's RBAC on every call
  it makes; its log is kept, for the check that nothing was refused (RBAC itself is tested in
  test_rbac.py);
- the Debian `prometheus` on loopback with a temporary config and storage, loading the alert rules and
  scraping with the jobs and relabeling rules of docs/observability.md (jobs `mailrelay-relay` and
  `mailrelay-operator`, labels `namespace`/`mailrelay`/`pod`, as the chart's PodMonitors set them). That
  Prometheus build has no Kubernetes discovery, so file discovery hands it the targets Kubernetes pod
  discovery would give: one per container port of each pod the API server lists (pod IP, port name, pod
  labels), including the ports the relabeling must drop. The operator runs as a local process, not as a
  pod: its target is described from the pod template of the chart's Deployment;
- SMTP load through smtplib, sent to the ready endpoints of the MailRelay's Service (its EndpointSlices,
  as kube-proxy would): enough sessions to overload a MailRelay capped at 2 relays (so it scales up,
  sheds with 421 and reports Overloaded), a message with too many recipients (452), a message to the
  rejected recipient (dead-letter); midway one relay is killed and restarted by its kubelet; then quiet,
  so the operator drains a relay and scales down; then the MailRelay is deleted (finalizer path).

Each step waits for what it needs (a barrier); a step that never happens ends the scenario with an error
that fails every test reading the stack, with the scenario's notes. What it must not do: leave processes
behind, or reach anything but this host (loopback and the pod IPs, local addresses of this host).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mailrelay_sandbox import netutil, waiting

from tests import kubeenv
from tests.chart import helmutil, promql

NAME = "outbound"
BOUNCE = "bounce@example.org"
SCRAPE = "1s"
OPERATOR_NAMESPACE = "mailrelay-system"




@dataclass
class Stack:
    namespace: str = ""
    prometheus_url: str = ""
    started: float = 0.0
    finished: float = 0.0
    operator_args: list[str] = field(default_factory=list)
    operator_log: str = ""
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


class ScenarioError(AssertionError):
    """A step of the scenario did not happen in time."""


def _prometheus_config(workdir: Path) -> Path:
    """The scrape jobs of docs/observability.md, with Kubernetes discovery replaced by files whose targets
    carry the pod meta labels Kubernetes discovery would give (see `_pod_targets`)."""
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


def _label_name(key: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in key)


def _pod_targets(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets Kubernetes pod discovery (role: pod) gives for one pod: one per declared container
    port, at the pod IP, with the pod's meta labels. A pod without an IP yet has none."""
    meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    ip = status.get("podIP")
    if not ip:
        return []
    common = {
        "__meta_kubernetes_namespace": meta.get("namespace", ""),
        "__meta_kubernetes_pod_name": meta["name"],
        "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_node_name": spec.get("nodeName", ""),
        "__meta_kubernetes_pod_phase": status.get("phase", ""),
    }
    for key, value in (meta.get("labels") or {}).items():
        common["__meta_kubernetes_pod_label_" + _label_name(key)] = value
        common["__meta_kubernetes_pod_labelpresent_" + _label_name(key)] = "true"
    targets = []
    for container in spec.get("containers") or []:
        for port in container.get("ports") or []:
            labels = {
                **common,
                "__meta_kubernetes_pod_container_name": container["name"],
                "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP"),
            }
            targets.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": labels})
    return targets


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _chart_operator(namespace: str, health_port: int, metrics_port: int) -> dict[str, Any]:
    """The operator's Deployment as the chart renders it, watching `namespace`, with the given ports."""
    docs = helmutil.template(
        sets=[
            f"operator.healthPort={health_port}",
            f"operator.metricsPort={metrics_port}",
            f"operator.watchNamespaces={{{namespace}}}",
        ]
    )
    (deploy,) = helmutil.by_kind(docs, "Deployment")
    return deploy


def _operator_pod(deploy: dict[str, Any]) -> dict[str, Any]:
    """The operator's pod as the API server would list it (the chart's pod template, on loopback)."""
    template = deploy["spec"]["template"]
    return {
        "metadata": {
            "name": f"{deploy['metadata']['name']}-0",
            "namespace": deploy["metadata"]["namespace"],
            "labels": template["metadata"]["labels"],
        },
        "spec": template["spec"],
        "status": {"podIP": "127.0.0.1", "phase": "Running"},
    }


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


async def _load(endpoints: Callable[[], Sequence[Any]], stack: Stack, seconds: float, sessions: int,
                hold: float) -> dict[str, int]:
    """Keep `sessions` concurrent client sessions going against the Service's ready endpoints."""
    outcomes: dict[str, int] = {}
    deadline = time.monotonic() + seconds

    async def worker(index: int) -> None:
        turn = 0
        while time.monotonic() < deadline:
            ready = endpoints()
            if not ready:
                await asyncio.sleep(0.2)
                continue
            endpoint = ready[(index + turn) % len(ready)]
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


async def _publish_targets(api: Any, namespace: str, path: Path, stop: asyncio.Event) -> None:
    """Keep the relay targets equal to what pod discovery would give for the pods the API server lists in
    the stack's namespace: each container port, the `admin` port and the `smtp` port that the scrape
    config's relabeling must drop."""
    from mailrelay_sandbox import apiclient

    while not stop.is_set():
        with contextlib.suppress(apiclient.ApiError, OSError, TimeoutError):
            pods = await api.items(f"/api/v1/namespaces/{namespace}/pods")
            _write_json(path, [target for pod in pods for target in _pod_targets(pod)])
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.5)


async def _wait(check: Any, within: float, what: str, stack: Stack) -> None:
    """A barrier: poll `check` until true; raise ScenarioError (noted) after `within` seconds."""
    try:
        await waiting.eventually(check, within=within, every=0.3, what=what)
    except TimeoutError:
        stack.note(f"TIMEOUT waiting for: {what}")
        raise ScenarioError(f"timed out after {within:.0f}s waiting for: {what}") from None
    stack.note(what)


async def _crash_one_relay(node: Any, stack: Stack, after: float) -> None:
    await asyncio.sleep(after)  # midway through the load (not a wait for a condition)
    for name, runtime in list(node.runtimes.items()):
        if runtime.process is not None and runtime.process.returncode is None and not runtime.terminating:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(runtime.process.pid, signal.SIGKILL)
            stack.note(f"killed relay {name}")
            return


def _owned_paths(namespace: str) -> tuple[str, ...]:
    return (
        f"/api/v1/namespaces/{namespace}/secrets/{NAME}-admin",
        f"/api/v1/namespaces/{namespace}/services/{NAME}",
        f"/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets/{NAME}",
        f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies/{NAME}",
    )


async def _tamper_and_update(api: Any, namespace: str, stack: Stack) -> None:
    """Someone edits the owned objects by hand, then the MailRelay's spec changes: the operator repairs
    the drift (this is the path that patches Secrets, Services, PDBs and NetworkPolicies)."""
    from mailrelay_sandbox import scenario

    for path in _owned_paths(namespace):
        await api.patch(path, {"metadata": {"labels": {"app.kubernetes.io/managed-by": "someone-else"}}})
    await api.patch(scenario.mailrelay_path(namespace, NAME), {"spec": {"limits": {"maxRecipients": 11}}})

    async def repaired() -> bool:
        for path in _owned_paths(namespace):
            obj = await api.request("GET", path)
            if obj["metadata"]["labels"].get("app.kubernetes.io/managed-by") != "mailrelay-operator":
                return False
        return True

    await _wait(repaired, 60, "hand edits of owned objects repaired", stack)


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


def _last_scrape(url: str, job: str) -> float:
    """When Prometheus last scraped `job` (the newest `up` sample), or 0."""
    params = urllib.parse.urlencode({"query": f'max(timestamp(up{{job="{job}"}}))'})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{params}", timeout=10) as r:
            result = json.loads(r.read())["data"]["result"]
    except OSError:
        return 0.0
    return float(result[0]["value"][1]) if result else 0.0


async def _stop_operator(operator: asyncio.subprocess.Process) -> None:
    if operator.returncode is not None:
        return
    operator.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(operator.wait(), timeout=15)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(operator.pid, signal.SIGKILL)
        await operator.wait()


async def _scenario(stack: Stack, env: kubeenv.KubeEnv, workdir: Path, prometheus: str) -> None:
    from mailrelay_sandbox import kubelet, scenario, sink

    # Enough threads for the smtplib sessions (8 at once) besides the other blocking calls.
    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=16))
    namespace = env.namespace
    upstream = sink.Sink(keep_content=False)
    upstream.start()
    upstream.fail("rcpt", 550, recipients={BOUNCE})
    health_port, metrics_port, prom_port = netutil.free_port(), netutil.free_port(), netutil.free_port()
    stack.prometheus_url = f"http://127.0.0.1:{prom_port}"
    prom_dir = workdir / "prometheus"
    prom_dir.mkdir()
    (workdir / "mailrelay-relay.json").write_text("[]")
    deploy = _chart_operator(namespace, health_port, metrics_port)
    _write_json(workdir / "mailrelay-operator.json", _pod_targets(_operator_pod(deploy)))
    prom = _start_prometheus(prometheus, workdir, prom_dir, prom_port)
    stack.prometheus_process = prom  # stays up for the queries; `running` stops it
    await asyncio.to_thread(_wait_prometheus_ready, stack.prometheus_url)
    operator: asyncio.subprocess.Process | None = None
    stop_targets = asyncio.Event()
    try:
        async with (
            kubelet.ProcessKubelet.on(
                env.cluster, env.node, workdir / "pods", upstream.address,
                extra_env={"MAILRELAY_LOG_LEVEL": "warning"},
            ) as node,
            env.api() as api,
            kubelet.ServiceEndpoints(api, namespace, NAME) as service,
        ):
            targets = asyncio.create_task(
                _publish_targets(api, namespace, workdir / "mailrelay-relay.json", stop_targets)
            )
            (container,) = deploy["spec"]["template"]["spec"]["containers"]
            stack.operator_args = [*container["args"], "--metrics-host=127.0.0.1"]
            run_env = {
                **os.environ,
                "KUBECONFIG": str(env.operator_kubeconfig),  # the chart's ServiceAccount: RBAC enforced
                "MAILRELAY_OPERATOR_OPERATOR_NAMESPACE": OPERATOR_NAMESPACE,
            }
            with (workdir / "operator.log").open("wb") as log:
                operator = await asyncio.create_subprocess_exec(
                    str(Path(sys.executable).with_name("mailrelay-operator")),
                    *stack.operator_args,
                    env=run_env,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            stack.started = time.time()
            stack.note(f"operator started, watching {namespace}")
            relay = scenario.mailrelay(
                NAME,
                namespace,
                min_replicas=1,
                max_replicas=2,
                interval=1,
                sessions_per_pod=2,
                max_sessions_per_pod=3,
                scale_down_stabilization=2,
                drain_timeout=20,
            )
            await api.request("POST", scenario.mailrelay_path(namespace), relay)
            await _wait(lambda: len(service.endpoints()) >= 1, 120, "first relay ready in the Service", stack)
            stack.liveness_status = await asyncio.to_thread(
                _get_status, f"http://127.0.0.1:{health_port}/healthz"
            )
            await _tamper_and_update(api, namespace, stack)
            # Load: 8 concurrent sessions against at most 2 relays x 3 sessions: overload, 421s. Midway,
            # one relay crashes (SIGKILL) and is restarted by the kubelet: the operator's /status scrapes
            # of it fail meanwhile, and Prometheus sees it down.
            await asyncio.gather(
                _load(service.endpoints, stack, seconds=16, sessions=8, hold=1.0),
                _crash_one_relay(node, stack, after=6),
            )
            stack.targets = await asyncio.to_thread(_targets, stack.prometheus_url)
            await _wait(
                lambda: (
                    _operator_metric(metrics_port, "mailrelay_operator_scale_events_total", 'direction="up"')
                    >= 1
                ),
                30,
                "scaled up",
                stack,
            )
            # Quiet, with a trickle: the operator drains one relay and scales down.
            trickle = asyncio.create_task(_load(service.endpoints, stack, seconds=8, sessions=1, hold=0.0))
            drains = "mailrelay_operator_drain_duration_seconds_count"
            await _wait(
                lambda: _operator_metric(metrics_port, drains) >= 1,
                90,
                "a drain finished",
                stack,
            )
            await trickle
            # Delete: the finalizer drains the last relay, then lets the objects go.
            await api.request("DELETE", scenario.mailrelay_path(namespace, NAME))
            deleted = time.time()

            async def gone() -> bool:
                return await api.get_or_none(scenario.mailrelay_path(namespace, NAME)) is None

            await _wait(gone, 90, "MailRelay deleted (finalizer released)", stack)
            await _wait(
                lambda: _last_scrape(stack.prometheus_url, "mailrelay-operator") > deleted + 2,
                30,
                "Prometheus scraped the operator after the deletion",
                stack,
            )
            stack.finished = time.time()
            stop_targets.set()
            await targets
            await _stop_operator(operator)
    finally:
        if operator is not None and operator.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(operator.pid, signal.SIGKILL)
            await operator.wait()
        with contextlib.suppress(OSError):
            stack.operator_log = (workdir / "operator.log").read_text(errors="replace")
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
    waiting.wait_until(lambda: _get_status(f"{url}/-/ready") == 200, within=within, every=0.3,
                       what="prometheus ready")


@contextlib.contextmanager
def running(prometheus: str, session: kubeenv.SessionCluster) -> Iterator[Stack]:
    """Run the scenario in a namespace of its own on the session's control plane (in a thread with its
    own event loop, so that the synchronous tests can share it), then yield the stack for queries."""
    env = kubeenv.new_env(session)
    stack = Stack(namespace=env.namespace)
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-live-"))

    def run() -> None:
        try:
            asyncio.run(_scenario(stack, env, workdir, prometheus))
        except BaseException as exc:  # handed to the tests
            stack.error = exc

    thread = threading.Thread(target=run, name="live-stack", daemon=True)
    thread.start()
    thread.join(timeout=600)
    if thread.is_alive() and stack.error is None:
        stack.error = ScenarioError("the live stack's scenario did not end within 600s")
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
        kubeenv.end_env(env)
        shutil.rmtree(workdir, ignore_errors=True)
