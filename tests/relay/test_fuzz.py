"""Hypothesis-driven SMTP fuzzing of a RUNNING relay process over real sockets (issue 6 §3).

What it checks, for every generated command stream (valid, near-valid, garbage, binary, huge lines,
pipelined batches or trickled chunks):
- nothing crashes: the process stays up, /healthz answers, and no session dies of an internal error;
- every reply is well-formed: 3-digit code, proper `ddd-` continuation, printable ASCII, and an
  enhanced status code wherever ENHANCEDSTATUSCODES applies;
- the spool stays intact: every queue file parses as a complete record, nothing half-written is left;
- nothing is lost or invented: the number of `250 ... queued as` replies equals what reached the
  upstream sink plus what went to dead-letter.
A second property checks DATA transparency: any valid body (dot-stuffed by the client) arrives at the
upstream byte for byte, and any body with a bare CR or LF or a NUL is refused with 550 5.6.0 and never
relayed.

The number of examples per property comes from MAILRELAY_FUZZ_EXAMPLES (default 150: about 15 s in
all here; 2000 per property ran clean).
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailrelay_sandbox import relayproc, waiting

from tests.conftest import require_tool
from tests.relay import faults_harness as h

EXAMPLES = int(os.environ.get("MAILRELAY_FUZZ_EXAMPLES", "150"))
HOSTNAME = b"relay.test"
MAX_MESSAGE = 65536

pytestmark = pytest.mark.timeout(600)

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    print_blob=True,
)


# ------------------------------------------------------------------------------------------------
# the relay under test (one per module: starting one per example would cost more than the fuzzing)


class Target:
    def __init__(self, relay: relayproc.RelayProcess, sink: h.RecordingSink) -> None:
        self.relay = relay
        self.sink = sink
        self.queued = 0  # `250 2.0.0 Ok: queued as` replies seen by the fuzzers
        self.exchanges = 0
        self.bodies = 0  # examples of the body fuzzer


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("fuzz")
    # STARTTLS is offered, so that streams which say STARTTLS and then send anything but a handshake
    # are fuzzed too; two workers, so that the pod-wide counters and the supervisor are under test.
    openssl = require_tool("openssl")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=relay.test"], check=True, capture_output=True)
    with h.RecordingSink() as sink:
        relay = h.relay_process(
            tmp, sink.address,
            extra=["--max-message-size", str(MAX_MESSAGE), "--max-recipients", "5", "--command-timeout", "5",
                   "--data-timeout", "10", "--max-sessions", "50", "--workers", "2",
                   "--tls-cert", str(cert), "--tls-key", str(key)],
        ).start()
        try:
            target = Target(relay, sink)
            yield target
            if target.exchanges:
                check_aftermath(target)
        finally:
            relay.kill()


def check_target(t: Target) -> None:
    assert t.relay.running, f"relay process died; log tail:\n{t.relay.log_text()[-3000:]}"
    assert t.relay.healthy(), "/healthz does not answer"
    crashed = [line for line in t.relay.log_text().splitlines() if "crashed" in line or "Traceback" in line]
    assert not crashed, "a session died of an internal error:\n" + "\n".join(crashed[:5])


# ------------------------------------------------------------------------------------------------
# talking to it


def exchange(t: Target, chunks: list[bytes], *, trickle: bool, timeout: float = 30.0) -> bytes:
    """Send `chunks` (all at once, or one by one with short pauses) while reading, then a closing
    sequence that ends any DATA and QUITs; return every byte the relay sent until it closed."""
    closing = b"\r\n.\r\nQUIT\r\n"
    sock = socket.create_connection(t.relay.smtp_address, timeout=10)
    sock.setblocking(False)
    received = bytearray()
    pending = [b"".join(chunks) + closing] if not trickle else [*chunks, closing]
    out = b""
    deadline = time.monotonic() + timeout
    closed = False
    try:
        while not closed:
            if time.monotonic() > deadline:
                raise AssertionError(f"the relay neither answered QUIT nor closed within {timeout} s; "
                                     f"got {bytes(received[-300:])!r}")
            if not out and pending:
                out = pending.pop(0)
                if trickle:
                    time.sleep(0.002)
            want_write = [sock] if out else []
            readable, writable, _ = select.select([sock], want_write, [], 0.5)
            if readable:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    closed = True
                received += chunk
            if writable and out:
                try:
                    n = sock.send(out[:65536])
                    out = out[n:]
                except (BrokenPipeError, ConnectionResetError):
                    out, pending = b"", []
    finally:
        sock.close()
    return bytes(received)


def split_replies(data: bytes) -> list[list[bytes]]:
    """Group the relay's output into replies; a trailing fragment without CRLF is malformed."""
    if data and not data.endswith(b"\r\n"):
        raise h.MalformedReply(f"output does not end with CRLF: {data[-200:]!r}")
    replies: list[list[bytes]] = []
    current: list[bytes] = []
    for line in data.split(b"\r\n")[:-1] if data else []:
        current.append(line)
        if line[3:4] != b"-":
            replies.append(current)
            current = []
    if current:
        raise h.MalformedReply(f"unterminated multi-line reply: {current!r}")
    return replies


