"""PID 1 of the relay image: the Dockerfile's ENTRYPOINT, run as PID 1 of a new PID namespace, drains.

No container engine runs here, so the test builds the same situation: `unshare --pid --fork` makes the
ENTRYPOINT's first program (tini, from the Debian package) PID 1 of a fresh PID namespace, with the
relay (two SO_REUSEPORT workers) below it, exactly as the Dockerfile's relay target declares. SIGTERM
goes to that PID 1, as the kubelet's does. The relay must then drain: a new connection gets 421, the
session in the middle of a transaction still gets its 250 and the message reaches the upstream, and
everything exits with status 0. A PID 1 that dropped SIGTERM, or signalled the workers directly (which
stop at once), fails this test.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from mailrelay_sandbox import netutil

from tests.chart import dockerfile
from tests.conftest import missing, require_tool


def _relay_entrypoint() -> list[str]:
    (entrypoint,) = dockerfile.instruction(dockerfile.stages()["relay"], "ENTRYPOINT")
    argv = list(yaml.safe_load(entrypoint))
    assert argv[0] == "/usr/bin/tini" and argv[-1] == "mailrelay-relay"
    return argv


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_sigterm_to_pid_1_drains_the_relay(tmp_path: Path) -> None:
    from mailrelay_sandbox import sink

    tini = require_tool("tini")
    unshare = require_tool("unshare")
    if os.geteuid() != 0:
        missing("a new PID namespace needs root (CI runs as root)")
    argv = _relay_entrypoint()
    argv[0] = tini
    argv[-1] = str(Path(sys.executable).with_name("mailrelay-relay"))
    smtp_port, admin_port = netutil.free_port(), netutil.free_port()
    with sink.Sink() as upstream:
        flags = [
            f"--listen=127.0.0.1:{smtp_port}",
            f"--admin-listen=127.0.0.1:{admin_port}",
            f"--upstream={upstream.address}",
            f"--spool={tmp_path / 'spool'}",
            "--workers=2",
            "--drain-grace=10",
            "--drain-timeout=30",
            "--log-level=warning",
            "--hostname=relay.test",
        ]
        log = (tmp_path / "relay.log").open("wb")
        outer = subprocess.Popen(
            [unshare, "--pid", "--fork", "--kill-child", *argv, *flags],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not _ready(f"http://127.0.0.1:{admin_port}/readyz"):
                assert outer.poll() is None, (tmp_path / "relay.log").read_text()
                assert time.monotonic() < deadline, "relay did not become ready"
                time.sleep(0.2)
            (pid1,) = _children(outer.pid)  # tini: PID 1 inside the namespace
            (nspid,) = [
                ln for ln in Path(f"/proc/{pid1}/status").read_text().splitlines() if ln.startswith("NSpid:")
            ]
            assert nspid.split()[-1] == "1", nspid  # PID 1 in its own namespace

            client = smtplib.SMTP("127.0.0.1", smtp_port, timeout=30)
            client.ehlo("client.test")
            assert client.mail("sender@example.com")[0] == 250
            assert client.rcpt("rcpt@example.org")[0] == 250

            os.kill(pid1, signal.SIGTERM)  # what the kubelet does at scale-in
            deadline = time.monotonic() + 20
            while _ready(f"http://127.0.0.1:{admin_port}/readyz"):
                assert time.monotonic() < deadline, "the relay never started draining"
                time.sleep(0.1)
            with pytest.raises(smtplib.SMTPConnectError) as refused:
                smtplib.SMTP("127.0.0.1", smtp_port, timeout=10)
            assert refused.value.smtp_code == 421

            code, _ = client.data(b"Subject: in flight\r\n\r\nfinished during the drain\r\n")
            assert code == 250, "the in-flight transaction was cut"
            client.quit()
            assert upstream.wait_for(1, timeout=30), "the accepted message was not delivered while draining"
            assert outer.wait(timeout=60) == 0, (tmp_path / "relay.log").read_text()
        finally:
            if outer.poll() is None:
                os.killpg(outer.pid, signal.SIGKILL)
                outer.wait()
            log.close()
