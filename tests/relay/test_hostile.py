"""Hostile and extreme input against a real relay process: SMTP smuggling vectors, over-long lines,
1,000 recipients, garbage, oversized data and slow clients. The relay must answer precisely, never split
one DATA into two messages, never crash, and keep serving."""

from __future__ import annotations

import pathlib
import random
import threading
import time
from collections.abc import Iterator

import pytest
from mailrelay_sandbox import relayproc, smtpwire, waiting
from mailrelay_sandbox import sink as sinkmod

from tests.relay import relay_harness
from tests.relay.relay_harness import HOSTNAME, message, start_relay

ARGS = ["--max-message-size", "200000", "--data-timeout", "2", "--command-timeout", "30",
        "--max-sessions", "50", "--log-level", "debug"]


@pytest.fixture(scope="module")
def sink() -> Iterator[sinkmod.Sink]:
    with sinkmod.running() as s:
        yield s


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, sink: sinkmod.Sink) -> Iterator[relayproc.RelayProcess]:
    r = start_relay(tmp_path_factory.mktemp("hostile"), sink.address, args=ARGS)
    yield r
    r.kill()


@pytest.fixture
def wire(relay: relayproc.RelayProcess) -> Iterator[smtpwire.Wire]:
    w = smtpwire.Wire(relay.smtp_address)
    yield w
    w.close()
    assert relay.running


def start_data(w: smtpwire.Wire) -> None:
    w.ehlo()
    assert w.cmd("MAIL FROM:<a@client.test>")[0] == 250
    assert w.cmd("RCPT TO:<b@dest.test>")[0] == 250
    assert w.cmd("DATA")[0] == 354


BARE_LF_END = (f"5.6.0 {HOSTNAME} Error: bare <LF> received; end DATA with <CRLF>.<CRLF> "
               "(RFC 5321 section 4.1.1.4)")
SMUGGLED = (b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled body\r\n")


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n",
                                      b"\n.", b"\r\n\x00.\r\n"])
def test_smuggling_vectors_never_make_two_messages(
    relay: relayproc.RelayProcess, wire: smtpwire.Wire, sink: sinkmod.Sink, fake_end: bytes,
) -> None:
    start_data(wire)
    _, content = message("carrier")
    # the fake end of data, a smuggled transaction, its own end, then the one real end of data
    wire.send(content.rstrip(b"\r\n") + fake_end + SMUGGLED + b".\r\n" + b"NOOP\r\n")
    first = wire.reply()
    if b"\n.\n" in fake_end:  # LF "." LF: answered at once, and the session closes
        assert first == (550, [BARE_LF_END])
        assert wire.closed()
    else:
        if fake_end == b"\r\n\x00.\r\n":  # ends DATA for a receiver that drops NUL octets
            assert first == (550, ["5.6.0 Error: NUL octet in message data (RFC 5321 section 2.3.8)"])
        else:
            assert first == (550, ["5.6.0 Error: bare CR or LF in message data (RFC 5321 section 2.3.8)"])
        # the NOOP: nothing inside the DATA was taken as a command
        assert wire.reply() == (250, ["2.0.0 Ok"])
    relay_harness.sentinel(relay, lambda msg_id: any(msg_id in m.content for m in sink.messages))
    assert not any(b"smuggled body" in m.content and b"Subject: smuggled" in m.content.split(b"\r\n\r\n")[0]
                   for m in sink.messages)
    assert all(m.mail_from != "evil@attacker.test" for m in sink.messages)


