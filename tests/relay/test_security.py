"""Security tests: a real relay process attacked over real sockets (see docs/security.md).

Each test names the attack, the expected defence, and checks the effect where it would land: at a
recording upstream sink (what commands and messages reached it), in the spool, or in the relay's
memory. Covered: open-relay probes (--accept-from), the admin API's bearer token, CR/LF and header
injection into upstream commands, SMTP smuggling, STARTTLS command injection, and resource exhaustion
(connection flood, slowloris, huge DATA).
"""

from __future__ import annotations

import contextlib
import pathlib
import select
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from mailrelay_sandbox import kubelet, relayproc, smtpwire, waiting

from tests.conftest import missing, require_tool
from tests.relay import faults_harness as h
from tests.relay import relay_harness

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sink() -> Iterator[h.RecordingSink]:
    with h.RecordingSink() as s:
        yield s


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[h.RecordingSink, relayproc.RelayProcess]]:
    """One sink and one default relay for the injection and smuggling cases (starting a relay per case
    would cost more than the cases). Every case checks invariants that hold for all of them together."""
    tmp = tmp_path_factory.mktemp("shared-relay")
    with h.RecordingSink() as s, h.relay(tmp, s.address) as r:
        yield s, r


def settle(relay: relayproc.RelayProcess, what: str, within: float = 30) -> None:
    """Wait until the relay's queue is empty (everything delivered or dead-lettered)."""
    waiting.wait_until(lambda: relay.status()["queue"]["messages"] == 0, within=within, every=0.1, what=what)


# ------------------------------------------------------------------------------------------------
# open relay


OUTSIDE_RCPTS = [
    "victim@example.net",
    "victim@relay.test",              # the relay's own hostname
    "postmaster@relay.test",
    "victim@[127.0.0.1]",             # address literal
    "@hop.example:victim@example.net",  # source route
    "victim%example.net@relay.test",  # percent hack
    '"victim@example.net"@relay.test',  # quoted local part
]


def test_open_relay_client_outside_accept_from_gets_554_for_any_domain(
    tmp_path: pathlib.Path, sink: h.RecordingSink
) -> None:
    """A client whose source address is outside --accept-from may not relay to any recipient: 554 5.7.1
    at RCPT, DATA is refused, and nothing reaches the upstream or the spool. A client inside may."""
    with h.relay(tmp_path, sink.address, extra=["--accept-from", "127.0.0.2/32"]) as relay:
        with smtpwire.Wire(relay.smtp_address, greet=False, source="127.0.0.3") as c:
            assert h.first_code(c.reply_lines()) == 220
            assert h.first_code(c.cmd_lines("EHLO outsider.test")) == 250
            assert h.first_code(c.cmd_lines("MAIL FROM:<spammer@example.org>")) in (250, 554)
            for rcpt in OUTSIDE_RCPTS:
                r = c.cmd_lines(f"RCPT TO:<{rcpt}>")
                assert r is not None and r[0].startswith(b"554 5.7.1"), (rcpt, h.text(r))
            # XCLIENT / PROXY-style spoofing of the client address is not honoured.
            r = c.cmd_lines("XCLIENT ADDR=127.0.0.2")
            assert h.first_code(r) in (500, 502), h.text(r)
            r = c.cmd_lines("DATA")
            assert h.first_code(r) in (503, 554), h.text(r)
            c.send(b"Subject: spam\r\n\r\nspam\r\n.\r\n")
            c.cmd_lines("QUIT")
        # A pipelined attempt: everything at once, no waiting for replies.
        with smtpwire.Wire(relay.smtp_address, greet=False, source="127.0.0.3") as c:
            c.reply_lines()
            c.send(b"EHLO outsider.test\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<v@example.net>\r\n"
                   b"DATA\r\nSubject: pipelined spam\r\n\r\nspam\r\n.\r\nQUIT\r\n")
            replies = []
            while (r := c.reply_lines()) is not None:
                replies.append(r)
            assert not any(x[0].startswith(b"250 2.0.0") for x in replies), [h.text(x) for x in replies]
        # An insider relays to the same foreign domain.
        ok = h.send_one(relay.smtp_address, "insider-ok", source="127.0.0.2", rcpt="victim@example.net")
        assert h.first_code(ok) == 250, h.text(ok)
        sink.wait_messages(1, within=30)
        _, messages = sink.snapshot()
        assert len(messages) == 1 and b"insider-ok" in messages[0].data
        assert not sink.bodies_containing(b"spam")
        assert h.spool_problems(relay.spool) == []


