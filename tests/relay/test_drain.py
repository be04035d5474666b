"""Drain, resume, SIGTERM, SIGKILL and --workers, on real relay processes with a real upstream sink."""

from __future__ import annotations

import json
import pathlib
import signal
import smtplib
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from mailrelay_sandbox import relayproc, smtpwire, waiting
from mailrelay_sandbox import sink as sinkmod

from tests.conftest import require_tool
from tests.relay.relay_harness import HOSTNAME, message, start_relay

DRAINING_421 = f"4.3.2 {HOSTNAME} Service shutting down, try again later"


@pytest.fixture
def sink() -> Iterator[sinkmod.Sink]:
    with sinkmod.running() as s:
        yield s


def delivered_ids(sink: sinkmod.Sink) -> set[str]:
    ids = set()
    for m in sink.messages:
        for line in m.content.split(b"\r\n"):
            if line.lower().startswith(b"message-id: "):
                ids.add(line[12:].decode())
    return ids


def open_transaction(w: smtpwire.Wire) -> None:
    w.ehlo()
    assert w.cmd("MAIL FROM:<a@client.test>")[0] == 250
    assert w.cmd("RCPT TO:<b@dest.test>")[0] == 250


def test_drain_with_session_in_data_then_resume(tmp_path: pathlib.Path, sink: sinkmod.Sink) -> None:
    relay = start_relay(tmp_path, sink.address, args=["--drain-grace", "30"])
    try:
        in_data = smtpwire.Wire(relay.smtp_address)
        between = smtpwire.Wire(relay.smtp_address)
        between.ehlo()
        open_transaction(in_data)
        assert in_data.cmd("DATA")[0] == 354
        msg_id, content = message("in flight")
        in_data.send(content[:40])

        status = relay.drain()
        assert status["draining"] is True and status["drained"] is False and status["sessions"] == 2
        assert relay.get("/readyz")[0] == 503
        # a new connection: 421 at the greeting, the listener stays open
        late = smtpwire.Wire(relay.smtp_address)
        assert late.greeting == (421, [DRAINING_421])
        assert late.closed()
        # the session greeted before the drain is still served: one more transaction completes...
        assert between.cmd("NOOP")[0] == 250
        assert between.cmd("MAIL FROM:<a@client.test>")[0] == 250
        assert between.cmd("RCPT TO:<b@dest.test>")[0] == 250
        assert between.cmd("DATA")[0] == 354
        between_id, between_content = message("started after the drain")
        between.send(between_content + b".\r\n")
        assert between.reply()[0] == 250
        # ...and the next MAIL after it gets 421 and the session closes
        assert between.cmd("RSET")[0] == 250
        assert between.cmd("MAIL FROM:<a@client.test>") == (421, DRAINING_421)
        assert between.closed()
        # the transaction in DATA finishes with 250; RSET and NOOP are answered, the next MAIL gets 421
        in_data.send(content[40:] + b".\r\n")
        code, lines = in_data.reply()
        assert code == 250 and lines[0].startswith("2.0.0 Ok: queued as ")
        assert in_data.cmd("RSET")[0] == 250
        assert in_data.cmd("NOOP")[0] == 250
        assert in_data.cmd("MAIL FROM:<a@client.test>") == (421, DRAINING_421)
        assert in_data.closed()
        waiting.wait_until(lambda: between_id in delivered_ids(sink),
                           what='between_id in delivered_ids(sink)')
        waiting.wait_until(lambda: msg_id in delivered_ids(sink), what='msg_id in delivered_ids(sink)')
        waiting.wait_until(lambda: relay.status()["drained"] is True,
                           what='relay.status()["drained"] is True')

        resumed = relay.resume()
        assert resumed["draining"] is False and resumed["drained"] is False
        assert relay.get("/readyz")[0] == 200
        again = smtpwire.Wire(relay.smtp_address)
        assert again.greeting is not None and again.greeting[0] == 220
        assert again.line("QUIT") == "221 2.0.0 Bye"
        metrics = relay.metrics()
        assert 'mailrelay_relay_connections_total{result="refused_draining"} 1.0' in metrics
        assert "mailrelay_relay_draining 0.0" in metrics
    finally:
        relay.kill()


