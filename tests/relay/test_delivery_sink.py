"""The upstream sink itself (sandbox/mailrelay_sandbox/sink.py), driven by independent clients: smtplib
and swaks in-process, and the `python -m mailrelay_sandbox.sink` process the demo uses; and the same
in-process tests on the newest aiosmtpd release, which the sink is built on."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import smtplib
import socket
import subprocess
import sys

import pytest
from mailrelay_sandbox import sink as sinkmod

from tests.conftest import missing, require_tool

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_counts_and_stores_exactly_what_arrives() -> None:
    with sinkmod.running() as s, smtplib.SMTP(s.host, s.port, timeout=30) as client:
        body = b"Subject: x\r\n\r\n.dot\r\nend\r\n"
        client.sendmail("a@example.org", ["b@example.org", "c@example.org"], body)
        client.sendmail("", ["postmaster@example.org"], b"Subject: bounce\r\n\r\nx\r\n")
        assert s.wait_for(2, 30)
        first, second = s.messages
        assert (first.mail_from, first.rcpt_tos) == ("a@example.org", ("b@example.org", "c@example.org"))
        assert first.content == b"Subject: x\r\n\r\n.dot\r\nend\r\n"
        assert second.mail_from == ""
        assert s.count == 2 and s.connections == 1
        assert s.messages_from(1) == [second] and s.messages_from(2) == []
        assert s.received_bytes == len(first.content) + len(second.content)


def test_injected_failures_times_and_recipients() -> None:
    with sinkmod.running() as s, smtplib.SMTP(s.host, s.port, timeout=30) as client:
        s.fail("rcpt", 550, recipients={"bad@example.org"})
        s.fail("data", 451, times=1)
        with pytest.raises(smtplib.SMTPDataError) as data_error:
            client.sendmail("a@example.org", ["ok@example.org"], b"x\r\n")
        assert data_error.value.smtp_code == 451
        refused = client.sendmail("a@example.org", ["bad@example.org", "ok@example.org"], b"y\r\n")
        assert refused == {"bad@example.org": (550, b"5.1.1 Mailbox unavailable")}
        assert [m.rcpt_tos for m in s.messages] == [("ok@example.org",)]
        s.clear_failures()
        assert client.sendmail("a@example.org", ["bad@example.org"], b"z\r\n") == {}


def test_421_closes_the_session() -> None:
    with sinkmod.running() as s:
        s.fail("mail", 421, times=1)
        with smtplib.SMTP(s.host, s.port, timeout=30) as client:
            client.ehlo()
            code, _ = client.mail("a@example.org")
            assert code == 421
            with pytest.raises(smtplib.SMTPServerDisconnected):
                client.noop()
        s.fail("connect", 421, times=1)
        with pytest.raises(smtplib.SMTPConnectError):
            smtplib.SMTP(s.host, s.port, timeout=30)
        with smtplib.SMTP(s.host, s.port, timeout=30) as client:  # the failure was used up
            assert client.noop()[0] == 250


def test_stop_cuts_sessions_and_restart_keeps_the_port() -> None:
    s = sinkmod.Sink().start()
    try:
        port = s.port
        client = smtplib.SMTP(s.host, port, timeout=30)
        assert client.noop()[0] == 250
        s.stop()
        with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
            client.noop()
        with pytest.raises(OSError), socket.create_connection((s.host, port), timeout=5):
            pass
        s.start()
        assert s.port == port
        with smtplib.SMTP(s.host, port, timeout=30) as again:
            again.sendmail("a@example.org", ["b@example.org"], b"x\r\n")
        assert s.count == 1
    finally:
        s.stop()


def test_swaks_delivers_to_the_sink() -> None:
    swaks = require_tool("swaks")
    with sinkmod.running() as s:
        out = subprocess.run(
            [swaks, "--server", s.host, "--port", str(s.port), "--from", "a@example.org",
             "--to", "b@example.org", "--header", "Subject: via swaks", "--body", "hello"],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert s.wait_for(1, 30)
        assert b"Subject: via swaks" in s.messages[0].content


def test_sink_as_a_process_prints_counts() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailrelay_sandbox.sink", "--listen", f"127.0.0.1:{port}", "--interval", "0.2",
         "--fail", "rcpt:451"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        listening = json.loads(proc.stdout.readline())
        assert listening == {"event": "listening", "address": f"127.0.0.1:{port}"}
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client, \
                pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("a@example.org", ["b@example.org"], b"x\r\n")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        lines = [json.loads(line) for line in out.splitlines()]
        assert lines[-1]["event"] == "final" and lines[-1]["received"] == 0 and lines[-1]["connections"] == 1
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_arguments_exit_2() -> None:
    out = subprocess.run([sys.executable, "-m", "mailrelay_sandbox.sink", "--fail", "bogus"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "COMMAND:CODE" in out.stderr


@pytest.mark.slow
def test_the_sink_on_the_newest_aiosmtpd_release(tmp_path: pathlib.Path) -> None:
    """The sink subclasses aiosmtpd's SMTP and overrides its private _handle_client (the greeting hook
    aiosmtpd lacks), so the pin (<1.5) stays on the release these tests pass on. This runs the sink's
    tests above again with the newest aiosmtpd release installed from the package index into a private
    folder, so a new release shows up here as a failing test before anyone moves the pin."""
    target = tmp_path / "aiosmtpd-newest"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), "aiosmtpd"],
        capture_output=True, text=True, timeout=600, check=False)
    if install.returncode != 0:
        missing(f"pip could not install the newest aiosmtpd:\n{install.stderr[-2000:]}")
    path = [str(target), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    probe = subprocess.run(
        [sys.executable, "-c", "import aiosmtpd; print(aiosmtpd.__version__, aiosmtpd.__file__)"],
        capture_output=True, text=True, timeout=60, env=env, check=True)
    version, location = probe.stdout.split()
    assert pathlib.Path(location).is_relative_to(target), probe.stdout
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "not newest_aiosmtpd and not swaks and not as_a_process"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT, check=False)
    assert run.returncode == 0, (
        f"the sink fails on aiosmtpd {version}:\n{run.stdout[-4000:]}{run.stderr[-2000:]}")