def _non_loopback_ipv4() -> str:
    """A local address outside 127.0.0.0/8: one of the sandbox's pod network (routed to this host)."""
    kubelet.ensure_pod_network()
    return kubelet.pod_ip(1, 250, 7)


def test_open_relay_default_accepts_only_loopback(tmp_path: pathlib.Path, sink: h.RecordingSink) -> None:
    """Without --accept-from the relay relays for loopback only: a client on another local address
    gets 554 5.7.1, a loopback client gets through."""
    addr = _non_loopback_ipv4()
    r = h.relay_process(tmp_path, sink.address, host=addr)
    try:
        r.start()
        with smtpwire.Wire(r.smtp_address, greet=False, source=addr) as c:
            c.reply_lines()
            c.cmd_lines("EHLO outsider.test")
            c.cmd_lines("MAIL FROM:<s@example.org>")
            reply = c.cmd_lines("RCPT TO:<victim@example.net>")
            assert reply is not None and reply[0].startswith(b"554 5.7.1"), h.text(reply)
    finally:
        r.kill()
    with h.relay(tmp_path / "lo", sink.address) as relay:
        ok = h.send_one(relay.smtp_address, "loopback-ok", source="127.0.0.9")
        assert h.first_code(ok) == 250, h.text(ok)


def _ipv6_loopback() -> bool:
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return True
    return False


def test_open_relay_ipv6_client_is_checked_against_accept_from(
    tmp_path: pathlib.Path, sink: h.RecordingSink
) -> None:
    """An IPv6 client is held to --accept-from like an IPv4 one: a relay on [::1] that accepts only
    127.0.0.0/8 refuses ::1 with 554 5.7.1; with ::1/128 added it relays."""
    if not _ipv6_loopback():
        missing("no IPv6 loopback on this machine")
    for accept, expected in (("127.0.0.0/8", b"554 5.7.1"), ("127.0.0.0/8,::1/128", b"250")):
        r = h.relay_process(tmp_path / accept.replace("/", "_").replace(",", "+").replace(":", "c"),
                           sink.address, smtp_host="::1", extra=["--accept-from", accept])
        try:
            r.start()
            with smtpwire.Wire(r.smtp_address, greet=False) as c:
                c.reply_lines()
                c.cmd_lines("EHLO v6.test")
                c.cmd_lines("MAIL FROM:<a@example.org>")
                reply = c.cmd_lines("RCPT TO:<victim@example.net>")
                assert reply is not None and reply[0].startswith(expected), (accept, h.text(reply))
        finally:
            r.kill()


# ------------------------------------------------------------------------------------------------
# admin API


@pytest.mark.parametrize("workers", [1, 2])
def test_admin_api_needs_the_bearer_token(
    tmp_path: pathlib.Path, sink: h.RecordingSink, workers: int
) -> None:
    """/status, /drain and /resume answer 401 without a token, with a wrong one, or with another
    scheme; a refused POST /drain changes nothing. /healthz, /readyz and /metrics stay open, and the
    token never appears in /metrics or the log."""
    token = "correct-horse-battery-staple"
    with h.relay(tmp_path, sink.address, token=token, extra=["--workers", str(workers)]) as relay:
        base = f"http://{relay.host}:{relay.admin_port}"
        import urllib.error
        import urllib.request

        def call(method: str, path: str, auth: str | None) -> int:
            req = urllib.request.Request(base + path, method=method, data=b"" if method == "POST" else None)
            if auth is not None:
                req.add_header("Authorization", auth)
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return int(resp.status)
            except urllib.error.HTTPError as e:
                return int(e.code)

        bad = [None, "Bearer", "Bearer ", "Bearer wrong", f"Bearer {token}x", f"Bearer {token[:-1]}",
               f"Basic {token}", token, f"Bearer  {token.upper()}"]
        for method, path in (("GET", "/status"), ("POST", "/drain"), ("POST", "/resume")):
            for auth in bad:
                assert call(method, path, auth) == 401, (method, path, auth)
        assert call("GET", "/readyz", None) == 200, "a refused /drain must not drain"
        for path in ("/healthz", "/readyz", "/metrics"):
            assert call("GET", path, None) == 200, path
        assert call("GET", "/status", f"Bearer {token}") == 200
        assert call("POST", "/drain", f"bearer {token}") == 200
        assert call("GET", "/readyz", None) == 503
        assert call("POST", "/resume", f"Bearer {token}") == 200
        assert token not in relay.metrics()
        assert token not in relay.log_text()