def test_a_session_greeted_before_the_drain_is_served_from_ehlo_on(
    tmp_path: pathlib.Path, sink: sinkmod.Sink
) -> None:
    """connect, 220, then the drain, then EHLO: dma (Debian's) deletes the message, with no bounce, when
    EHLO gets anything but 2xx. A greeted session is in flight: EHLO, one transaction, then 421 at MAIL."""
    relay = start_relay(tmp_path, sink.address, args=["--drain-grace", "30"])
    try:
        w = smtpwire.Wire(relay.smtp_address)
        assert w.greeting is not None and w.greeting[0] == 220
        assert relay.drain()["draining"] is True
        assert w.ehlo()[0] == HOSTNAME
        assert w.cmd("MAIL FROM:<a@client.test>")[0] == 250
        assert w.cmd("RCPT TO:<b@dest.test>")[0] == 250
        assert w.cmd("DATA")[0] == 354
        msg_id, content = message("greeted before the drain")
        w.send(content + b".\r\n")
        assert w.reply()[0] == 250
        assert w.cmd("EHLO client.test")[0] == 250
        assert w.cmd("MAIL FROM:<a@client.test>") == (421, DRAINING_421)
        assert w.closed()
        waiting.wait_until(lambda: msg_id in delivered_ids(sink), what='msg_id in delivered_ids(sink)')
        waiting.wait_until(lambda: relay.status()["drained"] is True,
                           what='relay.status()["drained"] is True')
    finally:
        relay.kill()


def test_quit_while_draining_gets_221(tmp_path: pathlib.Path, sink: sinkmod.Sink) -> None:
    relay = start_relay(tmp_path, sink.address, args=["--drain-grace", "30"])
    try:
        w = smtpwire.Wire(relay.smtp_address)
        w.ehlo()
        relay.drain()
        assert w.line("QUIT") == "221 2.0.0 Bye"
    finally:
        relay.kill()


def test_idle_session_gets_unprompted_421(tmp_path: pathlib.Path, sink: sinkmod.Sink) -> None:
    relay = start_relay(tmp_path, sink.address, args=["--drain-grace", "0.5"])
    try:
        idle = smtpwire.Wire(relay.smtp_address)
        idle.ehlo()
        busy = smtpwire.Wire(relay.smtp_address)
        open_transaction(busy)  # inside a transaction: not idle, no unprompted 421
        started = time.monotonic()
        relay.drain()
        assert idle.reply() == (421, [DRAINING_421])  # nothing sent: the relay speaks first
        assert time.monotonic() - started >= 0.4
        assert idle.closed()
        assert busy.cmd("DATA")[0] == 354
        busy.send(message()[1] + b".\r\n")
        assert busy.reply()[0] == 250
        # after its transaction, the busy session is idle too, and gets its 421 after the grace
        assert busy.reply() == (421, [DRAINING_421])
        waiting.wait_until(lambda: relay.status()["drained"] is True,
                           what='relay.status()["drained"] is True')
    finally:
        relay.kill()


def test_sigterm_drains_then_exits(tmp_path: pathlib.Path, sink: sinkmod.Sink) -> None:
    relay = start_relay(tmp_path, sink.address, args=["--drain-grace", "30", "--drain-timeout", "60"])
    assert relay.process is not None
    w = smtpwire.Wire(relay.smtp_address)
    open_transaction(w)
    assert w.cmd("DATA")[0] == 354
    relay.process.send_signal(signal.SIGTERM)
    waiting.wait_until(lambda: relay.status()["draining"] is True, what='relay.status()["draining"] is True')
    status = relay.status()  # draining, and the transaction in flight keeps the relay up
    assert status["sessions"] == 1 and status["drained"] is False and relay.running
    msg_id, content = message("sigterm")
    w.send(content + b".\r\n")
    assert w.reply()[0] == 250
    assert w.line("QUIT") == "221 2.0.0 Bye"
    assert relay.process.wait(60) == 0
    assert msg_id in delivered_ids(sink)  # the queue was flushed before the exit
    events = [e["event"] for e in relay.log_events()]
    assert "drain.complete" in events and events[-1] == "relay.stopped"


