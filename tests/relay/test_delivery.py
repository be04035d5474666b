"""Delivery against a real upstream (the in-process aiosmtpd sink) with a real spool.Spool.

Covered: delivery and removal from the spool with reused connections; upstream down -> queued -> delivered
when it returns; 421 and 451 retried; 5xx dead-lettered with its reason; expiry dead-lettered; partial
recipient failures; retry_now; a pooled connection cut by the upstream; stop and recovery; TLS
(STARTTLS and implicit) with AUTH; the metrics each of those moves."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator

import pytest
from mailrelay_common import backoff
from mailrelay_relay import delivery, spool
from mailrelay_sandbox import sink as sinkmod
from mailrelay_sandbox import waiting

from tests.conftest import require_tool
from tests.relay import delivery_harness as dh

FAST = backoff.Schedule(base=0.05, factor=2.0, cap=0.4, jitter=0.25)


@pytest.fixture
def upstream() -> Iterator[sinkmod.Sink]:
    s = sinkmod.Sink().start()
    try:
        yield s
    finally:
        s.stop()


def make(
    sp: spool.Spool, s: sinkmod.Sink, *, lifetime: float = 3600.0, schedule: backoff.Schedule = FAST,
    connections: int = 2, **cfg: object,
) -> delivery.Delivery:
    config = delivery.UpstreamConfig(host=s.host, port=s.port, connections=connections, timeout=10.0,
                                     **cfg)  # type: ignore[arg-type]
    return delivery.Delivery(sp, delivery.make_sender(config), queue_lifetime=lifetime,
                             concurrency=connections, schedule=schedule)


async def enqueue(sp: spool.Spool, d: delivery.Delivery, n: int, rcpts: tuple[str, ...] = ("b@example.org",),
                  received_at: float | None = None) -> list[spool.QueuedMessage]:
    msgs = []
    for i in range(n):
        msg = await sp.store(spool.Envelope("a@example.org", rcpts), dh.content(i),
                             received_at or time.time())
        d.submit(msg)
        msgs.append(msg)
    return msgs


def reasons(sp: spool.Spool) -> list[str]:
    return sorted(p.read_text() for p in sp.deadletter_dir.glob("*.reason"))


async def test_delivers_everything_over_reused_connections(
    store: spool.Spool, upstream: sinkmod.Sink
) -> None:
    c = dh.Counters()
    d = make(store, upstream, connections=2)
    await d.start()
    try:
        msgs = await enqueue(store, d, 40)
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    assert upstream.count == 40
    got = {m.content for m in upstream.messages}
    assert got == {dh.content(i) for i in range(40)}  # exact bytes, dot-stuffing undone by the sink
    assert all(m.mail_from == "a@example.org" and m.rcpt_tos == ("b@example.org",) for m in upstream.messages)
    assert upstream.connections <= 2  # pooled and reused, not one connection per message
    assert not any(m.path.exists() for m in msgs)
    assert store.queue_count() == 0
    assert d.stats() == delivery.QueueStats(0, 0, 0.0)
    assert c["delivered"] == 40 and c["success"] == 40 and c["duration_count"] == 40
    assert dh.sample("mailrelay_relay_queue_messages") == 0


async def test_upstream_down_queues_then_delivers_when_it_returns(
    store: spool.Spool, upstream: sinkmod.Sink
) -> None:
    c = dh.Counters()
    upstream.stop()
    d = make(store, upstream)
    await d.start()
    try:
        msgs = await enqueue(store, d, 5)
        await waiting.eventually(lambda: c["connection_error"] >= 3, what='c["connection_error"] >= 3')
        stats = d.stats()
        assert stats.messages == 5 and stats.bytes == sum(m.size for m in msgs)
        assert dh.sample("mailrelay_relay_queue_messages") == 5
        assert store.queue_count() == 5  # still on disk
        upstream.start()  # same port
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    assert upstream.count == 5
    assert c["delivered"] == 5 and c["dl_permanent"] == 0 and c["dl_expired"] == 0


@pytest.mark.parametrize(("command", "code"), [("mail", 421), ("rcpt", 451), ("data", 451), ("data", 421),
                                               ("connect", 421)])
async def test_temporary_failures_are_retried(
    store: spool.Spool, upstream: sinkmod.Sink, command: str, code: int
) -> None:
    c = dh.Counters()
    upstream.fail(command, code, times=2)
    d = make(store, upstream, connections=1)
    await d.start()
    try:
        await enqueue(store, d, 1)
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    assert upstream.count == 1
    assert c["delivered"] == 1
    failed = c["temporary"] + c["connection_error"]
    assert failed == 2
    if command == "connect":
        assert c["connection_error"] == 2  # a refused greeting is the upstream being unavailable
    else:
        assert c["temporary"] == 2
    assert reasons(store) == []


@pytest.mark.parametrize(("command", "code"), [("mail", 550), ("rcpt", 550), ("data", 554)])
async def test_permanent_failures_are_dead_lettered_with_reason(
    store: spool.Spool, upstream: sinkmod.Sink, command: str, code: int
) -> None:
    c = dh.Counters()
    upstream.fail(command, code, text=f"5.7.1 refused at {command}")
    d = make(store, upstream)
    await d.start()
    try:
        msgs = await enqueue(store, d, 2)
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    assert upstream.count == 0
    assert store.dead_letter_count() == 2
    assert not any(m.path.exists() for m in msgs)
    for reason in reasons(store):
        assert f"{code} 5.7.1 refused at {command}" in reason
        assert reason.startswith("permanent failure")
    assert c["dl_permanent"] == 2 and c["permanent"] == 2 and c["delivered"] == 0
    # The dead-lettered file is the whole message, still readable.
    for path in store.deadletter_dir.glob("*.msg"):
        assert spool.decode_record(path.read_bytes())[1].mail_from == "a@example.org"


async def test_message_older_than_queue_lifetime_is_dead_lettered(
    store: spool.Spool, upstream: sinkmod.Sink
) -> None:
    c = dh.Counters()
    upstream.fail("mail", 451)  # the upstream never takes it
    d = make(store, upstream, lifetime=0.6)
    await d.start()
    try:
        await enqueue(store, d, 1)
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    (reason,) = reasons(store)
    assert reason.startswith("expired") and "451" in reason
    assert c["dl_expired"] == 1 and c["temporary"] >= 2 and c["delivered"] == 0
    assert upstream.count == 0


async def test_recovered_message_past_lifetime_gets_one_last_attempt(
    store: spool.Spool, upstream: sinkmod.Sink
) -> None:
    """An old message is not dead-lettered unseen: it is tried, and delivered if the upstream takes it."""
    d = make(store, upstream, lifetime=10.0)
    await d.start()
    try:
        await enqueue(store, d, 1, received_at=time.time() - 3600)
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    assert upstream.count == 1 and store.dead_letter_count() == 0


async def test_partial_recipient_failures(store: spool.Spool, upstream: sinkmod.Sink) -> None:
    c = dh.Counters()
    upstream.fail("rcpt", 550, text="5.1.1 no such user", recipients={"bad@example.org"})
    upstream.fail("rcpt", 451, text="4.2.1 try later", recipients={"later@example.org"}, times=1)
    d = make(store, upstream, connections=1)
    await d.start()
    try:
        rcpts = ("good@example.org", "bad@example.org", "later@example.org")
        (msg,) = await enqueue(store, d, 1, rcpts=rcpts)
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    # Accepted recipients got it at once; the deferred one on the retry; nobody twice.
    assert [m.rcpt_tos for m in upstream.messages] == [("good@example.org",), ("later@example.org",)]
    (reason,) = reasons(store)
    assert "<bad@example.org>: 550 5.1.1 no such user" in reason
    assert "delivered to 2 of 3 recipients" in reason
    assert not msg.path.exists()
    # Attempt 1 had a deferred recipient (temporary), attempt 2 succeeded; the message ends dead-lettered.
    assert c["dl_permanent"] == 1 and c["delivered"] == 0 and c["temporary"] == 1 and c["success"] == 1


async def test_all_recipients_temporarily_refused_then_accepted(
    store: spool.Spool, upstream: sinkmod.Sink
) -> None:
    upstream.fail("rcpt", 450, times=2)
    d = make(store, upstream, connections=1)
    await d.start()
    try:
        await enqueue(store, d, 1, rcpts=("x@example.org", "y@example.org"))
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == ["x@example.org", "y@example.org"]
    assert store.dead_letter_count() == 0


async def test_retry_now_wakes_deferred_messages(store: spool.Spool, upstream: sinkmod.Sink) -> None:
    c = dh.Counters()
    slow = backoff.Schedule(base=600.0, factor=2.0, cap=600.0, jitter=0.0)
    upstream.fail("mail", 451, times=1)
    d = make(store, upstream, schedule=slow)
    await d.start()
    try:
        await enqueue(store, d, 1)
        await waiting.eventually(lambda: c["temporary"] == 1, what='c["temporary"] == 1')
        assert not await d.wait_empty(0.3)  # deferred for ten minutes
        d.retry_now()
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    assert upstream.count == 1


async def test_pooled_connection_cut_by_upstream_is_replaced(
    store: spool.Spool, upstream: sinkmod.Sink
) -> None:
    c = dh.Counters()
    d = make(store, upstream, connections=1)
    await d.start()
    try:
        await enqueue(store, d, 3)
        assert await d.wait_empty(dh.WAIT)
        assert upstream.connections == 1
        upstream.stop()  # cuts the pooled connection
        upstream.start()
        await enqueue(store, d, 3)
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    assert upstream.count == 6
    assert upstream.connections == 2
    assert c["connection_error"] == 0 and c["temporary"] == 0


async def test_idle_connection_is_checked_with_noop(store: spool.Spool, upstream: sinkmod.Sink) -> None:
    """After an idle spell the pool sends NOOP; a 421 to it means a new connection, not a failure."""
    c = dh.Counters()
    d = make(store, upstream, connections=1, check_idle_after=0.0)
    await d.start()
    try:
        await enqueue(store, d, 1)
        assert await d.wait_empty(dh.WAIT)
        upstream.fail("noop", 421, times=1)
        await enqueue(store, d, 1)
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    assert upstream.count == 2 and upstream.connections == 2
    assert c["success"] == 2 and c["temporary"] == 0 and c["connection_error"] == 0


async def test_stop_keeps_undelivered_mail_in_spool_for_recovery(
    store: spool.Spool, upstream: sinkmod.Sink
) -> None:
    upstream.stop()
    c = dh.Counters()
    d = make(store, upstream)
    await d.start()
    await enqueue(store, d, 4)
    await waiting.eventually(lambda: c["connection_error"] >= 1, what="a failed delivery attempt")
    await d.stop()
    assert store.queue_count() == 4
    upstream.start()
    recovered = store.recover()
    assert len(recovered) == 4
    d2 = make(store, upstream)
    for msg in recovered:
        d2.submit(msg)
    assert d2.stats().messages == 4
    await d2.start()
    try:
        assert await d2.wait_empty(dh.WAIT)
    finally:
        await d2.stop()
    assert upstream.count == 4 and store.queue_count() == 0


async def test_mail_options_are_passed_on(store: spool.Spool, upstream: sinkmod.Sink) -> None:
    d = make(store, upstream)
    await d.start()
    try:
        env = spool.Envelope("ä@example.org", ("ö@example.org",), ("BODY=8BITMIME", "SMTPUTF8"))
        body = "Subject: ünïcode\r\n\r\n8bit body ß\r\n".encode()
        d.submit(await store.store(env, body, time.time()))
        env = spool.Envelope("", ("postmaster@example.org",))  # null sender (a bounce)
        d.submit(await store.store(env, b"Subject: bounce\r\n\r\nx\r\n", time.time()))
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    by_from = {m.mail_from: m for m in upstream.messages}
    utf8 = by_from["ä@example.org"]
    assert utf8.rcpt_tos == ("ö@example.org",)
    assert "SMTPUTF8" in utf8.mail_options and "BODY=8BITMIME" in utf8.mail_options
    assert utf8.content == "Subject: ünïcode\r\n\r\n8bit body ß\r\n".encode()
    assert by_from[""].rcpt_tos == ("postmaster@example.org",)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    openssl = require_tool("openssl")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return str(cert), str(key)


@pytest.mark.parametrize("tls", ["starttls", "tls"])
async def test_tls_and_auth(store: spool.Spool, certificate: tuple[str, str], tls: str) -> None:
    cert, key = certificate
    with sinkmod.running(tls=tls, certfile=cert, keyfile=key, auth=("relay", "pw")) as s:
        d = make(store, s, tls=tls, user="relay", password="pw", cafile=cert)
        await d.start()
        try:
            await enqueue(store, d, 3)
            assert await d.wait_empty(dh.WAIT)
        finally:
            await d.stop()
        assert s.count == 3


async def test_wrong_password_keeps_mail_queued(store: spool.Spool, certificate: tuple[str, str]) -> None:
    """An AUTH failure is an upstream problem, never a reason to dead-letter mail."""
    cert, key = certificate
    c = dh.Counters()
    with sinkmod.running(tls="starttls", certfile=cert, keyfile=key, auth=("relay", "pw")) as s:
        d = make(store, s, tls="starttls", user="relay", password="wrong", cafile=cert)
        await d.start()
        try:
            await enqueue(store, d, 1)
            await waiting.eventually(lambda: c["connection_error"] >= 2, what='c["connection_error"] >= 2')
            assert d.stats().messages == 1 and store.dead_letter_count() == 0
        finally:
            await d.stop()
        assert s.count == 0


async def test_unverified_certificate_is_refused(store: spool.Spool, certificate: tuple[str, str]) -> None:
    cert, key = certificate
    c = dh.Counters()
    with sinkmod.running(tls="tls", certfile=cert, keyfile=key) as s:
        d = make(store, s, tls="tls")  # no cafile: the self-signed certificate is not trusted
        await d.start()
        try:
            await enqueue(store, d, 1)
            await waiting.eventually(lambda: c["connection_error"] >= 1, what='c["connection_error"] >= 1')
            assert s.count == 0 and d.stats().messages == 1
        finally:
            await d.stop()


def test_upstream_config_validation() -> None:
    with pytest.raises(ValueError):
        delivery.UpstreamConfig(host="h", port=25, tls="ssl")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        delivery.UpstreamConfig(host="h", port=25, connections=0)
    with pytest.raises(ValueError):
        delivery.UpstreamConfig(host="h", port=25, user="u")


@pytest.mark.parametrize(
    ("options", "extensions", "expected"),
    [
        (("BODY=8BITMIME", "SMTPUTF8"), {"8bitmime": "", "smtputf8": ""}, ["BODY=8BITMIME", "SMTPUTF8"]),
        (("BODY=8BITMIME",), {}, []),
        (("SIZE=100", "RET=HDRS", "X-UNKNOWN=1"), {"size": "1000", "dsn": ""}, ["SIZE=100", "RET=HDRS"]),
    ],
)
def test_upstream_mail_options(
    options: tuple[str, ...], extensions: dict[str, str], expected: list[str]
) -> None:
    assert delivery.upstream_mail_options(options, extensions) == expected


async def test_upstream_without_esmtp_gets_helo(store: spool.Spool, upstream: sinkmod.Sink) -> None:
    upstream.fail("ehlo", 502, text="5.5.2 EHLO not implemented")
    d = make(store, upstream, connections=1)
    await d.start()
    try:
        env = spool.Envelope("a@example.org", ("b@example.org",), ("BODY=8BITMIME",))
        d.submit(await store.store(env, dh.content(0), time.time()))
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    (got,) = upstream.messages
    assert got.mail_options == ()  # no ESMTP, so no MAIL parameters
    assert store.dead_letter_count() == 0


async def test_addresses_pass_through_exactly(store: spool.Spool, upstream: sinkmod.Sink) -> None:
    """Quoted local parts and plus-addresses reach the upstream as the relay accepted them."""
    rcpts = ('"john doe"@example.org', "list+tag@example.org", "UPPER@Example.ORG")
    d = make(store, upstream, connections=1)
    await d.start()
    try:
        env = spool.Envelope('"odd sender"@example.org', rcpts)
        d.submit(await store.store(env, dh.content(0), time.time()))
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    (got,) = upstream.messages
    assert got.mail_from == '"odd sender"@example.org'
    assert got.rcpt_tos == rcpts


async def test_command_injection_in_an_address_is_refused_not_sent(
    store: spool.Spool, upstream: sinkmod.Sink
) -> None:
    """Defence in depth: smtp.py never spools such an address, but if one appeared, CR/LF must not
    reach the upstream as a second command; that recipient is dead-lettered, the others delivered."""
    c = dh.Counters()
    d = make(store, upstream, connections=1)
    await d.start()
    try:
        smuggled = "x@example.org>\r\nRCPT TO:<evil@example.org"
        env = spool.Envelope("a@example.org", ("ok@example.org", smuggled))
        d.submit(await store.store(env, dh.content(0), time.time()))
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    (got,) = upstream.messages
    assert got.rcpt_tos == ("ok@example.org",)
    (reason,) = reasons(store)
    assert "553" in reason and "delivered to 1 of 2" in reason
    assert c["dl_permanent"] == 1


class _TimedSender:
    """The real sender, with the time of every failed attempt noted as it fails (nothing replaced)."""

    def __init__(self, sender: delivery.Sender) -> None:
        self.sender = sender
        self.failed_at: list[float] = []

    async def send(self, envelope: spool.Envelope, content: bytes) -> bool | None:
        try:
            return await self.sender.send(envelope, content)
        except Exception:
            self.failed_at.append(time.monotonic())
            raise

    async def close(self) -> None:
        await self.sender.close()


@pytest.mark.parametrize("outage", ["down", "421-at-mail"])
async def test_unavailable_upstream_is_probed_not_hammered(
    store: spool.Spool, upstream: sinkmod.Sink, outage: str
) -> None:
    """With the upstream down (or answering 421), 200 queued messages do not mean 200 attempts at once:
    after a refused connection or a 421 the workers pause (a short, growing gate) and probe. At most the
    4 attempts in flight fail together, so the 8th failure needs an attempt started after the pause that
    the 4th one set: at least 0.75 x 0.05 x 2**3 = 0.3 s later (the gate's schedule, jitter included).
    The times are taken as the attempts fail, so a busy machine cannot shorten the interval; hammering
    makes 8 failures in milliseconds."""
    if outage == "down":
        upstream.stop()
    else:
        upstream.fail("mail", 421)
    config = delivery.UpstreamConfig(host=upstream.host, port=upstream.port, connections=4, timeout=10.0)
    sender = _TimedSender(delivery.make_sender(config))
    d = delivery.Delivery(store, sender, queue_lifetime=3600.0, concurrency=4,
                          schedule=backoff.Schedule(base=0.05, factor=2.0, cap=5.0))
    await d.start()
    try:
        await enqueue(store, d, 200)
        await waiting.eventually(lambda: len(sender.failed_at) >= 8, what="eight failed attempts")
        assert sender.failed_at[7] - sender.failed_at[3] >= 0.3 * 0.999, sender.failed_at
        assert d.stats().messages == 200
        if outage == "down":
            upstream.start()
        else:
            upstream.clear_failures()
        d.retry_now()
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    assert upstream.count == 200


async def test_upstream_crash_mid_burst_loses_nothing(store: spool.Spool, upstream: sinkmod.Sink) -> None:
    """The upstream dies while 300 messages stream through 4 pooled connections, then comes back: every
    message arrives (a message whose 250 was lost in the crash may arrive twice: at-least-once)."""
    n = 300
    d = make(store, upstream, connections=4)
    await d.start()
    try:
        await enqueue(store, d, n)
        assert await upstream.wait_for_async(50, dh.WAIT)
        upstream.stop()  # cuts every pooled connection, mid-transaction for some
        await asyncio.sleep(0.3)
        upstream.start()
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    subjects = {m.content.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0] for m in upstream.messages}
    assert subjects == {f"test {i}".encode() for i in range(n)}
    assert upstream.count >= n
    assert store.queue_count() == 0 and store.dead_letter_count() == 0


@pytest.mark.parametrize(
    "content",
    [b"", b".\r\n", b"..\r\n", b".leading\r\n.\r\nmiddle\r\n..\r\n", b"no final newline", b"x\r\n." * 2000,
     b"line\r\n.dot\r\nno final CRLF after a dot line\r\n.x"],
)
async def test_awkward_content_arrives_exactly(store: spool.Spool, upstream: sinkmod.Sink,
                                               content: bytes) -> None:
    """Dots at line starts, a lone "." line, no final CRLF: the upstream receives the content as
    aiosmtplib would have sent it, and a whole message ends only at the final dot."""
    d = make(store, upstream, connections=1)
    await d.start()
    try:
        msg = await store.store(spool.Envelope("a@example.org", ("b@example.org",)), content, time.time())
        d.submit(msg)
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    (got,) = upstream.messages
    # The content as it was, a missing final CRLF added (what aiosmtplib's data() does too).
    assert got.content == (content if content.endswith(b"\r\n") else content + b"\r\n")