# ------------------------------------------------------------------------------------------------
# CR/LF and header injection into upstream commands

INJECTED = b"injected"  # every hostile payload carries this word; it must never start an upstream line

HOSTILE_ENVELOPES: list[tuple[str, bytes, bytes]] = [
    # (name, MAIL line, RCPT line) as raw bytes the client sends (each then gets CRLF)
    ("bare CR in sender", b"MAIL FROM:<a@example.org\rRCPT TO:<injected@evil.test>>",
     b"RCPT TO:<ok@example.net>"),
    ("bare CR in recipient", b"MAIL FROM:<a@example.org>",
     b"RCPT TO:<ok@example.net\rRSET\rMAIL FROM:<injected@evil.test>>"),
    ("NUL in recipient", b"MAIL FROM:<a@example.org>", b"RCPT TO:<ok@example.net\x00injected>"),
    ("TAB in recipient", b"MAIL FROM:<a@example.org>", b"RCPT TO:<ok\t@example.net>"),
    ("DEL in sender", b"MAIL FROM:<a\x7f@example.org>", b"RCPT TO:<ok@example.net>"),
    ("CR in a MAIL parameter", b"MAIL FROM:<a@example.org> BODY=8BITMIME\rRCPT TO:<injected@evil.test>",
     b"RCPT TO:<ok@example.net>"),
    ("ESC in sender", b"MAIL FROM:<a\x1b[2J@example.org>", b"RCPT TO:<ok@example.net>"),
]


@pytest.mark.parametrize(("mail", "rcpt"), [(m, r) for _, m, r in HOSTILE_ENVELOPES],
                         ids=[n for n, _, _ in HOSTILE_ENVELOPES])
def test_crlf_injection_never_reaches_the_upstream_as_a_command(
    shared: tuple[h.RecordingSink, relayproc.RelayProcess], mail: bytes, rcpt: bytes
) -> None:
    """Control characters in envelope addresses or parameters are either refused at MAIL/RCPT (5xx), or
    the message is accepted and then accounted for (delivered or dead-lettered with a reason). In no case
    does any line the upstream receives start with something the client wrote inside an address, and no
    upstream command carries a control character."""
    sink, relay = shared
    marker = "crlf-" + str(abs(hash(mail + rcpt)))
    with smtpwire.Wire(relay.smtp_address, greet=False) as c:
        c.reply_lines()
        c.cmd_lines("EHLO client.test")
        r_mail = c.cmd_lines(mail)
        r_rcpt = c.cmd_lines(rcpt)
        r_data = c.cmd_lines("DATA")
        final = None
        if h.first_code(r_data) == 354:
            c.send(f"Subject: {marker}\r\n\r\n{marker}\r\n.\r\n".encode())
            final = c.reply_lines()
        c.cmd_lines("QUIT")
    for r in (r_mail, r_rcpt, r_data, final):
        if r is not None:
            h.check_reply(r, enhanced=True)
    accepted = h.first_code(final) == 250
    if accepted:
        settle(relay, "every accepted hostile message delivered or dead-lettered")
    relay_harness.sentinel(relay, lambda msg_id: bool(sink.bodies_containing(msg_id)))
    lines, messages = sink.snapshot()
    for line in lines:
        assert not line.lower().startswith(INJECTED), line
        assert not line.upper().startswith((b"RSET", b"MAIL FROM:<INJECTED")), line
        assert not any(b < 0x20 or b == 0x7f for b in line), f"control byte sent upstream: {line!r}"
    assert not any(b"injected@evil.test" in rcpt_ for m in messages for rcpt_ in m.rcpt_tos)
    if accepted:
        delivered = [m for m in messages if marker.encode() in m.data]
        dead = [d for d in h.dead_letters(relay.spool) if marker.encode() in d[2]]
        assert len(delivered) + len(dead) >= 1, "a message that got 250 was lost"
        assert all(reason for _, reason, _ in dead)
    assert relay.running and relay.healthy()
    assert h.spool_problems(relay.spool) == []


