"""smtpwire.Wire transcripts against a real `mailrelay-relay` process: the exact reply for every row of the
reply table (docs/relay.md, "Replies"), real clients (smtplib, aiosmtplib, swaks) and a real upstream
sink."""

from __future__ import annotations

import asyncio
import pathlib
import smtplib
import socket
import subprocess
from collections.abc import Iterator

import aiosmtplib
import pytest
from mailrelay_sandbox import relayproc, smtpwire, waiting
from mailrelay_sandbox import sink as sinkmod

from tests.conftest import require_tool
from tests.relay.relay_harness import HOSTNAME, message, start_relay

MAX_SIZE = 100_000
ARGS = [
    "--max-sessions", "4", "--max-message-size", str(MAX_SIZE), "--max-recipients", "5",
    "--max-inflight-bytes", "250000", "--accept-from", "127.0.0.0/25", "--command-timeout", "6",
    "--data-timeout", "6", "--drain-grace", "0.5",
]


@pytest.fixture(scope="module")
def sink() -> Iterator[sinkmod.Sink]:
    with sinkmod.running() as s:
        yield s


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("fault") / "fault"


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, sink: sinkmod.Sink,
          fault_file: pathlib.Path) -> Iterator[relayproc.RelayProcess]:
    r = start_relay(tmp_path_factory.mktemp("wire"), sink.address, args=ARGS,
                    env={"MAILRELAY_SPOOL_FAULT_FILE": str(fault_file)})
    yield r
    r.kill()


@pytest.fixture
def wire(relay: relayproc.RelayProcess) -> Iterator[smtpwire.Wire]:
    w = smtpwire.Wire(relay.smtp_address, source="127.0.0.1")
    yield w
    w.close()


def delivered(sink: sinkmod.Sink, msg_id: str) -> bool:
    return any(msg_id.encode() in m.content for m in sink.messages)


def test_greeting_and_ehlo(wire: smtpwire.Wire) -> None:
    assert wire.greeting == (220, [f"{HOSTNAME} ESMTP mailrelay"])
    assert wire.ehlo() == [HOSTNAME, "PIPELINING", f"SIZE {MAX_SIZE}", "8BITMIME", "ENHANCEDSTATUSCODES",
                           "SMTPUTF8", "DSN"]
    assert wire.line("QUIT") == "221 2.0.0 Bye"
    assert wire.closed()


def test_queued_message_is_delivered(wire: smtpwire.Wire, sink: sinkmod.Sink) -> None:
    wire.ehlo()
    assert wire.line("MAIL FROM:<a@client.test> SIZE=500 BODY=8BITMIME") == "250 2.1.0 Ok"
    assert wire.line("RCPT TO:<b@dest.test>") == "250 2.1.5 Ok"
    assert wire.line("DATA") == "354 End data with <CR><LF>.<CR><LF>"
    msg_id, content = message(body="..leading dot")
    wire.send(content + b".\r\n")
    code, lines = wire.reply()
    assert code == 250 and lines[0].startswith("2.0.0 Ok: queued as ")
    waiting.wait_until(lambda: delivered(sink, msg_id), what='delivered(sink, msg_id)')
    got = next(m for m in sink.messages if msg_id.encode() in m.content)
    assert got.mail_from == "a@client.test" and got.rcpt_tos == ("b@dest.test",)
    # dot-stuffing undone on the way in, redone by the delivery client: the upstream sees one dot
    assert got.content.replace(b"\r\n", b"\n") == content.replace(b"\r\n", b"\n").replace(b"\n..", b"\n.")
    assert "BODY=8BITMIME" in got.mail_options