def check_output(t: Target, data: bytes) -> list[list[bytes]]:
    t.exchanges += 1
    replies = split_replies(data)
    assert replies, "no greeting"
    for i, reply in enumerate(replies):
        for line in reply:
            assert all(32 <= b < 127 for b in line), f"non-printable reply line {line!r}"
        code = h.check_reply(reply, enhanced=False)
        # ENHANCEDSTATUSCODES is advertised, so every 2xx/4xx/5xx reply carries an enhanced code, except
        # the greeting and the HELO/EHLO answers (which start with the host name), as RFC 2034 allows.
        is_greeting = i == 0 and code == 220
        is_helo = code == 250 and reply[0][4:].startswith(HOSTNAME)
        if code // 100 in (2, 4, 5) and not is_greeting and not is_helo:
            h.check_reply(reply, enhanced=True)
    first = replies[0][0]
    assert first.startswith(b"220 ") or first.startswith(b"421 4.3.2"), first
    t.queued += sum(1 for r in replies if r[0].startswith(b"250 2.0.0 Ok: queued as "))
    return replies


# ------------------------------------------------------------------------------------------------
# strategies

VALID_LINE = st.binary(max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
ENDINGS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""])
ADDRESSES = st.sampled_from([
    b"<a@example.org>", b"<>", b"<postmaster>", b"<\"quoted local\"@example.org>", b"<a@[127.0.0.1]>",
    b"<@hop.example:a@example.org>", b"a@example.org", b"<a@b@c>", b"<a@example.org", b"<>>",
    b"<" + b"x" * 300 + b"@example.org>", b"<a\x00b@example.org>", b"<\xc3\xa9@example.org>",
    b"<a@-bad-.example>", b"< a@example.org >",
])
PARAMS = st.lists(st.sampled_from([
    b"SIZE=100", b"SIZE=0", b"SIZE=99999999999999999999999", b"SIZE=-1", b"SIZE=", b"SIZE",
    b"SIZE=70000", b"BODY=8BITMIME", b"BODY=7BIT", b"BODY=BINARYMIME", b"BODY=x", b"SMTPUTF8",
    b"RET=FULL", b"NOTIFY=NEVER", b"ORCPT=rfc822;a@b", b"XFOO=1", b"=", b"A=B=C", b"SIZE=1 SIZE=2",
]), max_size=3)
VERBS = [b"HELO", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"VRFY", b"HELP", b"STARTTLS",
         b"BDAT", b"AUTH", b"EXPN", b"TURN", b"XCLIENT", b"QUIT"]


@st.composite
def valid_transaction(draw: st.DrawFn) -> list[bytes]:
    body_lines = draw(st.lists(VALID_LINE, max_size=6))
    body = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in body_lines)
    rcpts = draw(st.integers(1, 3))
    lines = [b"MAIL FROM:<fuzz@example.org>\r\n"]
    lines += [f"RCPT TO:<r{i}@example.net>\r\n".encode() for i in range(rcpts)]
    lines += [b"DATA\r\n", b"Subject: fuzz\r\n\r\n" + body + b".\r\n"]
    return lines


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    verb = draw(st.sampled_from(VERBS))
    verb = draw(st.sampled_from([verb, verb.lower(), verb.title(), b" " + verb, verb + b" "]))
    if verb.strip().upper() in (b"MAIL", b"RCPT"):
        key = b"FROM:" if verb.strip().upper() == b"MAIL" else b"TO:"
        key = draw(st.sampled_from([key, key.lower(), key[:-1], key + b" "]))
        arg = key + draw(ADDRESSES) + b"".join(b" " + p for p in draw(PARAMS))
    else:
        arg = draw(st.sampled_from([b"", b"client.test", b"x" * 300, b"\xff\xfe", b"a b c", b"[127.0.0.1]"]))
    sep = draw(st.sampled_from([b" ", b"", b"  ", b"\t"]))
    return verb + (sep + arg if arg else b"") + draw(ENDINGS)


HUGE = st.sampled_from([1001, 2049, 65535, 65536, 70000, 200_000]).map(lambda n: b"A" * n)