def test_header_injection_through_helo_name_is_not_possible(
    shared: tuple[h.RecordingSink, relayproc.RelayProcess]
) -> None:
    """A HELO/EHLO name with a bare CR must not become a header line upstream (for example in a
    Received: header the relay adds): the sink never sees an `X-Injected:` header line."""
    sink, relay = shared
    with smtpwire.Wire(relay.smtp_address, greet=False) as c:
        c.reply_lines()
        r = c.cmd_lines(b"EHLO host.test\rX-Injected: yes")
        assert r is not None
        h.check_reply(r, enhanced=False)
        if h.first_code(r) != 250:
            r = c.cmd_lines("EHLO host.test")
        c.cmd_lines("MAIL FROM:<a@example.org>")
        c.cmd_lines("RCPT TO:<b@example.net>")
        final = None
        if h.first_code(c.cmd_lines("DATA")) == 354:
            c.send(b"Subject: helo-injection\r\n\r\nbody\r\n.\r\n")
            final = c.reply_lines()
        c.cmd_lines("QUIT")
    if h.first_code(final) == 250:
        settle(relay, "an empty queue")
        assert sink.bodies_containing(b"helo-injection") or h.dead_letters(relay.spool)
    for m in sink.snapshot()[1]:
        for header_line in m.data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
            assert not header_line.lower().startswith(b"x-injected"), m.data
        assert b"\r" not in m.data.replace(b"\r\n", b""), "bare CR reached the upstream"


# ------------------------------------------------------------------------------------------------
# SMTP smuggling

SMUGGLING_ENDINGS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CR": b"\r.\r",
    "CRLF.LF": b"\r\n.\n",
    "CRLF.CR": b"\r\n.\r",
    "CR.CRLF": b"\r.\r\n",
}


@pytest.mark.parametrize("ending", list(SMUGGLING_ENDINGS.values()), ids=list(SMUGGLING_ENDINGS))
def test_smuggling_one_data_never_becomes_two_messages(
    shared: tuple[h.RecordingSink, relayproc.RelayProcess], ending: bytes
) -> None:
    """A DATA holding a fake end-of-data followed by a second, smuggled transaction gets exactly one
    reply for the whole DATA (a 5xx: bare CR/LF is rejected; an LF "." LF closes the session at once),
    and nothing reaches the upstream: neither the first part nor the smuggled message."""
    sink, relay = shared
    tag = ending.hex().encode()
    payload = (b"Subject: first " + tag + b"\r\n\r\nfirst part" + ending
               + b"MAIL FROM:<admin@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
               + b"Subject: smuggled " + tag + b"\r\n\r\nsmuggled body\r\n.\r\n")
    with smtpwire.Wire(relay.smtp_address, greet=False, timeout=15) as c:
        h.start_data(c)
        c.send(payload)
        r = c.reply_lines()
        assert r is not None, "connection closed instead of a reply"
        h.check_reply(r, enhanced=True)
        assert r[0][:1] == b"5", f"smuggling payload was not rejected: {h.text(r)}"
        if b"\n.\n" in ending:
            # LF "." LF: answered at once with 550 and the session closes; nothing after it is read
            assert b"bare <LF> received" in r[0], h.text(r)
            assert c.reply_lines() is None, "the session stayed open after a bare LF end of data"
        else:
            # Exactly one reply: the next thing on the wire answers our NOOP.
            noop = c.cmd_lines("NOOP")
            assert noop is not None and noop[0].startswith(b"250 2.0.0"), \
                f"the relay answered a smuggled command: {h.text(noop)}"
    relay_harness.sentinel(relay, lambda msg_id: bool(sink.bodies_containing(msg_id)))
    assert sink.bodies_containing(tag) == [], "something reached the upstream"
    assert relay.status()["queue"]["messages"] == 0
    assert h.spool_problems(relay.spool) == []


