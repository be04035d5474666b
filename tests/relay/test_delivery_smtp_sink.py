"""Delivery against Postfix's `smtp-sink`, a second, independent upstream implementation.

smtp-sink answers 421 and disconnects after chosen commands (-Q), disconnects without a reply (-q),
answers 4xx (-r) or 5xx (-f). Each failing upstream is then replaced by a healthy one on the same port,
as an upstream that recovers, and the message must arrive."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from mailrelay_common import backoff
from mailrelay_relay import delivery, spool
from mailrelay_sandbox import netutil, waiting

from tests.conftest import require_tool
from tests.relay import delivery_harness as dh

FAST = backoff.Schedule(base=0.05, factor=2.0, cap=0.3, jitter=0.25)


@pytest.fixture
def port() -> int:
    require_tool("smtp-sink")
    return netutil.free_port()


@pytest.fixture
def sinks() -> Iterator[list[dh.SmtpSink]]:
    started: list[dh.SmtpSink] = []
    yield started
    for s in started:
        s.stop()


def make(sp: spool.Spool, port: int, connections: int = 2) -> delivery.Delivery:
    cfg = delivery.UpstreamConfig(host="127.0.0.1", port=port, connections=connections, timeout=10.0)
    return delivery.Delivery(sp, delivery.make_sender(cfg), queue_lifetime=3600.0, concurrency=connections,
                             schedule=FAST)


async def test_delivers_to_smtp_sink(store: spool.Spool, port: int, sinks: list[dh.SmtpSink]) -> None:
    c = dh.Counters()
    sink = dh.SmtpSink(port)
    sinks.append(sink)
    d = make(store, port, connections=4)
    await d.start()
    try:
        for i in range(200):
            d.submit(await store.store(spool.Envelope("a@example.org", ("b@example.org",)), dh.content(i),
                                       time.time()))
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    assert c["delivered"] == 200 and c["success"] == 200
    await waiting.eventually(lambda: len(sink.files()) == 200, what='len(sink.files()) == 200')
    dumped = b"".join(p.read_bytes() for p in sink.files())
    for i in (0, 99, 199):
        assert f"Subject: test {i}\r\n".encode() in dumped or f"Subject: test {i}\n".encode() in dumped
    assert store.queue_count() == 0


@pytest.mark.parametrize(
    ("flags", "counter"),
    [
        (("-Q", "."), "temporary"),  # 421 and disconnect after the message
        (("-Q", "MAIL"), "temporary"),  # 421 at MAIL
        (("-Q", "CONNECT"), "connection_error"),  # 421 greeting
        (("-r", "RCPT"), "temporary"),  # 4xx at RCPT
        (("-r", "."), "temporary"),  # 4xx after the message
        (("-q", "MAIL"), "connection_error"),  # hang up without a reply
        (("-q", "."), "connection_error"),  # hang up after the message, before the reply
    ],
    ids=["421-dot", "421-mail", "421-greeting", "4xx-rcpt", "4xx-dot", "hangup-mail", "hangup-dot"],
)
async def test_temporary_failures_retried_until_upstream_recovers(
    store: spool.Spool, port: int, sinks: list[dh.SmtpSink], flags: tuple[str, ...], counter: str
) -> None:
    c = dh.Counters()
    failing = dh.SmtpSink(port, *flags)
    sinks.append(failing)
    d = make(store, port)
    await d.start()
    try:
        for i in range(3):
            d.submit(await store.store(spool.Envelope("a@example.org", ("b@example.org",)), dh.content(i),
                                       time.time()))
        await waiting.eventually(lambda: c[counter] >= 4, what='c[counter] >= 4')  # retried, more than once
        assert d.stats().messages == 3 and store.queue_count() == 3 and store.dead_letter_count() == 0
        failing.stop()
        sinks.remove(failing)
        healthy = dh.SmtpSink(port)
        sinks.append(healthy)
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    assert c["delivered"] == 3 and c["dl_permanent"] == 0 and c["dl_expired"] == 0
    await waiting.eventually(lambda: len(healthy.files()) == 3, what='len(healthy.files()) == 3')


@pytest.mark.parametrize("command", ["MAIL", "RCPT", "."])
async def test_hard_reject_is_dead_lettered(
    store: spool.Spool, port: int, sinks: list[dh.SmtpSink], command: str
) -> None:
    c = dh.Counters()
    sinks.append(dh.SmtpSink(port, "-f", command))
    d = make(store, port)
    await d.start()
    try:
        env = spool.Envelope("a@example.org", ("b@example.org",))
        d.submit(await store.store(env, dh.content(0), time.time()))
        assert await d.wait_empty(dh.WAIT)
    finally:
        await d.stop()
    assert c["dl_permanent"] == 1 and c["delivered"] == 0
    (reason,) = [p.read_text() for p in store.deadletter_dir.glob("*.reason")]
    assert "500 5.3.0" in reason and reason.startswith("permanent failure")