@st.composite
def chunk(draw: st.DrawFn) -> list[bytes]:
    kind = draw(st.sampled_from(["valid", "valid", "near", "near", "near", "garbage", "binary", "huge",
                                 "data-body"]))
    if kind == "valid":
        return draw(valid_transaction())
    if kind == "near":
        return [draw(near_valid())]
    if kind == "garbage":
        return [draw(st.text(max_size=100)).encode("utf-8", "surrogatepass") + draw(ENDINGS)]
    if kind == "binary":
        return [draw(st.binary(max_size=300))]
    if kind == "huge":
        return [draw(HUGE) + draw(ENDINGS)]
    # a DATA body with hostile line endings and dots, whether or not a DATA is open
    parts = draw(st.lists(st.sampled_from([b"text", b".", b"..", b"\r\n", b"\n", b"\r", b".\r\n",
                                           b"\r\n.\r\n", b"\n.\n", b"\x00", b"A" * 999]), max_size=12))
    return [b"".join(parts)]


STREAMS = st.tuples(
    st.sampled_from([[b"EHLO fuzz.test\r\n"], [b"HELO fuzz.test\r\n"], []]),
    st.lists(chunk(), min_size=1, max_size=8),
    st.booleans(),
)


# ------------------------------------------------------------------------------------------------
# properties


@FUZZ_SETTINGS
@given(stream=STREAMS)
def test_fuzz_command_streams_never_crash_and_replies_are_well_formed(
    target: Target, stream: tuple[list[bytes], list[list[bytes]], bool]
) -> None:
    opening, chunks, trickle = stream
    flat = opening + [piece for c in chunks for piece in c]
    data = exchange(target, flat, trickle=trickle)
    check_output(target, data)
    assert target.relay.running, f"relay died; log tail:\n{target.relay.log_text()[-3000:]}"


@FUZZ_SETTINGS
@given(lines=st.lists(VALID_LINE, max_size=20), bad=st.sampled_from([None, b"\n", b"\r", b"\r\r\n"]),
       at=st.integers(0, 20))
def test_fuzz_data_is_transparent_or_refused(
    target: Target, lines: list[bytes], bad: bytes | None, at: int
) -> None:
    """A body of valid lines arrives byte for byte (dot-stuffing undone); a body with a bare CR or LF, or
    a NUL octet, gets 550 5.6.0 and reaches nobody."""
    target.bodies += 1
    marker = f"fuzz-{time.monotonic_ns()}".encode()
    content_lines = [b"Message-ID: <" + marker + b"@test>", b"", *lines]
    wire_lines = [b"." + x if x.startswith(b".") else x for x in content_lines]
    body = b"".join(x + b"\r\n" for x in wire_lines)
    if bad is not None:
        cut = min(at, len(lines)) + 2
        prefix = b"".join(x + b"\r\n" for x in wire_lines[:cut])
        body = prefix + b"bad" + bad + b"line\r\n" + body[len(prefix):]
    data = exchange(target, [b"EHLO fuzz.test\r\n", b"MAIL FROM:<f@example.org>\r\n",
                             b"RCPT TO:<t@example.net>\r\n", b"DATA\r\n", body + b".\r\n", b"QUIT\r\n"],
                    trickle=False)
    replies = check_output(target, data)
    final = [r for r in replies if r[0][:3] in (b"250", b"550", b"552", b"451", b"452")][-1]
    expected_content = b"".join(x + b"\r\n" for x in content_lines)
    if bad is not None or b"\x00" in expected_content:
        assert final[0].startswith(b"550 5.6.0"), h.text(final)
    elif len(expected_content) > MAX_MESSAGE:
        assert final[0].startswith(b"552"), h.text(final)
    else:
        assert final[0].startswith(b"250 2.0.0 Ok: queued as"), h.text(final)
        waiting.wait_until(lambda: bool(target.sink.bodies_containing(marker)), within=30,
                           what="the accepted message at the sink")
        (arrived,) = target.sink.bodies_containing(marker)
        assert arrived.data == expected_content


def check_aftermath(target: Target) -> None:
    """After whichever fuzz properties ran (the module fixture calls this when it ends, so no test depends
    on another's order): the relay is up, no session crashed, the spool is intact, and every `queued as`
    reply is accounted for at the sink or in dead-letter, exactly."""
    check_target(target)
    relay = target.relay
    waiting.wait_until(lambda: relay.status()["queue"]["messages"] == 0, within=60,
                       what='relay.status()["queue"]["messages"] == 0')
    assert h.spool_problems(relay.spool) == []
    assert list((relay.spool / "queue").iterdir()) == []
    assert list((relay.spool / "tmp").iterdir()) == [], "half-written files left behind"
    _, messages = target.sink.snapshot()
    dead = h.dead_letters(relay.spool)
    if target.bodies:
        assert target.queued > 0, "the body fuzzer never got a message accepted: its generator is too weak"
    assert len(messages) + len(dead) == target.queued, (len(messages), len(dead), target.queued)