# ------------------------------------------------------------------------------------------------
# STARTTLS command injection


@pytest.fixture
def certificate(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    openssl = require_tool("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=relay.test"],
        check=True, capture_output=True,
    )
    return cert, key


def test_starttls_injection_pipelined_commands_are_discarded(
    tmp_path: pathlib.Path, sink: h.RecordingSink, certificate: tuple[pathlib.Path, pathlib.Path]
) -> None:
    """Commands pipelined in plaintext after STARTTLS (RFC 3207 §4.2; CVE-2011-0411 style) are
    discarded: inside TLS, the first reply answers our own EHLO, a RCPT without MAIL gets 503, and the
    injected MAIL/RCPT never reach the upstream."""
    cert, key = certificate
    with h.relay(tmp_path, sink.address, extra=["--tls-cert", str(cert), "--tls-key", str(key)]) as relay:
        sock = socket.create_connection(relay.smtp_address, timeout=15)
        raw = sock.makefile("rb")
        try:
            assert raw.readline().startswith(b"220")
            sock.sendall(b"EHLO client.test\r\n")
            ehlo = []
            while True:
                line = raw.readline()
                ehlo.append(line)
                if line[3:4] != b"-":
                    break
            assert any(b"STARTTLS" in x for x in ehlo), ehlo
            sock.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\nRCPT TO:<injected@evil.test>\r\n")
            assert raw.readline().startswith(b"220")
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            tls = ctx.wrap_socket(sock, server_hostname="relay.test")
            tf = tls.makefile("rb")
            tls.sendall(b"EHLO client.test\r\n")
            first = tf.readline()
            assert first.startswith(b"250-") or first.startswith(b"250 "), first
            while first[3:4] == b"-":
                first = tf.readline()
            tls.sendall(b"RCPT TO:<b@example.net>\r\n")
            r = tf.readline()
            assert r.startswith(b"503"), f"injected MAIL survived the handshake: {r!r}"
            tls.sendall(b"QUIT\r\n")
        finally:
            sock.close()
        relay_harness.sentinel(relay, lambda msg_id: bool(sink.bodies_containing(msg_id)))
        lines, _ = sink.snapshot()
        assert not any(b"injected" in line for line in lines)
        assert relay.running and relay.healthy()


def test_starttls_handshake_garbage_or_silence_ends_the_session(
    tmp_path: pathlib.Path, sink: h.RecordingSink, certificate: tuple[pathlib.Path, pathlib.Path]
) -> None:
    """After `220 Ready to start TLS`, bytes that are not a TLS handshake end the session at once, and
    silence ends it within the handshake deadline (min(60 s, --command-timeout)); the session slot is
    freed and the relay keeps serving."""
    cert, key = certificate
    extra = ["--tls-cert", str(cert), "--tls-key", str(key), "--command-timeout", "2"]
    with h.relay(tmp_path, sink.address, extra=extra) as relay:
        with smtpwire.Wire(relay.smtp_address, greet=False, timeout=10) as c:
            c.reply_lines()
            c.cmd_lines("EHLO client.test")
            assert h.first_code(c.cmd_lines("STARTTLS")) == 220
            c.send(b"\x00" * 4096 + b"MAIL FROM:<injected@evil.test>\r\n" * 50)
            assert c.wait_closed(10), "garbage instead of a TLS handshake did not end the session"
        with smtpwire.Wire(relay.smtp_address, greet=False, timeout=10) as c:
            c.reply_lines()
            c.cmd_lines("EHLO client.test")
            assert h.first_code(c.cmd_lines("STARTTLS")) == 220
            assert c.wait_closed(20), "a silent TLS handshake was never cut off"
        waiting.wait_until(lambda: relay.status()["sessions"] == 0, within=10,
                           what='relay.status()["sessions"] == 0')
        ok = h.send_one(relay.smtp_address, "after-tls-abuse")
        assert h.first_code(ok) == 250, h.text(ok)
        lines, _ = sink.snapshot()
        assert not any(b"injected" in line for line in lines)


