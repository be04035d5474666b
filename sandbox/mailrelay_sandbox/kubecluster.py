"""The real Kubernetes control plane for the tests, the demo and the benchmarks, as local processes.

`start()` runs etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback, built from
the Kubernetes Go modules by `scripts/install-kube.sh` (cached under `.tools/kube/<version>/`):
- kube-apiserver serves HTTPS with a CA of its own, authenticates static bearer tokens and service-account
  tokens (its own issuer and keys), and authorizes with RBAC; `PodNodeSelector` admission is on, so a
  namespace can pin its pods to one node (each sandbox kubelet is one node: see `kubelet`).
- kube-controller-manager runs the controllers the project relies on (`CONTROLLERS`): Deployments,
  ReplicaSets (which choose their victims, by pod-deletion-cost among others), StatefulSets, the garbage
  collector, PodDisruptionBudgets, EndpointSlices, namespaces, service accounts and their tokens, and
  the binding and protection of PersistentVolumes and their claims.
- kube-scheduler binds pods to nodes.

Only the kubelet is simulated (`mailrelay_sandbox.kubelet`). etcd runs with `--unsafe-no-fsync`: its
durability is not under test, and fsync per write would slow every test.

Identities (static tokens): `admin` (system:masters, for tests and the demo's set-up), the controller
manager and the scheduler under their bootstrap RBAC names, and `sandbox-kubelet` (system:masters: the
simulated kubelet is not what RBAC is tested on). The operator never uses any of them: it runs with a
token of its chart's ServiceAccount (`service_account_token`).

This module starts and stops processes and writes files under its work folder; it makes no decision for
the operator and is never imported by `relay/` or `operator/`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from mailrelay_sandbox import apiclient, netutil, waiting

REPO_ROOT = Path(__file__).resolve().parents[2]
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
CONTROLLERS = (
    "deployment-controller", "replicaset-controller", "statefulset-controller",
    "garbage-collector-controller", "disruption-controller", "endpointslice-controller",
    "namespace-controller", "serviceaccount-controller", "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller", "persistentvolume-binder-controller",
    "pod-garbage-collector-controller", "node-lifecycle-controller",
    # a claim or volume in use keeps its protection finalizer until no pod uses it: without these two,
    # a deleted claim (a StatefulSet's whenScaled: Delete) would never go
    "persistentvolumeclaim-protection-controller", "persistentvolume-protection-controller",
)
SERVICE_CIDR = "10.96.0.0/16"
NODE_SELECTOR_ANNOTATION = "scheduler.alpha.kubernetes.io/node-selector"
ISSUER = "https://kubernetes.default.svc.cluster.local"


class ClusterError(RuntimeError):
    """The control plane could not be built, started or asked."""


# -- binaries ---------------------------------------------------------------------------------------

def find_binaries() -> Path | None:
    """The folder holding all of `BINARIES`: $KUBE_BIN, $KUBEBUILDER_ASSETS, or the built cache."""
    candidates = [os.environ.get("KUBE_BIN"), os.environ.get("KUBEBUILDER_ASSETS"),
                  str(REPO_ROOT / ".tools" / "bin" / "kube-bin")]
    for candidate in candidates:
        if candidate and all(os.access(Path(candidate) / b, os.X_OK) for b in BINARIES):
            return Path(candidate).resolve()
    return None


def ensure_binaries() -> Path:
    """`find_binaries()`, building them first (scripts/install-kube.sh, progress on stderr) if needed."""
    found = find_binaries()
    if found is not None:
        return found
    print("control plane: building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and "
          "etcd once (about 10 minutes on 2 cores); later runs start in seconds", file=sys.stderr)
    subprocess.run(["bash", str(REPO_ROOT / "scripts" / "install-kube.sh")], check=True)
    found = find_binaries()
    if found is None:
        raise ClusterError("scripts/install-kube.sh ran but the binaries are still missing")
    return found




# -- certificates -----------------------------------------------------------------------------------

def _pem_key(key: Any) -> bytes:
    return bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


def write_pki(folder: Path) -> dict[str, Path]:
    """A CA, the apiserver's serving certificate (loopback and the in-cluster names), and the service
    account signing key pair. Returns their paths by role."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(tz=datetime.UTC) - datetime.timedelta(minutes=5)
    later = now + datetime.timedelta(days=365)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailrelay-sandbox-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(later)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in (
        "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local")]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "10.96.0.1")]
    serving = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
               .issuer_name(ca_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(later)
               .add_extension(x509.SubjectAlternativeName(names), critical=False)
               .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    paths = {"ca": folder / "ca.crt", "ca-key": folder / "ca.key", "serving": folder / "apiserver.crt",
             "serving-key": folder / "apiserver.key", "sa-key": folder / "sa.key",
             "sa-pub": folder / "sa.pub"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["ca-key"].write_bytes(_pem_key(ca_key))
    paths["serving"].write_bytes(serving.public_bytes(serialization.Encoding.PEM))
    paths["serving-key"].write_bytes(_pem_key(key))
    paths["sa-key"].write_bytes(_pem_key(sa_key))
    paths["sa-pub"].write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    for role in ("ca-key", "serving-key", "sa-key"):
        paths[role].chmod(0o600)
    return paths


def write_kubeconfig(path: Path, server: str, ca_file: Path, token: str, *, user: str = "user",
                     namespace: str | None = None) -> Path:
    """A kubeconfig with one cluster, one token user and one context (JSON is valid YAML)."""
    context: dict[str, Any] = {"cluster": "sandbox", "user": user}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "sandbox",
        "clusters": [{"name": "sandbox", "cluster": {
            "server": server,
            "certificate-authority-data": base64.b64encode(ca_file.read_bytes()).decode()}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "sandbox", "context": context}],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1))
    path.chmod(0o600)
    return path