@pytest.mark.parametrize("size", [100, 150_000])
def test_a_bare_lf_end_of_data_is_answered_at_once(
    wire: smtpwire.Wire, sink: sinkmod.Sink, size: int,
) -> None:
    """A client that ends DATA with LF "." LF gets 550 and a closed session at once, not the data
    timeout's 421 (the relay here waits 2 s for a DATA; the reply would be 421 4.4.2 then)."""
    start_data(wire)
    msg_id, content = message("bare lf", size=size)
    wire.send(content.replace(b"\r\n", b"\n") + b".\n")
    assert wire.reply() == (550, [BARE_LF_END])
    assert wire.closed()
    assert msg_id not in b"".join(m.content for m in sink.messages).decode("latin-1")


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_nul_octet_anywhere_is_refused_and_never_relayed(
    wire: smtpwire.Wire, sink: sinkmod.Sink, where: str
) -> None:
    start_data(wire)
    msg_id, content = message("nul")
    at = {"start": 0, "middle": len(content) // 2, "end": len(content) - 2}[where]
    wire.send(content[:at] + b"\x00" + content[at:] + b".\r\n")
    assert wire.reply() == (550, ["5.6.0 Error: NUL octet in message data (RFC 5321 section 2.3.8)"])
    assert wire.line("NOOP") == "250 2.0.0 Ok"
    assert all(b"\x00" not in m.content for m in sink.messages)
    assert msg_id not in b"".join(m.content for m in sink.messages).decode("latin-1")


def test_over_long_command_line(wire: smtpwire.Wire) -> None:
    wire.ehlo()
    assert wire.line("NOOP " + "x" * 5000) == "500 5.5.2 Error: command line too long"
    too_long = "MAIL FROM:<" + "a" * 300_000 + "@client.test>"
    assert wire.line(too_long) == "500 5.5.2 Error: command line too long"
    assert wire.line("NOOP") == "250 2.0.0 Ok"


@pytest.mark.parametrize("length", [1001, 70_000, 150_000])
def test_over_long_data_line(wire: smtpwire.Wire, sink: sinkmod.Sink, length: int) -> None:
    start_data(wire)
    msg_id, content = message("long line")
    # a long line that ends in ".\r\n": its tail is not at a line start, so it is not an end of data
    wire.send(content + b"y" * length + b"\r\n.\r\nNOOP\r\n")
    assert wire.reply() == (550, ["5.6.0 Error: line longer than 1000 octets (RFC 5321 section 4.5.3.1.6)"])
    assert wire.reply() == (250, ["2.0.0 Ok"])
    start_tail = b"z" * 70_000 + b".\r\n"  # 70 kB, then ".\r\n" glued to its end
    assert wire.cmd("MAIL FROM:<a@client.test>")[0] == 250
    assert wire.cmd("RCPT TO:<b@dest.test>")[0] == 250
    assert wire.cmd("DATA")[0] == 354
    wire.send(start_tail + b"NOOP\r\n.\r\n")
    assert wire.reply()[0] == 550  # one message, rejected; the NOOP inside it was content
    assert wire.line("NOOP") == "250 2.0.0 Ok"
    assert msg_id not in b"".join(m.content for m in sink.messages).decode("latin-1")


def test_oversized_data_without_size(wire: smtpwire.Wire) -> None:
    start_data(wire)
    _, content = message("big", size=250_000)
    wire.send(content + b".\r\n")
    assert wire.reply() == (552, ["5.3.4 Error: message size exceeds fixed maximum message size"])
    assert wire.line("NOOP") == "250 2.0.0 Ok"


def test_thousand_recipients_pipelined(wire: smtpwire.Wire, sink: sinkmod.Sink) -> None:
    wire.ehlo()
    batch = b"MAIL FROM:<a@client.test>\r\n" + b"".join(
        b"RCPT TO:<r%d@dest.test>\r\n" % n for n in range(1000))
    wire.send(batch)
    assert wire.reply() == (250, ["2.1.0 Ok"])
    replies = [wire.reply() for _ in range(1000)]
    assert replies[:100] == [(250, ["2.1.5 Ok"])] * 100
    assert replies[100:] == [(452, ["4.5.3 Error: too many recipients"])] * 900
    assert wire.cmd("DATA")[0] == 354
    msg_id, content = message("many")
    wire.send(content + b".\r\n")
    assert wire.reply()[0] == 250
    waiting.wait_until(lambda: any(msg_id.encode() in m.content for m in sink.messages),
                       what='any(msg_id.encode() in m.content for m in sink.messages)')
    got = next(m for m in sink.messages if msg_id.encode() in m.content)
    assert len(got.rcpt_tos) == 100


def test_garbage_commands_end_the_session(relay: relayproc.RelayProcess) -> None:
    rng = random.Random(1234)
    w = smtpwire.Wire(relay.smtp_address)
    try:
        w.ehlo()
        codes = []
        for _ in range(12):
            junk = bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 200))).replace(b"\n", b"")
            w.send(junk + b"\r\n")
            code, _ = w.reply()
            codes.append(code)
            if code == 421:
                break
        assert codes[-1] == 421 and set(codes[:-1]) <= {500, 501, 502}
        assert w.closed()
    finally:
        w.close()
    # binary garbage without any newline is an over-long line, not a crash
    w2 = smtpwire.Wire(relay.smtp_address)
    try:
        w2.send(bytes(rng.randrange(0, 256) for _ in range(100_000)).replace(b"\n", b"") + b"\r\n")
        assert w2.reply() == (500, ["5.5.2 Error: command line too long"])
        assert w2.line("NOOP") == "250 2.0.0 Ok"
    finally:
        w2.close()
    assert relay.get("/healthz")[0] == 200


