"""The images as users run them: `make images` builds them (buildah), podman runs them here.

- The relay image runs as UID 10001 with a read-only root and answers SMTP and /healthz.
- Under load, `podman stop` (SIGTERM through tini) drains it: it exits 0, and every message it answered
  250 for reaches the upstream exactly once; its spool, on a volume, is left empty.
- `--workers 2` on a read-only root without a /tmp mount (a plain `docker run --read-only`) still starts
  (its metrics go to /dev/shm); with no /dev/shm either, it exits 2 with a message that says what to mount.
- No precompiled module in either image is stale (a stale one is compiled again at every start, since the
  root is read-only).
- Each image holds its own program only.
"""

from __future__ import annotations

import concurrent.futures
import json
import smtplib
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mailrelay_sandbox import containers
from mailrelay_sandbox import sink as sinkmod

from tests.conftest import missing

WAIT = 120.0

STALE_CHECK = r"""
import importlib.util, pathlib, sys
stale = checked = 0
for pyc in pathlib.Path(sys.prefix).rglob("__pycache__/*.pyc"):
    name = pyc.name.split(".")[0] + ".py"
    source = pyc.parent.parent / name
    if not source.exists():
        continue
    head = pyc.read_bytes()[:16]
    flags = int.from_bytes(head[4:8], "little")
    data = source.read_bytes()
    if flags & 1:  # hash-based: stale when the source's hash differs
        ok = head[8:16] == importlib.util.source_hash(data)
    else:  # timestamp-based: stale when the source's mtime or size differs
        st = source.stat()
        ok = (int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
              and int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF)
    checked += 1
    stale += not ok
print(checked, stale)
"""


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    if containers.podman() is None:
        missing("podman is not installed (run `make tools`)")
    names = {program: containers.image(program) for program in ("relay", "operator")}
    for name in names.values():
        if not containers.has_image(name):
            missing(f"image {name} is not built (run `make images`)")
    return names


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([containers.podman() or "podman", *args], capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RelayContainer:
    """One relay container on the host's network, its spool a host folder mounted as a volume."""

    def __init__(self, image: str, upstream: str, spool: Path, *, options: tuple[str, ...] = (),
                 args: tuple[str, ...] = ()) -> None:
        self.name = f"mailrelay-test-{uuid.uuid4().hex[:8]}"
        self.smtp_port, self.admin_port = free_port(), free_port()
        spool.mkdir(parents=True, exist_ok=True)
        spool.chmod(0o777)  # the container's UID 10001 writes it
        self.spool = spool
        command = containers.run_command(
            image,
            ["-d", "--name", self.name, "--network", "host", "--read-only", "--read-only-tmpfs=false",
             "-v", f"{spool}:/var/spool/mailrelay", *options],
            ["--listen", f"127.0.0.1:{self.smtp_port}", "--admin-listen", f"127.0.0.1:{self.admin_port}",
             "--upstream", upstream, "--hostname", "relay.test", "--drain-grace", "1", *args])
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.smtp_port)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + WAIT
        while not self.healthy():
            state = self.state()
            assert state.get("Running", False) or time.monotonic() < deadline, (state, self.logs())
            assert time.monotonic() < deadline, f"no /healthz: {self.logs()}"
            time.sleep(0.2)

    def state(self) -> dict[str, object]:
        done = podman("inspect", "--format", "{{json .State}}", self.name)
        return dict(json.loads(done.stdout)) if done.returncode == 0 else {}

    def logs(self) -> str:
        done = podman("logs", self.name)
        return (done.stdout + done.stderr)[-3000:]

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name)


@pytest.fixture
def sink() -> Iterator[sinkmod.Sink]:
    with sinkmod.running() as s:
        yield s


@pytest.fixture
def relay_containers(images: dict[str, str]) -> Iterator[list[RelayContainer]]:
    started: list[RelayContainer] = []
    yield started
    for c in started:
        c.remove()


def message(tag: str) -> bytes:
    return (f"From: a@client.test\r\nTo: b@dest.test\r\nSubject: {tag}\r\nMessage-ID: <{tag}@client.test>\r\n"
            f"\r\n" + ("x" * 76 + "\r\n") * 26).encode()


def test_the_relay_image_runs_unprivileged_on_a_read_only_root(
    images: dict[str, str], sink: sinkmod.Sink, relay_containers: list[RelayContainer], tmp_path: Path,
) -> None:
    relay = RelayContainer(images["relay"], sink.address, tmp_path / "spool", options=("--tmpfs", "/tmp"))
    relay_containers.append(relay)
    relay.wait_healthy()
    assert podman("exec", relay.name, "id", "-u").stdout.strip() == "10001"
    assert podman("exec", relay.name, "touch", "/opt/venv/x").returncode != 0  # read-only root
    with smtplib.SMTP(*relay.address, timeout=30) as client:
        code, text = client.ehlo("client.test")
        assert code == 250 and text.splitlines()[0] == b"relay.test"
        client.sendmail("a@client.test", ["b@dest.test"], message("hello-image"))
    assert sink.wait_for(1, timeout=WAIT)
    assert b"<hello-image@client.test>" in sink.messages[0].content