def test_resume_cannot_cancel_sigterm(tmp_path: pathlib.Path, sink: sinkmod.Sink) -> None:
    relay = start_relay(tmp_path, sink.address, args=["--drain-grace", "30"])
    try:
        assert relay.process is not None
        w = smtpwire.Wire(relay.smtp_address)
        w.ehlo()  # an open session keeps the drain going
        relay.process.send_signal(signal.SIGTERM)
        waiting.wait_until(lambda: relay.status()["draining"] is True,
                           what='relay.status()["draining"] is True')
        assert relay.resume()["draining"] is True
        assert relay.get("/readyz")[0] == 503
        w.line("QUIT")
        assert relay.process.wait(60) == 0
    finally:
        relay.kill()


def test_sigterm_drain_timeout_leaves_queue_in_spool(tmp_path: pathlib.Path) -> None:
    upstream = sinkmod.Sink()
    upstream.start()
    upstream_address = upstream.address
    upstream.stop()  # the upstream is down: mail stays queued
    relay = start_relay(tmp_path, upstream_address, args=["--drain-timeout", "1"])
    try:
        with smtplib.SMTP(*relay.smtp_address) as client:
            msg_id, content = message("stays")
            client.sendmail("a@client.test", ["b@dest.test"], content)
        assert relay.status()["queue"]["messages"] == 1
        assert relay.stop(timeout=60) == 0
        stopped = [e for e in relay.log_events() if e["event"] == "relay.stopped_with_queue"]
        assert stopped and stopped[-1]["queued"] == 1
        assert any(e["event"] == "drain.timeout" for e in relay.log_events())
        assert len(list((relay.spool / "queue").iterdir())) == 1
        upstream.start()  # back on the same port: the restarted relay delivers the spooled message
        relay.start()
        assert upstream.wait_for(1, timeout=60)
        assert msg_id in delivered_ids(upstream)
    finally:
        relay.kill()
        upstream.stop()


def test_sigkill_with_queued_mail_then_restart_delivers_every_250(tmp_path: pathlib.Path) -> None:
    upstream = sinkmod.Sink()
    upstream.start()
    upstream_address = upstream.address
    upstream.fail("mail", 451)  # the upstream defers everything: mail piles up in the spool
    relay = start_relay(tmp_path, upstream_address, args=["--max-sessions", "50"])
    accepted: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        while not stop.is_set():
            msg_id, content = message(f"kill {n}")
            try:
                with smtplib.SMTP(*relay.smtp_address, timeout=30) as smtp:
                    smtp.sendmail("a@client.test", ["b@dest.test"], content)
            except (smtplib.SMTPException, OSError):
                return  # the relay died mid-transaction: that message never got a 250
            with lock:
                accepted.append(msg_id)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    try:
        waiting.wait_until(lambda: len(accepted) >= 30, within=60, what='len(accepted) >= 30')
        assert relay.kill() == -signal.SIGKILL  # crash in the middle of the load
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    with lock:
        acknowledged = list(accepted)
    assert acknowledged
    upstream.clear_failures()
    try:
        relay.start()
        waiting.wait_until(lambda: set(acknowledged) <= delivered_ids(upstream), within=90,
                           what=f"all {len(acknowledged)} acknowledged messages delivered")
        waiting.wait_until(lambda: relay.status()["queue"]["messages"] == 0, within=60,
                           what='relay.status()["queue"]["messages"] == 0')
    finally:
        relay.kill()
        upstream.stop()