# -- the running control plane ----------------------------------------------------------------------

@dataclasses.dataclass
class Cluster:
    """A running control plane: its URL, CA, admin token and processes."""

    workdir: Path
    binaries: Path
    url: str
    etcd_url: str
    ca_file: Path
    admin_token: str
    kubelet_token: str
    kubeconfig: Path                       # the admin's
    processes: dict[str, subprocess.Popen[bytes]] = dataclasses.field(default_factory=dict)
    commands: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    started_in: float = 0.0

    # -- plain HTTPS calls (no event loop needed; tests and set-up) ---------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                content_type: str = "application/json", timeout: float = 15.0) -> Any:
        """One API call as `token` (the admin by default); JSON in and out. Raises ApiStatus on >= 400."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {token or self.admin_token}", "Content-Type": content_type,
            "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, context=self.ssl_context(), timeout=timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            raise ApiStatus(exc.code, exc.read().decode(errors="replace")) from None
        return json.loads(text) if text else None

    def api(self, *, timeout: float = 10.0) -> apiclient.Api:
        """An asyncio client as the admin: `async with cluster.api() as api`."""
        return apiclient.Api(self.url, self.admin_token, self.ca_file, timeout=timeout)

    def binary(self, name: str) -> str:
        return str(self.binaries / name)

    def kubectl(self, *args: str, kubeconfig: Path | None = None, check: bool = True,
                input: str | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(kubeconfig or self.kubeconfig)}
        return subprocess.run([self.binary("kubectl"), *args], env=env, check=check, text=True,
                              capture_output=True, input=input, timeout=timeout)

    def version(self) -> str:
        return str(self.request("GET", "/version")["gitVersion"])

    def etcd_version(self) -> str:
        with urllib.request.urlopen(self.etcd_url + "/version", timeout=5) as response:
            return str(json.loads(response.read())["etcdserver"])

    def describe(self) -> str:
        """One line naming what runs, for the demo's first lines and the benchmarks."""
        return (f"control plane: kube-apiserver {self.version()}, etcd {self.etcd_version()}, "
                "kube-controller-manager, kube-scheduler (real); pods run by the sandbox's process kubelet")

    # -- namespaces and identities ------------------------------------------------------------------
    def create_namespace(self, name: str, *, node: str | None = None,
                         labels: Mapping[str, str] | None = None) -> None:
        """Create `name` (pinned to `node`'s pods when given, through PodNodeSelector) and wait for its
        default ServiceAccount, which every pod needs before admission lets it in."""
        meta: dict[str, Any] = {"name": name, "labels": dict(labels or {})}
        if node:
            meta["annotations"] = {NODE_SELECTOR_ANNOTATION: f"kubernetes.io/hostname={node}"}
        with contextlib.suppress(ApiStatus):
            self.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                         "metadata": meta})
        self.wait(lambda: self.exists(f"/api/v1/namespaces/{name}/serviceaccounts/default"),
                  what=f"the default ServiceAccount of {name}")

    def delete_namespace(self, name: str) -> None:
        """Delete `name` without waiting. MailRelays lose their finalizer first: the operator that would
        release it may already be gone."""
        with contextlib.suppress(ApiStatus):
            items = self.request("GET", f"/apis/mailrelay.dev/v1alpha1/namespaces/{name}/mailrelays")
            for item in items.get("items") or []:
                with contextlib.suppress(ApiStatus):
                    self.request("PATCH", f"/apis/mailrelay.dev/v1alpha1/namespaces/{name}/mailrelays/"
                                 f"{item['metadata']['name']}", {"metadata": {"finalizers": None}},
                                 content_type="application/merge-patch+json")
        with contextlib.suppress(ApiStatus):
            self.request("DELETE", f"/api/v1/namespaces/{name}")

    def service_account_token(self, namespace: str, name: str, *, seconds: int = 86400) -> str:
        """A bound token of ServiceAccount `namespace/name` (TokenRequest, as `kubectl create token`)."""
        answer = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                              {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                               "spec": {"expirationSeconds": seconds}})
        return str(answer["status"]["token"])

    def kubeconfig_for(self, path: Path, token: str, *, user: str = "user",
                       namespace: str | None = None) -> Path:
        return write_kubeconfig(path, self.url, self.ca_file, token, user=user, namespace=namespace)

    def apply(self, obj: Mapping[str, Any], *, manager: str = "sandbox") -> Any:
        """Server-side apply of one object as the admin (create or update)."""
        path = object_path(obj)
        return self.request("PATCH", f"{path}?fieldManager={manager}&force=true", dict(obj),
                            content_type="application/apply-patch+yaml")

    def exists(self, path: str) -> bool:
        try:
            self.request("GET", path)
        except ApiStatus as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def wait(self, check: Any, *, within: float = 60.0, what: str = "condition") -> None:
        waiting.wait_until(check, within=within, every=0.1, what=what)

    # -- etcd -------------------------------------------------------------------------------------------
    def compact_etcd(self) -> int:
        """Compact etcd up to its current revision (through its JSON gateway); returns the revision.
        Watches that resume from an older resourceVersion then get 410 Gone, as after the apiserver's own
        periodic compaction."""
        status = _post_json(self.etcd_url + "/v3/kv/range", {"key": base64.b64encode(b"/").decode(),
                                                             "limit": 1})
        revision = int(status["header"]["revision"])
        _post_json(self.etcd_url + "/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    # -- processes ----------------------------------------------------------------------------------
    def alive(self) -> dict[str, bool]:
        return {name: p.poll() is None for name, p in self.processes.items()}

    def log(self, name: str, lines: int = 40) -> str:
        try:
            text = (self.workdir / "logs" / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop_process(self, name: str, *, kill: bool = False, grace: float = 10.0) -> None:
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def start_process(self, name: str) -> None:
        self.processes[name] = _spawn(self.commands[name], self.workdir / "logs" / f"{name}.log")

    def restart_apiserver(self) -> None:
        """SIGKILL the apiserver and start it again on the same port and etcd (a crash and restart)."""
        self.stop_process("kube-apiserver", kill=True)
        self.start_process("kube-apiserver")
        self.wait(self._ready, within=60, what="kube-apiserver /readyz after a restart")

    def _ready(self) -> bool:
        try:
            request = urllib.request.Request(self.url + "/readyz", headers={
                "Authorization": f"Bearer {self.admin_token}"})
            with urllib.request.urlopen(request, context=self.ssl_context(), timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            self.stop_process(name)


class ApiStatus(Exception):
    """An API answer of 400 or more, with its status and body."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status}: {body[:500]}")
        self.status = status
        self.body = body

    @property
    def message(self) -> str:
        try:
            return str(json.loads(self.body).get("message", self.body))
        except ValueError:
            return self.body


def object_path(obj: Mapping[str, Any]) -> str:
    """The REST path of a (namespaced or cluster) object of the kinds the sandbox writes."""
    api_version = str(obj["apiVersion"])
    kind = str(obj["kind"])
    meta = obj.get("metadata") or {}
    plural = _PLURALS.get(kind, kind.lower() + "s")
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    namespace = meta.get("namespace")
    if namespace and kind not in _CLUSTER_KINDS:
        base += f"/namespaces/{namespace}"
    return f"{base}/{plural}/{meta['name']}"


_PLURALS = {"NetworkPolicy": "networkpolicies", "PodDisruptionBudget": "poddisruptionbudgets",
            "MailRelay": "mailrelays", "CustomResourceDefinition": "customresourcedefinitions",
            "ServiceMonitor": "servicemonitors", "PrometheusRule": "prometheusrules"}
_CLUSTER_KINDS = {"Namespace", "Node", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass"}


def _post_json(url: str, body: Any) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _spawn(command: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _healthz(url: str, within: float, what: str, processes: Mapping[str, subprocess.Popen[bytes]],
             workdir: Path) -> None:
    context = ssl._create_unverified_context()  # the components' own self-signed serving certificates
    deadline = time.monotonic() + within
    while True:
        dead = [name for name, p in processes.items() if p.poll() is not None]
        if dead:
            tail = (workdir / "logs" / f"{dead[0]}.log").read_text(errors="replace").splitlines()[-30:]
            raise ClusterError(f"{dead[0]} exited with {processes[dead[0]].returncode}:\n" + "\n".join(tail))
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {within:.0f}s waiting for {what} ({url})")
        time.sleep(0.05)


def start(workdir: Path, *, binaries: Path | None = None,
          apiserver_flags: Sequence[str] = ()) -> Cluster:
    """Start etcd, kube-apiserver, kube-controller-manager and kube-scheduler; return once all four
    answer their health checks. Logs go to `workdir/logs/`."""
    began = time.monotonic()
    binaries = binaries or ensure_binaries()
    workdir.mkdir(parents=True, exist_ok=True)
    pki = write_pki(workdir / "pki")
    tokens = {who: secrets.token_hex(16) for who in ("admin", "kcm", "scheduler", "kubelet")}
    (workdir / "tokens.csv").write_text(
        f'{tokens["admin"]},admin,uid-admin,"system:masters"\n'
        f'{tokens["kcm"]},system:kube-controller-manager,uid-kcm\n'
        f'{tokens["scheduler"]},system:kube-scheduler,uid-scheduler\n'
        f'{tokens["kubelet"]},sandbox-kubelet,uid-kubelet,"system:masters"\n')
    (workdir / "tokens.csv").chmod(0o600)
    etcd_port, peer_port, api_port = netutil.free_port(), netutil.free_port(), netutil.free_port()
    kcm_port, sched_port = netutil.free_port(), netutil.free_port()
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    url = f"https://127.0.0.1:{api_port}"
    bin_ = binaries
    commands = {
        "etcd": [str(bin_ / "etcd"), "--name=sandbox", f"--data-dir={workdir / 'etcd'}",
                 f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
                 f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                 f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                 f"--initial-cluster=sandbox=http://127.0.0.1:{peer_port}",
                 "--unsafe-no-fsync", "--log-level=warn", "--quota-backend-bytes=4294967296"],
        "kube-apiserver": [
            str(bin_ / "kube-apiserver"), f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
            f"--tls-cert-file={pki['serving']}", f"--tls-private-key-file={pki['serving-key']}",
            f"--client-ca-file={pki['ca']}", f"--requestheader-client-ca-file={pki['ca']}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
            f"--token-auth-file={workdir / 'tokens.csv'}",
            "--authorization-mode=RBAC", f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-issuer={ISSUER}", f"--service-account-key-file={pki['sa-pub']}",
            f"--service-account-signing-key-file={pki['sa-key']}",
            "--endpoint-reconciler-type=none", "--allow-privileged=true",
            "--enable-admission-plugins=PodNodeSelector", "--profiling=false", "-v=1",
            *apiserver_flags],
        "kube-controller-manager": [
            str(bin_ / "kube-controller-manager"), f"--kubeconfig={workdir / 'kcm.kubeconfig'}",
            f"--authentication-kubeconfig={workdir / 'kcm.kubeconfig'}",
            f"--authorization-kubeconfig={workdir / 'kcm.kubeconfig'}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={kcm_port}",
            f"--controllers={','.join(CONTROLLERS)}", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki['sa-key']}", f"--root-ca-file={pki['ca']}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--concurrent-gc-syncs=5", "-v=1"],
        "kube-scheduler": [
            str(bin_ / "kube-scheduler"), f"--kubeconfig={workdir / 'scheduler.kubeconfig'}",
            f"--authentication-kubeconfig={workdir / 'scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={workdir / 'scheduler.kubeconfig'}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={sched_port}", "-v=1"],
    }
    cluster = Cluster(workdir=workdir, binaries=bin_, url=url, etcd_url=etcd_url, ca_file=pki["ca"],
                      admin_token=tokens["admin"], kubelet_token=tokens["kubelet"],
                      kubeconfig=workdir / "admin.kubeconfig", commands=commands)
    write_kubeconfig(cluster.kubeconfig, url, pki["ca"], tokens["admin"], user="admin")
    write_kubeconfig(workdir / "kcm.kubeconfig", url, pki["ca"], tokens["kcm"], user="kcm")
    write_kubeconfig(workdir / "scheduler.kubeconfig", url, pki["ca"], tokens["scheduler"], user="scheduler")
    try:
        cluster.start_process("etcd")
        _healthz(etcd_url + "/health", 30, "etcd", cluster.processes, workdir)
        cluster.start_process("kube-apiserver")
        deadline = time.monotonic() + 60
        while not cluster._ready():
            if cluster.processes["kube-apiserver"].poll() is not None or time.monotonic() > deadline:
                raise ClusterError("kube-apiserver did not get ready:\n" + cluster.log("kube-apiserver"))
            time.sleep(0.05)
        cluster.start_process("kube-controller-manager")
        cluster.start_process("kube-scheduler")
        _healthz(f"https://127.0.0.1:{kcm_port}/healthz", 60, "kube-controller-manager",
                 cluster.processes, workdir)
        _healthz(f"https://127.0.0.1:{sched_port}/healthz", 60, "kube-scheduler",
                 cluster.processes, workdir)
    except BaseException:
        cluster.stop()
        raise
    cluster.started_in = time.monotonic() - began
    return cluster


@contextlib.contextmanager
def running(workdir: Path, **kwargs: Any) -> Iterator[Cluster]:
    cluster = start(workdir, **kwargs)
    try:
        yield cluster
    finally:
        cluster.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mailrelay_sandbox.kubecluster [WORKDIR]`: run the control plane until Ctrl-C; prints
    the admin kubeconfig's path so that kubectl and helm can be pointed at it."""
    args = list(sys.argv[1:] if argv is None else argv)
    workdir = Path(args[0] if args else REPO_ROOT / "build" / "kubecluster")
    shutil.rmtree(workdir, ignore_errors=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    with running(workdir) as cluster:
        print(cluster.describe(), flush=True)
        print(f"export KUBECONFIG={cluster.kubeconfig}   (started in {cluster.started_in:.1f} s)", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    sys.exit(main())