def test_slow_data_hits_the_data_deadline(relay: relayproc.RelayProcess, sink: sinkmod.Sink) -> None:
    w = smtpwire.Wire(relay.smtp_address)
    stop = threading.Event()

    def trickle(lines: list[bytes]) -> None:
        for line in lines:  # each line well within the command timeout, the whole far beyond --data-timeout
            if stop.wait(0.3):
                return
            try:
                w.send(line + b"\r\n")
            except OSError:
                return

    try:
        start_data(w)
        msg_id, content = message("slow")
        sender = threading.Thread(target=trickle, args=(content.split(b"\r\n") * 20,))
        started = time.monotonic()
        sender.start()
        assert w.reply() == (421, [f"4.4.2 {HOSTNAME} Error: timeout exceeded"])
        assert time.monotonic() - started >= 1.5
        assert w.closed()
        assert not any(msg_id.encode() in m.content for m in sink.messages)
    finally:
        stop.set()
        w.close()


def test_many_connections_that_vanish(relay: relayproc.RelayProcess) -> None:
    for n in range(30):
        w = smtpwire.Wire(relay.smtp_address, greet=n % 2 == 0)
        if n % 3 == 0:
            w.send(b"EHLO x\r\nMAIL FROM:<a@client.test>\r\n")
        w.close()
    waiting.wait_until(lambda: relay.status()["sessions"] == 0, what='relay.status()["sessions"] == 0')
    waiting.wait_until(lambda: relay.status()["inflight_bytes"] == 0,
                       what='relay.status()["inflight_bytes"] == 0')


def test_log_never_contains_content(relay: relayproc.RelayProcess, tmp_path: pathlib.Path) -> None:
    w = smtpwire.Wire(relay.smtp_address)
    try:
        start_data(w)
        w.send(b"Subject: secret-subject-7731\r\n\r\nsecret-body-7731\r\n.\r\n")
        code, lines = w.reply()
        assert code == 250 and lines[-1].startswith("2.0.0 Ok: queued as "), lines
    finally:
        w.close()
    queue_id = lines[-1].rsplit(" ", 1)[1]
    # the barrier: the message's last log line (its delivery) is written
    waiting.wait_until(lambda: any(e.get("event") == "delivery.delivered" and e.get("queue_id") == queue_id
                                   for e in relay.log_events()), what="the message's delivery in the log")
    text = relay.log_text()
    assert "secret-body-7731" not in text and "secret-subject-7731" not in text
    assert any(e["event"] == "message.queued" and e.get("session") for e in relay.log_events())