def test_podman_stop_drains_under_load_and_loses_nothing(
    images: dict[str, str], sink: sinkmod.Sink, relay_containers: list[RelayContainer], tmp_path: Path,
) -> None:
    relay = RelayContainer(images["relay"], sink.address, tmp_path / "spool", options=("--tmpfs", "/tmp"))
    relay_containers.append(relay)
    relay.wait_healthy()
    accepted: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        """One session after another, a few messages each, until the relay refuses new sessions."""
        i = 0
        while not stop.is_set():
            try:
                with smtplib.SMTP(*relay.address, timeout=60) as smtp:
                    smtp.ehlo("client.test")
                    for _ in range(3):
                        tag = f"load-{n}-{i}"
                        i += 1
                        smtp.sendmail("a@client.test", ["b@dest.test"], message(tag))
                        with lock:
                            accepted.append(tag)
            except (smtplib.SMTPException, OSError):
                if stop.is_set():
                    return
                time.sleep(0.05)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, n) for n in range(8)]
        deadline = time.monotonic() + WAIT
        while len(accepted) < 100:
            assert time.monotonic() < deadline, "the load never reached 100 messages"
            time.sleep(0.05)
        stopped = podman("stop", "-t", "60", relay.name, timeout=120)  # SIGTERM through tini: drain
        stop.set()
        for future in futures:
            future.result(timeout=WAIT)
    assert stopped.returncode == 0, stopped.stderr
    state = relay.state()
    assert state.get("ExitCode") == 0, (state, relay.logs())
    assert sink.wait_for(len(accepted), timeout=WAIT)
    tags = [m.content.split(b"Message-ID: <", 1)[1].split(b"@", 1)[0].decode() for m in sink.messages]
    assert sorted(tags) == sorted(accepted), "every 250 delivered, exactly once"
    queue = relay.spool / "queue"
    assert not queue.exists() or [p for p in queue.rglob("*") if p.is_file()] == []


def test_workers_on_a_read_only_root_without_tmp(
    images: dict[str, str], sink: sinkmod.Sink, relay_containers: list[RelayContainer], tmp_path: Path,
) -> None:
    """As `docker run --read-only` leaves it: no writable /tmp. The workers' metrics go to /dev/shm."""
    relay = RelayContainer(images["relay"], sink.address, tmp_path / "spool", args=("--workers", "2"))
    relay_containers.append(relay)
    relay.wait_healthy()
    with smtplib.SMTP(*relay.address, timeout=30) as client:
        client.sendmail("a@client.test", ["b@dest.test"], message("workers"))
    assert sink.wait_for(1, timeout=WAIT)
    command = containers.run_command(
        images["relay"],
        ["--rm", "--network", "host", "--read-only", "--read-only-tmpfs=false", "--ipc", "none"],
        ["--upstream", sink.address, "--workers", "2", "--listen", f"127.0.0.1:{free_port()}",
         "--admin-listen", f"127.0.0.1:{free_port()}"])
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "mount a tmpfs on /tmp" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("program", ["relay", "operator"])
def test_no_precompiled_module_is_stale(images: dict[str, str], program: str) -> None:
    command = containers.run_command(images[program], ["--rm", "--read-only", "--entrypoint", "python"],
                                     ["-c", STALE_CHECK])
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    checked, stale = (int(x) for x in done.stdout.split())
    assert checked > 500 and stale == 0, (checked, stale)


@pytest.mark.parametrize(("program", "present", "absent"), [
    ("relay", ["mailrelay_relay", "aiosmtplib"],
     ["mailrelay_operator", "kopf", "kubernetes_asyncio", "aiosmtpd", "mailrelay_sandbox"]),
    ("operator", ["mailrelay_operator", "kopf", "kubernetes_asyncio"],
     ["mailrelay_relay", "aiosmtpd", "aiosmtplib", "mailrelay_sandbox"]),
])
def test_each_image_holds_its_own_program(images: dict[str, str], program: str, present: list[str],
                                          absent: list[str]) -> None:
    probe = ("import importlib.util, json, sys; "
             "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))")
    done = subprocess.run(containers.run_command(images[program], ["--rm", "--entrypoint", "python"],
                                                 ["-c", probe, *present, *absent]),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert {m: found[m] for m in present} == dict.fromkeys(present, True)
    assert {m: found[m] for m in absent} == dict.fromkeys(absent, False)

