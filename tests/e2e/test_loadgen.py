"""The load generator against real SMTP peers: aiosmtpd (accepts), smtp-sink answering 421 or hanging up.

It checks the generator's bookkeeping, which the demo and the other e2e tests rely on: each message is
tracked to the server, a 421 is counted as shedding (not as a reset) and retried, and a connection dropped
without a reply is counted as a reset session, with the message kept for a retry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session
from mailrelay_sandbox import loadgen, netutil, waiting

from tests.conftest import require_tool


class Collector:
    """aiosmtpd handler that keeps the Message-ID of each message it answers 250 to."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        for line in content.split(b"\r\n"):
            if line.lower().startswith(b"message-id:"):
                self.ids.append(line.split(b":", 1)[1].strip().decode())
        return "250 2.0.0 Ok: queued"


@pytest.fixture
def aiosmtpd_server() -> Iterator[tuple[loadgen.Endpoint, Collector]]:
    handler = Collector()
    port = netutil.free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield loadgen.Endpoint("127.0.0.1", port), handler
    finally:
        controller.stop()


@contextlib.asynccontextmanager
async def smtp_sink(*flags: str) -> AsyncIterator[loadgen.Endpoint]:
    tool = require_tool("smtp-sink")
    port = netutil.free_port()
    proc = await asyncio.create_subprocess_exec(tool, "-u", "nobody", *flags, f"127.0.0.1:{port}", "100")
    try:
        await waiting.eventually(lambda: netutil.accepts("127.0.0.1", port), within=30, every=0.05,
                                 what="smtp-sink listening")
        yield loadgen.Endpoint("127.0.0.1", port)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=10)


async def test_every_message_is_tracked_to_the_server(
    aiosmtpd_server: tuple[loadgen.Endpoint, Collector],
) -> None:
    endpoint, collector = aiosmtpd_server
    gen = loadgen.LoadGenerator(lambda: [endpoint])
    schedule = loadgen.parse_schedule("0:100:4,1.5:200:8,3:0:0")
    await gen.run(schedule, settle_seconds=30)
    summary = gen.summary(collector.ids)
    assert summary.sent > 200
    assert summary.accepted == summary.sent == summary.delivered
    assert summary.lost == 0
    assert summary.sessions_reset == 0
    assert summary.unsent == 0
    assert gen.counters.sessions_opened >= 1
    assert len(set(collector.ids)) == len(collector.ids)


async def test_a_421_is_shedding_not_a_reset_and_the_message_is_kept() -> None:
    async with smtp_sink("-Q", "CONNECT") as endpoint:
        gen = loadgen.LoadGenerator(lambda: [endpoint])
        gen.enqueue(5)
        gen.set_load(0, 2)
        await waiting.eventually(lambda: gen.counters.refused_421 >= 2, every=0.05, what="two 421 replies")
        await gen.close()
    assert gen.counters.refused_421 >= 2
    assert gen.counters.sessions_reset == 0
    assert gen.counters.accepted == 0
    summary = gen.summary([])
    assert summary.unsent == 5
    assert summary.lost == 0


async def test_a_dropped_connection_counts_as_a_reset_and_the_message_is_retried() -> None:
    async with smtp_sink("-q", ".") as endpoint:
        gen = loadgen.LoadGenerator(lambda: [endpoint])
        gen.enqueue(3)
        gen.set_load(0, 1)
        await waiting.eventually(lambda: gen.counters.sessions_reset >= 2, every=0.05,
                                 what="two sessions reset")
        await gen.close()
    assert gen.counters.sessions_reset >= 2
    assert gen.counters.refused_421 == 0
    assert gen.counters.accepted == 0
    assert gen.counters.attempts > gen.counters.sent  # the same message was tried again
    assert gen.summary([]).unsent == 3


async def test_no_endpoint_means_waiting_not_failing() -> None:
    gen = loadgen.LoadGenerator(lambda: [])
    gen.enqueue(1)
    gen.set_load(0, 1)
    await waiting.eventually(lambda: gen.counters.no_endpoint_waits >= 2, every=0.05,
                             what="two waits for an endpoint")
    await gen.close()
    assert gen.counters.no_endpoint_waits >= 2
    assert gen.counters.connect_errors == 0
    assert gen.summary([]).unsent == 1


def test_schedule_is_a_step_function() -> None:
    schedule = loadgen.parse_schedule("10:200:20,0:50:5,30:0:0")
    assert schedule.at(0) == loadgen.Step(0, 50, 5)
    assert schedule.at(9.9) == loadgen.Step(0, 50, 5)
    assert schedule.at(10) == loadgen.Step(10, 200, 20)
    assert schedule.at(100) == loadgen.Step(30, 0, 0)
    assert schedule.duration == 30


def test_free_port_never_hands_out_a_port_twice() -> None:
    """Ports handed out and not bound yet (an upstream port chosen before a relay starts) are never handed
    to the next caller: the kernel alone would give a released port again."""
    ports = [netutil.free_port() for _ in range(1000)]  # the kernel alone repeats one almost surely
    assert len(set(ports)) == len(ports)