@pytest.mark.parametrize("quit_too", [True, False])
def test_a_half_closed_client_still_gets_its_replies(
    wire: smtpwire.Wire, sink: sinkmod.Sink, quit_too: bool,
) -> None:
    """Exim pipelines QUIT after a message's final dot and shuts down its sending side, then reads the
    replies. The relay used to close at that EOF: the message was queued and delivered, the client never
    saw its 250 and sent it again (a duplicate). Now it gets 250 (and 221), and the message arrives once."""
    wire.ehlo()
    assert wire.cmd("MAIL FROM:<a@client.test>")[0] == 250
    assert wire.cmd("RCPT TO:<b@dest.test>")[0] == 250
    assert wire.cmd("DATA")[0] == 354
    msg_id, content = message("half-close")
    wire.send(content + b".\r\n" + (b"QUIT\r\n" if quit_too else b""))
    wire.sock.shutdown(socket.SHUT_WR)
    code, lines = wire.reply()
    assert code == 250 and lines[0].startswith("2.0.0 Ok: queued as ")
    if quit_too:
        assert wire.reply() == (221, ["2.0.0 Bye"])
    assert wire.closed()
    waiting.wait_until(lambda: delivered(sink, msg_id), what='delivered(sink, msg_id)')
    assert sum(1 for m in sink.messages if msg_id.encode() in m.content) == 1


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        (["MAIL FROM:<a@client.test> SIZE=100001"],
         "552 5.3.4 Error: message size exceeds fixed maximum message size"),
        (["MAIL FROM:<a@client.test> FOO=BAR"], "555 5.5.4 Error: MAIL parameter FOO not supported"),
        (["MAIL FROM:<a@client.test> BODY=BINARYMIME"], "555 5.5.4 Error: BODY=BINARYMIME not supported"),
        (["MAIL FROM:<a@client.test>", "RCPT TO:<b@dest.test> XYZ"],
         "555 5.5.4 Error: RCPT parameter XYZ not supported"),
        (["MAIL FROM:<a@client.test>", "RCPT TO:<b@dest.test> NOTIFY=SOMETIMES"],
         "501 5.5.4 Error: bad NOTIFY parameter value"),
        (["MAIL FROM:<a@client.test>", "MAIL FROM:<a@client.test>"], "503 5.5.1 Error: nested MAIL command"),
        (["RCPT TO:<b@dest.test>"], "503 5.5.1 Error: need MAIL command"),
        (["MAIL FROM:<a@client.test>", "DATA"], "503 5.5.1 Error: need RCPT command"),
        (["MAIL FROM:<not an address>"], "501 5.1.7 Syntax: MAIL FROM:<address> [parameters]"),
        (["BDAT 10 LAST"], "502 5.5.1 Error: command not implemented"),
        (["FOO"], "500 5.5.2 Error: command 'FOO' not recognized"),
        (["NOOP"], "250 2.0.0 Ok"),
        (["RSET"], "250 2.0.0 Ok"),
        (["VRFY b"], "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"),
        (["STARTTLS"], "454 4.7.0 TLS not available"),
    ],
)
def test_reply_rows(wire: smtpwire.Wire, commands: list[str], expected: str) -> None:
    wire.ehlo()
    for command in commands[:-1]:
        assert wire.cmd(command)[0] == 250
    assert wire.line(commands[-1]) == expected


def test_mail_before_helo_and_params_after_helo(wire: smtpwire.Wire) -> None:
    assert wire.line("MAIL FROM:<a@client.test>") == "503 5.5.1 Error: send HELO/EHLO first"
    assert wire.line("HELO client.test") == f"250 {HOSTNAME}"
    assert wire.line("MAIL FROM:<a@client.test> SIZE=10") == "501 5.5.4 Error: parameters need EHLO"


def test_too_many_recipients(wire: smtpwire.Wire) -> None:
    wire.ehlo()
    wire.cmd("MAIL FROM:<a@client.test>")
    for n in range(5):
        assert wire.line(f"RCPT TO:<r{n}@dest.test>") == "250 2.1.5 Ok"
    assert wire.line("RCPT TO:<r5@dest.test>") == "452 4.5.3 Error: too many recipients"


def test_relay_access_denied_outside_accept_from(relay: relayproc.RelayProcess) -> None:
    outsider = smtpwire.Wire(relay.smtp_address, source="127.0.0.200")
    try:
        outsider.ehlo()
        assert outsider.line("MAIL FROM:<a@client.test>") == "250 2.1.0 Ok"
        assert outsider.line("RCPT TO:<b@dest.test>") == "554 5.7.1 Relay access denied"
        assert outsider.line("DATA") == "503 5.5.1 Error: need RCPT command"
    finally:
        outsider.close()


def test_inflight_bytes_455_and_smaller_passes(relay: relayproc.RelayProcess) -> None:
    sessions = [smtpwire.Wire(relay.smtp_address, source="127.0.0.1") for _ in range(3)]
    first, second, third = sessions
    try:
        for w in sessions:
            w.ehlo()
        assert first.line("MAIL FROM:<a@client.test> SIZE=100000") == "250 2.1.0 Ok"
        assert second.line("MAIL FROM:<a@client.test> SIZE=100000") == "250 2.1.0 Ok"
        assert relay.status()["inflight_bytes"] == 200000
        assert third.line("MAIL FROM:<a@client.test> SIZE=50001") == \
            "455 4.3.2 Error: too much mail in flight, try again later"
        assert third.line("MAIL FROM:<a@client.test> SIZE=50000") == "250 2.1.0 Ok"  # smaller passes
        assert relay.status()["inflight_bytes"] == 250000
        assert first.line("RSET") == "250 2.0.0 Ok"
        second.close()
        waiting.wait_until(lambda: relay.status()["inflight_bytes"] == 50000,
                           what='relay.status()["inflight_bytes"] == 50000')
    finally:
        for w in sessions:
            w.close()
    waiting.wait_until(lambda: relay.status()["inflight_bytes"] == 0,
                       what='relay.status()["inflight_bytes"] == 0')


def test_session_cap_421_at_greeting(relay: relayproc.RelayProcess) -> None:
    waiting.wait_until(lambda: relay.status()["sessions"] == 0, what='relay.status()["sessions"] == 0')
    open_ = [smtpwire.Wire(relay.smtp_address, source="127.0.0.1") for _ in range(4)]
    try:
        refused = smtpwire.Wire(relay.smtp_address, source="127.0.0.1")
        assert refused.greeting == (421, [f"4.3.2 {HOSTNAME} Too busy, try again later"])
        assert refused.closed()
        assert relay.status()["sessions"] == 4
    finally:
        for w in open_:
            w.close()
    waiting.wait_until(lambda: relay.status()["sessions"] == 0, what='relay.status()["sessions"] == 0')
    assert smtpwire.Wire(relay.smtp_address, source="127.0.0.1").greeting[0] == 220  # type: ignore[index]