# ------------------------------------------------------------------------------------------------
# resource exhaustion


@pytest.mark.parametrize("workers", [1, 2])
def test_connection_flood_beyond_the_cap_gets_421_and_the_relay_recovers(
    tmp_path: pathlib.Path, sink: h.RecordingSink, workers: int
) -> None:
    """With --max-sessions 5 (per pod, across workers), five sessions are served; every further
    connection gets `421 4.3.2` at the greeting and is closed (not refused, not left hanging). /healthz
    answers throughout, and once the flood is gone a new client sends mail normally."""
    cap = 5
    extra = ["--max-sessions", str(cap), "--workers", str(workers)]
    with h.relay(tmp_path, sink.address, extra=extra) as relay:
        held = []
        for _ in range(cap):
            c = smtpwire.Wire(relay.smtp_address, greet=False)
            assert h.first_code(c.reply_lines()) == 220
            held.append(c)
        # Give the relay a moment to account every session (some relays count after the greeting).
        waiting.wait_until(lambda: relay.status()["sessions"] >= cap, within=10,
                           what='relay.status()["sessions"] >= cap')
        refused = 0
        for _ in range(40):
            with smtpwire.Wire(relay.smtp_address, greet=False, timeout=15) as c:
                r = c.reply_lines()
                assert r is not None, "connection closed without a 421"
                h.check_reply(r, enhanced=False)
                assert r[0].startswith(b"421 4.3.2"), h.text(r)
                assert c.wait_closed(10), "the relay kept a refused connection open"
                refused += 1
        assert relay.healthy()
        for c in held:
            c.close()
        waiting.wait_until(lambda: relay.status()["sessions"] == 0, within=15,
                           what='relay.status()["sessions"] == 0')
        ok = h.send_one(relay.smtp_address, "after-flood")
        assert h.first_code(ok) == 250, h.text(ok)
        assert refused == 40
        assert 'mailrelay_relay_connections_total{result="refused_busy"} 40.0' in relay.metrics()


def test_slowloris_gets_421_442_and_is_closed(tmp_path: pathlib.Path, sink: h.RecordingSink) -> None:
    """A client that stops in the middle of a command line is answered `421 4.4.2` and closed after the
    per-command deadline; a client that trickles DATA is closed after the DATA deadline, and never gets
    a 250. The relay keeps serving others meanwhile."""
    with h.relay(tmp_path, sink.address, extra=["--command-timeout", "1", "--data-timeout", "3"]) as relay:
        with smtpwire.Wire(relay.smtp_address, greet=False, timeout=20) as c:
            c.reply_lines()
            assert h.first_code(c.cmd_lines("EHLO slow.test")) == 250
            c.send(b"MAIL FROM:<slow@exa")
            started = time.monotonic()
            r = c.reply_lines()
            waited = time.monotonic() - started
            assert r is not None and r[0].startswith(b"421 4.4.2"), h.text(r)
            assert waited < 15
            assert c.wait_closed(10)
        with smtpwire.Wire(relay.smtp_address, greet=False, timeout=30) as c:
            c.reply_lines()
            c.cmd_lines("EHLO slow.test")
            c.cmd_lines("MAIL FROM:<slow@example.org>")
            c.cmd_lines("RCPT TO:<b@example.net>")
            assert h.first_code(c.cmd_lines("DATA")) == 354
            got: list[bytes] | None = None
            closed = False
            deadline = time.monotonic() + 20
            try:
                while time.monotonic() < deadline:
                    c.send(b"x")  # one byte every 0.3 s: resets no per-line timer that counts
                    time.sleep(0.3)
                    c.sock.settimeout(0.01)
                    with contextlib.suppress(TimeoutError, socket.timeout):
                        chunk = c.sock.recv(4096)
                        if not chunk:
                            closed = True
                            break
                        c.buf += chunk
                        if b"\r\n" in c.buf:
                            c.sock.settimeout(10)
                            got = c.reply_lines()
                            break
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            assert got is not None or closed, "a trickling DATA was never cut off"
            if got is None:  # the 421 may be in the buffer already when the close was seen
                got = c.reply_lines()
            assert got is not None and got[0].startswith(b"421 4.4.2"), h.text(got)
        assert relay.healthy()
        ok = h.send_one(relay.smtp_address, "after-slowloris")
        assert h.first_code(ok) == 250
        assert not sink.bodies_containing(b"xxxxxxxx")