def test_workers_share_session_cap_status_and_drain(tmp_path: pathlib.Path, sink: sinkmod.Sink) -> None:
    relay = start_relay(tmp_path, sink.address, workers=2,
                        args=["--max-sessions", "6", "--drain-grace", "0.5"])
    try:
        sessions = [smtpwire.Wire(relay.smtp_address) for _ in range(6)]
        assert relay.status()["sessions"] == 6
        busy = smtpwire.Wire(relay.smtp_address)
        assert busy.greeting == (421, [f"4.3.2 {HOSTNAME} Too busy, try again later"])
        pids = {e.get("pid") for e in relay.log_events() if e["event"] == "relay.started"}
        assert len(pids) == 2
        for w in sessions:
            w.close()
        waiting.wait_until(lambda: relay.status()["sessions"] == 0, what='relay.status()["sessions"] == 0')
        ids = []
        for n in range(10):
            with smtplib.SMTP(*relay.smtp_address) as client:
                msg_id, content = message(f"w{n}")
                client.sendmail("a@client.test", ["b@dest.test"], content)
                ids.append(msg_id)
        waiting.wait_until(lambda: set(ids) <= delivered_ids(sink), what='set(ids) <= delivered_ids(sink)')
        waiting.wait_until(lambda: relay.status()["queue"]["messages"] == 0,
                           what='relay.status()["queue"]["messages"] == 0')
        metrics = relay.metrics()
        accepted = [line for line in metrics.splitlines()
                    if line.startswith("mailrelay_relay_messages_accepted_total ")]
        assert accepted == ["mailrelay_relay_messages_accepted_total 10.0"]
        idle = smtpwire.Wire(relay.smtp_address)
        idle.ehlo()
        status = relay.drain()
        assert status["draining"] is True
        assert idle.reply() == (421, [DRAINING_421])
        assert smtpwire.Wire(relay.smtp_address).greeting == (421, [DRAINING_421])
        waiting.wait_until(lambda: relay.status()["drained"] is True,
                           what='relay.status()["drained"] is True')
        assert "mailrelay_relay_draining 1.0" in relay.metrics()
        relay.resume()
        assert smtpwire.Wire(relay.smtp_address).greeting is not None
        assert relay.stop(timeout=60) == 0
        assert json.dumps(relay.log_events()).count('"relay.stopped"') >= 2
    finally:
        relay.kill()


def test_smtp_source_to_smtp_sink_through_two_workers(tmp_path: pathlib.Path) -> None:
    """Postfix's own load tools on both sides: every message smtp-source sends is accepted and handed on."""
    smtp_source = require_tool("smtp-source")
    smtp_sink = require_tool("smtp-sink")
    port = relayproc.free_port()
    sink_proc = subprocess.Popen([smtp_sink, "-u", "nobody", f"127.0.0.1:{port}", "100"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    relay = start_relay(tmp_path, f"127.0.0.1:{port}", workers=2, args=["--max-sessions", "100"])
    try:
        host, smtp_port = relay.smtp_address
        sent = subprocess.run([smtp_source, "-s", "20", "-m", "200", "-l", "2048", "-f", "a@client.test",
                               "-t", "b@dest.test", f"{host}:{smtp_port}"], capture_output=True, text=True,
                              timeout=180, check=False)
        assert sent.returncode == 0, sent.stderr
        waiting.wait_until(lambda: relay.status()["queue"]["messages"] == 0, within=120,
                           what='relay.status()["queue"]["messages"] == 0')
        metrics = relay.metrics()
        for name in ("mailrelay_relay_messages_accepted_total", "mailrelay_relay_messages_delivered_total"):
            assert f"{name} 200.0" in metrics.splitlines()
        assert relay.status()["dead_letter"]["messages"] == 0
        assert 'mailrelay_relay_delivery_attempts_total{result="success"} 200.0' in metrics.splitlines()
    finally:
        relay.kill()
        sink_proc.kill()
        sink_proc.wait(10)
