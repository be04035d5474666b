"""An asyncio SMTP load generator that behaves like a pool of MTA clients, for the sandbox and demo.

What it models: mail arrives at an offered rate (a schedule over time) into the clients' own queue (the
backlog); up to `concurrency` SMTP sessions at a time take messages from it. Each session connects to one
ready endpoint (asked from a callable, like a Service), sends several messages and keeps the connection
for a short while when the backlog is empty (as Postfix's connection cache does). A 421 or another 4xx
puts the message back and the session backs off (exponential, with jitter), exactly as an MTA defers.
A connection that drops without an SMTP reply that says so counts as a reset session. Every message
carries a unique Message-ID and is tracked from sent (first attempt) to accepted (250 after DATA) to
delivered (seen by the upstream sink, through a callable).

It must not judge the relay: it records what happened (counters and per-message states) and leaves the
verdicts to the demo and the tests. It speaks SMTP itself, on raw asyncio streams, so that it can tell a
421 from a reset and stays cheap on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import random
import time
import uuid
from collections.abc import Callable, Iterable, Sequence

from mailrelay_common import backoff


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One address that accepts SMTP (a ready pod, as a Service would list it)."""

    host: str
    port: int


@dataclasses.dataclass(frozen=True)
class Step:
    """From `at` seconds on (until the next step): offer `rate` msg/s over at most `concurrency` sessions."""

    at: float
    rate: float
    concurrency: int


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A step function of load over time; the first step should start at 0."""

    steps: tuple[Step, ...]

    def at(self, elapsed: float) -> Step:
        current = Step(0.0, 0.0, 0)
        for step in self.steps:
            if step.at <= elapsed:
                current = step
            else:
                break
        return current

    @property
    def duration(self) -> float:
        return self.steps[-1].at if self.steps else 0.0


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    messages_per_session: int = 20
    keepalive_seconds: float = 1.0     # keep an idle session this long before QUIT
    backoff_base: float = 0.2
    backoff_cap: float = 3.0
    connect_timeout: float = 5.0
    reply_timeout: float = 30.0
    body_bytes: int = 1024
    mail_from: str = "loadgen@example.test"
    rcpt_to: str = "someone@example.net"


@dataclasses.dataclass
class Counters:
    """Monotonic totals; the demo differences two snapshots to get per-second rates."""

    generated: int = 0              # messages that entered the clients' backlog
    sent: int = 0                   # distinct messages attempted at least once
    attempts: int = 0               # MAIL FROM transactions started
    accepted: int = 0               # distinct messages answered 250 after DATA
    duplicates: int = 0             # a message accepted twice (reset after '.' before the 250)
    sessions_opened: int = 0
    sessions_open: int = 0          # gauge: sessions connected right now
    sessions_reset: int = 0         # the server dropped the connection without a reply saying so
    refused_421: int = 0            # 421 replies (greeting or later): the relay shed or shut down the session
    deferred_4xx: int = 0           # other 4xx replies
    rejected_5xx: int = 0           # 5xx replies: the message is dropped by the client (counted, not lost)
    connect_errors: int = 0         # connection refused or timed out before a greeting
    no_endpoint_waits: int = 0
    replies: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)

    def snapshot(self) -> Counters:
        copy = dataclasses.replace(self)
        copy.replies = collections.Counter(self.replies)
        return copy


@dataclasses.dataclass(frozen=True)
class Summary:
    sent: int
    accepted: int
    delivered: int
    lost: int                       # accepted (250) but never delivered
    sessions_reset: int
    unsent: int                     # still in the clients' backlog (an MTA would retry later): not lost
    rejected: int                   # answered 5xx


class _Reset(Exception):
    """The server closed or reset the connection without an SMTP reply that announced it."""


class _Reply(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


@dataclasses.dataclass
class _Message:
    msgid: str
    attempts: int = 0


class LoadGenerator:
    """Run `run(schedule)`; read `counters` at any time; `summary(delivered_ids)` at the end."""

    def __init__(
        self,
        endpoints: Callable[[], Sequence[Endpoint]],
        config: ClientConfig | None = None,
        *,
        run_id: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._endpoints = endpoints
        self.config = config or ClientConfig()
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self._rng = rng or random.Random()
        self.counters = Counters()
        self._backlog: collections.deque[_Message] = collections.deque()
        self._serial = itertools.count(1)
        self._attempted: set[str] = set()
        self.accepted_ids: set[str] = set()
        self.rejected_ids: set[str] = set()
        self._concurrency = 0
        self._rate = 0.0
        self._stopping = False
        self._workers: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._producer: asyncio.Task[None] | None = None
        self.worker_states: dict[int, str] = {}   # what each client is doing now (for debugging)

    # -- public --------------------------------------------------------------------------------
    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def message_id(self, serial: int) -> str:
        return f"<lg-{self.run_id}-{serial}@loadgen.test>"

    def enqueue(self, count: int) -> None:
        """Hand `count` new messages to the clients (besides what the schedule generates)."""
        for _ in range(count):
            self._backlog.append(_Message(self.message_id(next(self._serial))))
        self.counters.generated += count
        self._wake.set()

    async def run(self, schedule: Schedule, *, settle_seconds: float = 30.0) -> None:
        """Follow the schedule to its end, then let the clients empty their backlog (bounded)."""
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < schedule.duration:
            step = schedule.at(elapsed)
            self.set_load(step.rate, step.concurrency)
            await asyncio.sleep(0.05)
        await self.finish(settle_seconds)

    async def finish(self, within: float) -> None:
        """Stop generating; wait until the backlog is sent and every session has ended (bounded)."""
        self._rate = 0.0
        if self._concurrency == 0 and self._backlog:
            self._set_concurrency(max(1, len(self._workers)))
        deadline = time.monotonic() + within
        while (self._backlog or self.counters.sessions_open) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await self.close()

    async def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._producer is not None:
            self._producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._producer
            self._producer = None
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._workers.clear()

    def set_load(self, rate: float, concurrency: int) -> None:
        """Offer `rate` new messages per second over at most `concurrency` sessions, from now on."""
        self._rate = rate
        if self._producer is None and rate > 0:
            self._producer = asyncio.create_task(self._produce())
        if concurrency != self._concurrency:
            self._set_concurrency(concurrency)

    def summary(self, delivered_ids: Iterable[str]) -> Summary:
        delivered = {i for i in delivered_ids if i in self._attempted}
        lost = self.accepted_ids - delivered
        return Summary(
            sent=len(self._attempted),
            accepted=len(self.accepted_ids),
            delivered=len(delivered),
            lost=len(lost),
            sessions_reset=self.counters.sessions_reset,
            unsent=len(self._backlog),
            rejected=len(self.rejected_ids),
        )

    def lost_ids(self, delivered_ids: Iterable[str]) -> set[str]:
        return self.accepted_ids - set(delivered_ids)

    # -- internals -----------------------------------------------------------------------------
    def _set_concurrency(self, concurrency: int) -> None:
        self._concurrency = concurrency
        while len(self._workers) < concurrency:
            index = len(self._workers)
            self._workers.append(asyncio.create_task(self._worker(index)))
        self._wake.set()

    async def _produce(self) -> None:
        """Offer mail at the current rate: new messages enter the backlog every 50 ms."""
        owed = 0.0
        last = time.monotonic()
        while not self._stopping:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            owed += self._rate * (now - last)
            last = now
            whole = int(owed)
            if whole:
                owed -= whole
                self.enqueue(whole)

    def _backoff(self, failures: int) -> float:
        # Doubling from twice `backoff_base` (after the first failure) up to `backoff_cap`, the lower half
        # of each step jittered.
        schedule = backoff.Schedule(
            base=2 * self.config.backoff_base, factor=2.0, cap=self.config.backoff_cap, jitter=0.5)
        return backoff.delay(schedule, failures, self._rng.random())

    async def _next_message(self, wait: float) -> _Message | None:
        deadline = time.monotonic() + wait
        while not self._backlog:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping:
                return None
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(remaining, 0.2))
        return self._backlog.popleft()

    async def _worker(self, index: int) -> None:
        failures = 0
        while not self._stopping:
            if index >= self._concurrency or not self._backlog:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=0.2)
                continue
            endpoints = self._endpoints()
            if not endpoints:
                self.counters.no_endpoint_waits += 1
                await asyncio.sleep(0.1)
                continue
            endpoint = self._rng.choice(list(endpoints))
            ok = await self._session(endpoint, index)
            if ok:
                failures = 0
            else:
                failures += 1
                await asyncio.sleep(self._backoff(failures))

    async def _session(self, endpoint: Endpoint, index: int) -> bool:
        """One SMTP session. True when it ended normally (QUIT), False when the client must back off."""
        cfg = self.config
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(endpoint.host, endpoint.port), timeout=cfg.connect_timeout
            )
        except (OSError, TimeoutError):
            self.counters.connect_errors += 1
            return False
        self.counters.sessions_opened += 1
        self.counters.sessions_open += 1
        current: _Message | None = None
        in_transaction = False
        try:
            await self._expect(reader, 220)
            await self._command(reader, writer, b"EHLO loadgen.test", 250)
            for _ in range(cfg.messages_per_session):
                if index >= self._concurrency:
                    break
                current = await self._next_message(cfg.keepalive_seconds)
                if current is None:
                    break
                in_transaction = True
                await self._transaction(reader, writer, current)
                current = None
                in_transaction = False
            with contextlib.suppress(_Reset, _Reply, OSError, TimeoutError):
                await self._command(reader, writer, b"QUIT", 221)
            return True
        except _Reply as reply:
            self._count_reply(reply.code, current)
            if current is not None:
                self._defer(current, reply.code)
            if in_transaction and reply.code != 421:
                with contextlib.suppress(_Reset, _Reply, OSError, TimeoutError):
                    await self._command(reader, writer, b"QUIT", 221)
            return reply.code >= 500 and current is not None
        except (_Reset, OSError, TimeoutError, asyncio.IncompleteReadError):
            self.counters.sessions_reset += 1
            if current is not None:
                self._backlog.appendleft(current)
            return False
        except asyncio.CancelledError:
            if current is not None:
                self._backlog.appendleft(current)
            raise
        finally:
            self.counters.sessions_open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), timeout=1.0)

    async def _transaction(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: _Message
    ) -> None:
        cfg = self.config
        if message.msgid not in self._attempted:
            self._attempted.add(message.msgid)
            self.counters.sent += 1
        message.attempts += 1
        self.counters.attempts += 1
        await self._command(reader, writer, f"MAIL FROM:<{cfg.mail_from}>".encode(), 250)
        await self._command(reader, writer, f"RCPT TO:<{cfg.rcpt_to}>".encode(), 250)
        await self._command(reader, writer, b"DATA", 354)
        writer.write(self._content(message))
        await writer.drain()
        await self._expect(reader, 250)
        self.counters.replies[250] += 1
        if message.msgid in self.accepted_ids:
            self.counters.duplicates += 1
        else:
            self.accepted_ids.add(message.msgid)
            self.counters.accepted += 1

    def _content(self, message: _Message) -> bytes:
        filler = ("x" * 76 + "\r\n") * max(1, self.config.body_bytes // 78)
        return (
            f"From: <{self.config.mail_from}>\r\n"
            f"To: <{self.config.rcpt_to}>\r\n"
            f"Subject: loadgen {self.run_id}\r\n"
            f"Message-ID: {message.msgid}\r\n"
            "\r\n"
            f"{filler}.\r\n"
        ).encode()

    def _defer(self, message: _Message, code: int) -> None:
        if code >= 500:
            self.rejected_ids.add(message.msgid)
        else:
            self._backlog.appendleft(message)

    def _count_reply(self, code: int, message: _Message | None) -> None:
        self.counters.replies[code] += 1
        if code == 421:
            self.counters.refused_421 += 1
        elif 400 <= code < 500:
            self.counters.deferred_4xx += 1
        elif code >= 500:
            self.counters.rejected_5xx += 1

    async def _command(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes, expected: int
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            peer = writer.get_extra_info("peername")
            self.worker_states[id(task)] = (f"{line[:10].decode(errors='replace')} {time.monotonic():.1f} "
                                            f"{peer[0] if peer else '?'}")
        writer.write(line + b"\r\n")
        await writer.drain()
        await self._expect(reader, expected)

    async def _expect(self, reader: asyncio.StreamReader, expected: int) -> None:
        code, text = await self._read_reply(reader)
        if code != expected:
            raise _Reply(code, text)

    async def _read_reply(self, reader: asyncio.StreamReader) -> tuple[int, str]:
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(reader.readline(), timeout=self.config.reply_timeout)
            if not raw.endswith(b"\n"):
                raise _Reset("connection closed without a reply")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if len(line) < 3 or not line[:3].isdigit():
                raise _Reset(f"garbled reply {line!r}")
            lines.append(line[4:])
            if len(line) == 3 or line[3] == " ":
                return int(line[:3]), "\n".join(lines)


def parse_schedule(text: str) -> Schedule:
    """'0:50:5,10:200:20' -> steps at 0 s (50 msg/s, 5 sessions) and 10 s (200 msg/s, 20 sessions)."""
    steps = []
    for part in text.split(","):
        at, rate, concurrency = part.split(":")
        steps.append(Step(float(at), float(rate), int(concurrency)))
    return Schedule(tuple(sorted(steps, key=lambda s: s.at)))