def test_huge_data_gets_552_without_buffering_it(tmp_path: pathlib.Path, sink: h.RecordingSink) -> None:
    """A DATA of 96 MiB against --max-message-size 1 MiB is answered 552 (after the end of data, or by
    closing early); the relay's resident memory never grows by anything near the size that was sent.
    A declared SIZE above the maximum gets 552 5.3.4 at MAIL, before any byte of content."""
    limit = 1024 * 1024
    sent_total = 96 * 1024 * 1024
    with h.relay(tmp_path, sink.address, extra=["--max-message-size", str(limit)]) as relay:
        with smtpwire.Wire(relay.smtp_address, greet=False) as c:
            c.reply_lines()
            ehlo = c.cmd_lines("EHLO big.test")
            assert ehlo is not None
            assert any(x[4:].startswith(b"SIZE") for x in ehlo), ehlo
            r = c.cmd_lines(f"MAIL FROM:<big@example.org> SIZE={limit + 1}")
            assert r is not None and r[0].startswith(b"552 5.3.4"), h.text(r)
        baseline = relay.rss_bytes()
        peak = baseline
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    peak = max(peak, relay.rss_bytes())
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        final = None
        try:
            with smtpwire.Wire(relay.smtp_address, greet=False, timeout=60) as c:
                h.start_data(c, helo="big.test", mail="MAIL FROM:<big@example.org>")
                line = b"A" * 998 + b"\r\n"
                block = line * 1024  # 1 MiB
                try:
                    for _ in range(sent_total // len(block)):
                        c.send(block)
                    c.send(b".\r\n")
                    final = c.reply_lines()
                except (BrokenPipeError, ConnectionResetError):
                    final = None
        finally:
            stop.set()
            sampler.join(5)
        if final is not None:
            assert final[0].startswith(b"552"), h.text(final)
        growth = peak - baseline
        assert growth < 48 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB while 96 MiB were sent"
        assert relay.healthy()
        assert relay.status()["queue"]["messages"] == 0
        assert not sink.snapshot()[1]


def test_slow_reader_is_cut_off_by_the_command_deadline(
    tmp_path: pathlib.Path, sink: h.RecordingSink
) -> None:
    """A "slow read" client: it pipelines megabytes of HELP (each answered with ~80 bytes) on a tiny
    receive window and never reads. The relay must not wait for it for ever: within a few command
    deadlines the session is closed and its slot is free again, while the client is still connected."""
    with h.relay(tmp_path, sink.address, extra=["--command-timeout", "1", "--max-sessions", "3"]) as relay:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(relay.smtp_address)
        s.setblocking(False)
        try:
            payload = b"HELP\r\n" * 400_000
            sent = 0
            started = time.monotonic()
            while sent < len(payload) and time.monotonic() - started < 4:
                try:
                    sent += s.send(payload[sent:sent + 65536])
                except BlockingIOError:
                    time.sleep(0.05)
            waiting.wait_until(lambda: relay.status()["sessions"] == 0, within=6,
                               what="the session of a client that never reads its replies cut off")
        finally:
            s.close()


def test_inflight_limit_cannot_be_bypassed_by_under_declaring_size(
    tmp_path: pathlib.Path, sink: h.RecordingSink
) -> None:
    """--max-inflight-bytes bounds what open transactions hold. A client that declares SIZE=1000 and then
    sends 8 MB either gets 552 5.3.4 once it passes its declaration, or the bytes it really holds count
    towards the limit, so that a second MAIL SIZE=2500000 (over a 3 MB limit) gets 455 4.3.2."""
    limit = 3_000_000
    extra = ["--max-inflight-bytes", str(limit), "--max-message-size", "10000000"]
    with (h.relay(tmp_path, sink.address, extra=extra) as relay,
          smtpwire.Wire(relay.smtp_address, greet=False) as a,
          smtpwire.Wire(relay.smtp_address, greet=False) as b):
            h.start_data(a, helo="a.test", mail="MAIL FROM:<a@example.org> SIZE=1000", rcpt="x@example.net")
            line = b"B" * 998 + b"\r\n"
            a.send(b"Subject: liar\r\n\r\n" + line * 8000)  # 8 MB, no end of data yet

            def settled() -> bool:  # the relay counts what it holds, or has answered early (552)
                early, _, _ = select.select([a.sock], [], [], 0)
                return bool(early) or relay.status()["inflight_bytes"] >= limit

            waiting.wait_until(settled, within=30, what="the buffered bytes counted, or an early reply")
            held = relay.status()["inflight_bytes"]
            b.reply_lines()
            b.cmd_lines("EHLO b.test")
            second = b.cmd_lines("MAIL FROM:<b@example.org> SIZE=2500000")
            a.send(b".\r\n")
            first = a.reply_lines()
            cut_early = first is not None and first[0].startswith(b"552")
            limited = held >= limit and second is not None and second[0].startswith(b"455 4.3.2")
            assert cut_early or limited, (
                f"in-flight sum {held} while 8 MB were buffered; second MAIL: {h.text(second)}; "
                f"first DATA: {h.text(first)}"
            )


def test_concurrent_under_declared_transactions_stay_within_the_inflight_limit(
    tmp_path: pathlib.Path, sink: h.RecordingSink
) -> None:
    """Six sessions each declare SIZE=1000 (all accepted: the sum is tiny) and then each send 2 MB of
    DATA at once, 12 MB against --max-inflight-bytes 3 MB. What the relay holds must stay within the
    limit (plus one 64 KiB growth step per session): the transactions that would pass it stop being
    kept, and their DATA ends with a 4xx instead of a 250."""
    limit = 3_000_000
    extra = ["--max-inflight-bytes", str(limit), "--max-message-size", "10000000"]
    with h.relay(tmp_path, sink.address, extra=extra) as relay:
        clients = [smtpwire.Wire(relay.smtp_address, greet=False) for _ in range(6)]
        try:
            for c in clients:
                h.start_data(c, helo="liar.test", mail="MAIL FROM:<a@example.org> SIZE=1000",
                             rcpt="x@example.net")
            line = b"B" * 998 + b"\r\n"
            held = 0  # the most the relay held at once, sampled from the data until the last reply
            sampling = threading.Event()

            def sample() -> None:
                nonlocal held
                while not sampling.is_set():
                    held = max(held, int(relay.status()["inflight_bytes"]))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            for c in clients:
                c.send(b"Subject: liar\r\n\r\n" + line * 2000)
            # The barrier: the relay holds what it read (one 2 MB transaction fits the limit, and a kept
            # one is held until its end of data), so the limit is really under pressure.
            waiting.wait_until(lambda: held >= limit // 2, within=60,
                               what="the relay holding at least half its in-flight limit")
            finals = []
            for c in clients:
                c.send(b".\r\n")
                finals.append(c.reply_lines())
            sampling.set()
            sampler.join(30)
        finally:
            for c in clients:
                c.close()
        accepted = sum(1 for r in finals if h.first_code(r) == 250)
        assert held <= limit + 6 * 64 * 1024, f"open transactions held {held} bytes against a {limit} limit"
        assert accepted < 6, "all six 2 MB transactions were kept and accepted"