def test_disk_space_452_at_mail(wire: smtpwire.Wire, fault_file: pathlib.Path) -> None:
    wire.ehlo()
    fault_file.write_text("free=50000")
    try:
        assert wire.line("MAIL FROM:<a@client.test> SIZE=60000") == \
            "452 4.3.1 Error: insufficient system storage"
        assert wire.line("MAIL FROM:<a@client.test> SIZE=40000") == "250 2.1.0 Ok"
    finally:
        fault_file.unlink()


@pytest.mark.parametrize(("fault", "expected"), [
    ("write-enospc", "452 4.3.1 Error: insufficient system storage"),
    ("write-eio", "451 4.3.0 Error: local error in processing, try again later"),
    ("fsync-eio", "451 4.3.0 Error: local error in processing, try again later"),
])
def test_spool_failure_at_end_of_data(wire: smtpwire.Wire, relay: relayproc.RelayProcess, sink: sinkmod.Sink,
                                      fault_file: pathlib.Path, fault: str, expected: str) -> None:
    before = sorted(p.name for p in (relay.spool / "queue").iterdir())
    wire.ehlo()
    wire.cmd("MAIL FROM:<a@client.test>")
    wire.cmd("RCPT TO:<b@dest.test>")
    wire.cmd("DATA")
    msg_id, content = message()
    fault_file.write_text(fault)
    try:
        wire.send(content + b".\r\n")
        code, lines = wire.reply()
    finally:
        fault_file.unlink()
    assert f"{code} {lines[-1]}" == expected
    # nothing half-written is left, nothing queued was touched
    assert list((relay.spool / "tmp").iterdir()) == []
    assert set(before) >= {p.name for p in (relay.spool / "queue").iterdir()}
    # the session goes on, and the next message is accepted and delivered
    wire.cmd("MAIL FROM:<a@client.test>")
    wire.cmd("RCPT TO:<b@dest.test>")
    wire.cmd("DATA")
    ok_id, ok_content = message()
    wire.send(ok_content + b".\r\n")
    assert wire.reply()[0] == 250
    waiting.wait_until(lambda: delivered(sink, ok_id), what='delivered(sink, ok_id)')
    assert not delivered(sink, msg_id)


def test_smtplib_aiosmtplib_and_swaks_clients(relay: relayproc.RelayProcess, sink: sinkmod.Sink) -> None:
    ids = []
    host, port = relay.smtp_address
    msg_id, content = message("smtplib")
    with smtplib.SMTP(host, port, source_address=("127.0.0.1", 0)) as client:
        client.ehlo()
        assert client.has_extn("pipelining") and client.has_extn("enhancedstatuscodes")
        assert client.sendmail("a@client.test", ["b@dest.test", "c@dest.test"], content) == {}
    ids.append(msg_id)

    async def with_aiosmtplib() -> str:
        msg_id2, content2 = message("aiosmtplib")
        client = aiosmtplib.SMTP(hostname=host, port=port, source_address=("127.0.0.1", 0), start_tls=False)
        await client.connect()
        errors, text = await client.sendmail("a@client.test", ["b@dest.test"], content2)
        assert errors == {} and text.startswith("2.0.0 Ok: queued as ")
        await client.quit()
        return msg_id2

    ids.append(asyncio.run(with_aiosmtplib()))
    swaks = require_tool("swaks")
    msg_id3 = f"<swaks-{port}@client.test>"
    result = subprocess.run(
        [swaks, "--server", f"{host}:{port}", "--local-interface", "127.0.0.1", "--from", "a@client.test",
         "--to", "b@dest.test", "--header", f"Message-ID: {msg_id3}", "--pipeline"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<~  250 2.0.0 Ok: queued as " in result.stdout or "<-  250 2.0.0 Ok: queued as " in result.stdout
    ids.append(msg_id3)
    waiting.wait_until(lambda: all(delivered(sink, i) for i in ids),
                       what='all(delivered(sink, i) for i in ids)')


def test_idle_command_timeout_421(relay: relayproc.RelayProcess) -> None:
    w = smtpwire.Wire(relay.smtp_address, source="127.0.0.1")
    try:
        w.ehlo()
        code, lines = w.reply()  # nothing sent: the relay speaks first after --command-timeout
        assert (code, lines) == (421, [f"4.4.2 {HOSTNAME} Error: timeout exceeded"])
        assert w.closed()
    finally:
        w.close()


def test_metrics_count_replies(relay: relayproc.RelayProcess) -> None:
    text = relay.metrics()
    assert 'mailrelay_relay_replies_total{code="250"}' in text
    assert 'mailrelay_relay_connections_total{result="refused_busy"}' in text
    assert "mailrelay_relay_messages_accepted_total" in text
