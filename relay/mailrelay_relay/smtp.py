"""The relay's SMTP server: an asyncio protocol per connection that speaks RFC 5321 and asks policy.py
what to answer.

What it is for: the wire — greeting refusal under the pod's session cap or while draining (decided in
connection_made, the connect hook aiosmtpd lacks; the listener stays open so clients get a 421, not a
refused connection), our own MAIL/RCPT parameter parsing (policy.py), DATA read line by line with size,
line-length and bare CR/LF checks while it arrives (never buffering past the limit, never splitting one
DATA into two), per-command and whole-DATA deadlines (421 4.4.2), STARTTLS through loop.start_tls, the
drain gate (421 4.3.2 to the next command outside a transaction) and the unprompted 421 to idle
sessions. A message is answered 250 only after spool.store() returned (fsynced).

Why not aiosmtpd's SMTP class: besides the gaps DESIGN.md §3 lists (no connect hook, 555 before any
hook, DATA buffered whole), its constructor introspects the handler and itself on every connection
(~320 µs here), which matters at 1000 connections a second on two cores. This module keeps the same
shape (one coroutine per session) with a small line reader of its own.

What it must not do: decide replies itself (policy.py does), deliver (delivery.py does), or log message
content.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import ssl
import time
import typing
from collections.abc import Callable

from mailrelay_relay import config, logs, metrics, podstate, policy, spool

log = logging.getLogger("mailrelay.smtp")

SWEEP_INTERVAL = 0.1  # how often deadlines are checked (timeouts fire up to this much late)
READ_LIMIT = 64 * 1024  # longest line buffered before it is treated as over-long
_HIGH_WATER = 256 * 1024
_MAX_QUEUED_REPLIES = 64  # replies held back for batching before they are written regardless
_RESERVATION_STEP = 64 * 1024  # growth step when DATA outgrows its reservation
_BULK_LIMIT = 128 * 1024  # a DATA that ends within this many bytes is checked as one block
_YIELD_EVERY = 64  # lines read without waiting before the session yields to others
_session_ids = itertools.count(1)
_REPLY_CHILDREN: dict[int, object] = {}
_CONNECTION_CHILDREN = {result: metrics.CONNECTIONS.labels(result=result.value) for result in policy.Greeting}


class ConnectionClosed(Exception):
    pass


_REPLY_COUNTS: collections.Counter[int] = collections.Counter()


def _count_reply(code: int) -> None:
    _REPLY_COUNTS[code] += 1  # published by publish_reply_counts(), on app.py's 0.1 s timer


def publish_reply_counts() -> None:
    """Move the reply counts gathered since the last call into mailrelay_relay_replies_total."""
    for code, count in _REPLY_COUNTS.items():
        child = _REPLY_CHILDREN.get(code)
        if child is None:
            child = metrics.REPLIES.labels(code=str(code))
            _REPLY_CHILDREN[code] = child
        child.inc(count)  # type: ignore[attr-defined]
    _REPLY_COUNTS.clear()


class Server:
    """Everything the sessions of one worker share: settings, pod state, spool, the queue hand-off."""

    def __init__(self, cfg: config.Config, state: podstate.PodState, spool_: spool.Spool,
                 on_queued: Callable[[spool.QueuedMessage], None], *,
                 tls_context: ssl.SSLContext | None = None, worker: int = 0) -> None:
        self.cfg = cfg
        self.state = state
        self.spool = spool_
        self.on_queued = on_queued
        self.tls_context = tls_context
        self.worker = worker
        self.sessions: set[Session] = set()
        self.drain_started: float | None = None  # monotonic time this worker saw the drain begin
        self._server: asyncio.Server | None = None
        self._id_prefix = f"{os.getpid():x}-"

    def new_session_id(self) -> str:
        return f"{self._id_prefix}{next(_session_ids):x}"

    def protocol_factory(self) -> Session:
        return Session(self)

    async def start(self, *, reuse_port: bool = False) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.protocol_factory, self.cfg.listen_host, self.cfg.listen_port,
            reuse_port=reuse_port or None, reuse_address=True, backlog=1024,
        )
        loop.call_later(SWEEP_INTERVAL, self._sweep)
        return self._server

    def _sweep(self) -> None:
        """Every SWEEP_INTERVAL: a session past its deadline gets 421 4.4.2 (command, DATA, or reading)."""
        now = asyncio.get_running_loop().time()
        for session in list(self.sessions):
            deadline = session.deadline
            if deadline is not None and now >= deadline:
                session._on_timeout()
        asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._sweep)

    def bound_port(self) -> int:
        assert self._server is not None
        for sock in self._server.sockets:
            return int(sock.getsockname()[1])
        raise RuntimeError("not listening")

    # -- drain support ------------------------------------------------------------------------------------
    def note_draining(self, draining: bool, now: float) -> None:
        if draining and self.drain_started is None:
            self.drain_started = now
        elif not draining:
            self.drain_started = None

    def kick_idle(self, now: float) -> int:
        """While draining: send the unprompted 421 to sessions idle (outside a transaction) for the grace."""
        if self.drain_started is None:
            return 0
        kicked = 0
        for session in list(self.sessions):
            since = session.idle_since
            if since is None:
                continue
            if now - max(since, self.drain_started) >= self.cfg.drain_grace:
                session.abort(policy.shutting_down(self.cfg.hostname), "drain_idle")
                kicked += 1
        return kicked

    def close_all(self, reply: policy.Reply, reason: str) -> None:
        for session in list(self.sessions):
            session.abort(reply, reason)

    async def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class Session(asyncio.Protocol):
    """One SMTP connection."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.cfg = server.cfg
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.id = ""
        self.peer_ip: str | None = None
        self.counted = False
        self.closed = False
        self.buffer = bytearray()
        self.pos = 0
        self.eof = False
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.write_paused = False
        self.write_waiter: asyncio.Future[None] | None = None
        self.out: list[bytes] = []
        self.lines_served = 0
        self.deadline: float | None = None  # loop time by which the awaited input (or drain) must come
        self.idle_since: float | None = None
        self.task: asyncio.Task[None] | None = None
        self.tls = False
        # SMTP state
        self.greeted = False
        self.extended = False
        self.mail_from: str | None = None
        self.options: tuple[str, ...] = ()
        self.rcpts: list[str] = []
        self.reservation = 0
        self.bad_commands = 0
        self.may_relay = False

    # -- asyncio.Protocol -----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:  # after STARTTLS: the TLS transport replaces the plain one
            return
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        state = self.server.state
        cfg = self.cfg

        def take_slot() -> tuple[policy.Greeting, policy.Reply]:
            result, reply = policy.greeting(draining=state.draining, sessions=state.get(podstate.SESSIONS),
                                            max_sessions=cfg.max_sessions, hostname=cfg.hostname)
            if result is policy.Greeting.ACCEPTED:
                state.set(podstate.SESSIONS, state.get(podstate.SESSIONS) + 1)
            return result, reply

        result, reply = state.atomic(take_slot)
        _CONNECTION_CHILDREN[result].inc()
        if result is not policy.Greeting.ACCEPTED:
            _count_reply(reply.code)
            self.transport.write(reply.wire())
            self.transport.close()
            self.closed = True
            return
        self.counted = True
        metrics.SESSIONS.inc()
        self.id = self.server.new_session_id()
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) and peer else None
        self.may_relay = policy.may_relay(self.peer_ip, cfg.accept_from)
        self.server.sessions.add(self)
        logs.event(log, "session.open", level=logging.DEBUG, session=self.id, peer=self.peer_ip)
        self.task = self.loop.create_task(self.run(reply))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.paused and len(self.buffer) - self.pos > _HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.closed = True
        self._wake()
        if self.write_waiter is not None and not self.write_waiter.done():
            self.write_waiter.set_result(None)
        self.deadline = None
        self.idle_since = None
        self._release()
        if self.counted:
            self.counted = False
            self.server.state.add(podstate.SESSIONS, -1)
            metrics.SESSIONS.dec()
            self.server.sessions.discard(self)
            logs.event(log, "session.close", level=logging.DEBUG, session=self.id)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.write_waiter is not None and not self.write_waiter.done():
            self.write_waiter.set_result(None)

    # -- I/O helpers -----------------------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_timeout(self) -> None:
        logs.event(log, "session.timeout", session=self.id)
        self.abort(policy.timeout(self.cfg.hostname), "timeout")

    def abort(self, reply: policy.Reply, reason: str) -> None:
        """Send `reply` unprompted (421) and close; the session's coroutine ends on its next read."""
        if self.closed or self.transport is None:
            return
        logs.event(log, "session.abort", session=self.id, reason=reason, code=reply.code)
        self.idle_since = None
        if self.write_paused:  # the client does not read: drop what is queued for it
            self.closed = True
            self.out.clear()
            self.transport.abort()
        else:
            self.reply_now(reply)
            self.closed = True
            self.transport.close()
        self._wake()
        if self.write_waiter is not None and not self.write_waiter.done():
            self.write_waiter.set_result(None)

    def reply(self, reply: policy.Reply) -> None:
        """Queue a reply; it is written when the session next waits for input (PIPELINING batches)."""
        _count_reply(reply.code)
        self.out.append(reply.wire())

    def reply_now(self, reply: policy.Reply) -> None:
        self.reply(reply)
        self.flush()

    def reply_lines(self, lines: list[str]) -> None:
        _count_reply(int(lines[-1][:3]))
        self.out.append("".join(line + "\r\n" for line in lines).encode("ascii"))

    def flush(self) -> None:
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.out))
        self.out.clear()

    async def _writable(self, deadline: float) -> None:
        """Flush; if the client does not read its replies, wait for it, but only until `deadline`."""
        self.flush()
        if not self.write_paused or self.closed:
            return
        self.write_waiter = self.loop.create_future()
        self.deadline = deadline
        try:
            await self.write_waiter
        finally:
            self.deadline = None
            self.write_waiter = None
        if self.closed:
            raise ConnectionClosed

    async def _wait(self, deadline: float) -> None:
        await self._writable(deadline)
        if self.closed or self.eof:
            raise ConnectionClosed
        delay = deadline - self.loop.time()
        if delay <= 0:
            self._on_timeout()
            raise ConnectionClosed
        self.waiter = self.loop.create_future()
        self.deadline = deadline  # enforced by Server's sweep (a timer per wait costs more than a sweep)
        try:
            await self.waiter
        finally:
            self.deadline = None
            self.waiter = None

    async def readline(self, deadline: float, *, idle: bool = False) -> bytes:
        """The next line including its LF, or a chunk of READ_LIMIT bytes without LF for an over-long line.

        Raises ConnectionClosed on EOF or after an abort. `idle` marks the wait as "between transactions"
        for the drain's unprompted 421.
        """
        while True:
            if self.closed:
                raise ConnectionClosed
            if self.write_paused or len(self.out) >= _MAX_QUEUED_REPLIES:
                await self._writable(deadline)  # a pipelining client must read its replies
            self.lines_served += 1
            if self.lines_served % _YIELD_EVERY == 0:
                await asyncio.sleep(0)  # a long pipelined burst must not starve other sessions
            buffer = self.buffer
            index = buffer.find(b"\n", self.pos)
            if index >= 0:
                line = bytes(buffer[self.pos:index + 1])
                self.pos = index + 1
                self._compact()
                return line
            if len(buffer) - self.pos >= READ_LIMIT:
                chunk = bytes(buffer[self.pos:])
                self.pos = len(buffer)
                self._compact()
                return chunk
            if self.eof:
                raise ConnectionClosed
            if idle and self.mail_from is None:
                self.idle_since = self.loop.time()
            try:
                await self._wait(deadline)
            finally:
                self.idle_since = None

    def _compact(self) -> None:
        if self.pos >= len(self.buffer):
            self.buffer.clear()
            self.pos = 0
        elif self.pos > 65536:
            del self.buffer[:self.pos]
            self.pos = 0
        if self.paused and len(self.buffer) - self.pos < _HIGH_WATER // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    # -- the session ----------------------------------------------------------------------------------------
    async def run(self, greeting: policy.Reply) -> None:
        try:
            self.reply(greeting)
            while not self.closed:
                deadline = self.loop.time() + self.cfg.command_timeout
                line = await self.readline(deadline, idle=True)
                if not line.endswith(b"\n"):
                    while not line.endswith(b"\n"):  # discard the rest of an over-long command line
                        line = await self.readline(deadline)
                    self._bad(policy.LINE_TOO_LONG)
                    continue
                await self.command(line)
        except ConnectionClosed:
            pass
        except Exception:  # a bug must not take the worker down; the client gets a 421
            log.exception("session %s crashed", self.id)
            self.abort(internal_error(self.cfg.hostname), "internal_error")
        finally:
            self.flush()
            self._release()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    def _bad(self, reply: policy.Reply) -> None:
        self.bad_commands += 1
        if self.bad_commands >= policy.MAX_BAD_COMMANDS:
            self.abort(policy.too_many_errors(self.cfg.hostname), "too_many_errors")
        else:
            self.reply(reply)

    def _release(self) -> None:
        if self.reservation:
            self.server.state.add(podstate.INFLIGHT, -self.reservation)
            metrics.INFLIGHT_BYTES.dec(self.reservation)
            self.reservation = 0

    def _grow_reservation(self, held: int) -> bool:
        """The bytes really held count towards --max-inflight-bytes, whatever SIZE declared: grow the
        reservation to `held` (in steps), or return False when policy.may_grow refuses (the caller then
        stops keeping the content and the DATA ends with 451 4.3.2)."""
        extra = max(held - self.reservation, _RESERVATION_STEP)
        state = self.server.state
        limit = self.cfg.max_inflight_bytes
        mine = self.reservation

        def grow() -> bool:
            total = state.get(podstate.INFLIGHT)
            if not policy.may_grow(total=total, mine=mine, extra=extra, limit=limit):
                return False
            state.set(podstate.INFLIGHT, total + extra)
            return True

        if not state.atomic(grow):
            return False
        metrics.INFLIGHT_BYTES.inc(extra)
        self.reservation += extra
        return True

    def _reset(self) -> None:
        self._release()
        self.mail_from = None
        self.options = ()
        self.rcpts = []

    async def command(self, raw: bytes) -> None:
        if len(raw) > policy.MAX_COMMAND_LINE:
            self._bad(policy.LINE_TOO_LONG)
            return
        text = raw.rstrip(b"\r\n")
        try:
            line = text.decode("ascii")
        except UnicodeDecodeError:
            self._bad(policy.BAD_SYNTAX)
            return
        if not line.isprintable() or not line.strip():
            self._bad(policy.BAD_SYNTAX)
            return
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        gate = policy.drain_gate(draining=self.server.state.draining,
                                 in_transaction=self.mail_from is not None, verb=verb,
                                 hostname=self.cfg.hostname)
        if gate is not None:
            self.abort(gate, "draining")
            return
        handler = _HANDLERS.get(verb)
        if handler is None:
            if verb in policy.NOT_OFFERED:
                self._bad(policy.NOT_IMPLEMENTED)
            else:
                self._bad(policy.unknown_command(verb))
            return
        await handler(self, arg.strip())

    async def smtp_HELO(self, arg: str) -> None:
        if not arg:
            self.reply(policy.syntax("HELO hostname"))
            return
        self._reset()
        self.greeted, self.extended = True, False
        self.reply(policy.helo(self.cfg.hostname))

    async def smtp_EHLO(self, arg: str) -> None:
        if not arg:
            self.reply(policy.syntax("EHLO hostname"))
            return
        self._reset()
        self.greeted, self.extended = True, True
        self.reply_lines(policy.ehlo(self.cfg.hostname, max_message_size=self.cfg.max_message_size,
                                     starttls=self.server.tls_context is not None and not self.tls))

    async def smtp_MAIL(self, arg: str) -> None:
        state = self.server.state
        free = self.server.spool.free_bytes()
        cfg = self.cfg

        def decide() -> policy.MailDecision:
            decision = policy.decide_mail(arg, policy.MailContext(
                extended=self.extended, greeted=self.greeted, in_transaction=self.mail_from is not None,
                max_message_size=cfg.max_message_size, free_bytes=free,
                inflight_bytes=state.get(podstate.INFLIGHT), max_inflight_bytes=cfg.max_inflight_bytes))
            if decision.accepted:
                state.set(podstate.INFLIGHT, state.get(podstate.INFLIGHT) + decision.reservation)
            return decision

        decision = state.atomic(decide)
        if decision.accepted:
            self.mail_from = decision.mail_from
            self.options = decision.options
            self.rcpts = []
            self.reservation = decision.reservation
            metrics.INFLIGHT_BYTES.inc(decision.reservation)
        elif decision.reply.code in (500, 501):
            self.bad_commands += 1
        self.reply(decision.reply)

    async def smtp_RCPT(self, arg: str) -> None:
        decision = policy.decide_rcpt(arg, policy.RcptContext(
            extended=self.extended, in_transaction=self.mail_from is not None, recipients=len(self.rcpts),
            max_recipients=self.cfg.max_recipients, may_relay=self.may_relay))
        if decision.accepted:
            self.rcpts.append(decision.address)
        elif decision.reply.code == 554:
            logs.event(log, "relay.denied", session=self.id, peer=self.peer_ip)
        self.reply(decision.reply)

    async def smtp_DATA(self, arg: str) -> None:
        reply = policy.decide_data(arg, in_transaction=self.mail_from is not None, recipients=len(self.rcpts))
        self.reply(reply)
        if reply.code != 354:
            return
        deadline = self.loop.time() + self.cfg.data_timeout
        block = await self._read_small_data(deadline)
        if block is not None:  # the common case: the whole message at once, checked at C speed
            outcome, content = policy.scan_block(block, self.cfg.max_message_size)
            size = len(block)
            if len(content) > self.reservation and not self._grow_reservation(len(content)):
                outcome, content = policy.worse(outcome, policy.DataOutcome.INFLIGHT), b""
        else:  # a large message: line by line, never holding more than the limit
            scan = policy.DataScan(self.cfg.max_message_size)
            while not scan.done:
                scan.feed(await self.readline(deadline))
                if scan.size > self.reservation and scan.outcome is policy.DataOutcome.QUEUED \
                        and not self._grow_reservation(scan.size):
                    scan.refuse(policy.DataOutcome.INFLIGHT)
            outcome, content, size = scan.outcome, scan.content(), scan.size
            scan.chunks = []
        queue_id = ""
        if outcome is policy.DataOutcome.QUEUED:
            assert self.mail_from is not None
            envelope = spool.Envelope(self.mail_from, tuple(self.rcpts), self.options)
            self.flush()
            try:
                msg = await self.server.spool.store(envelope, content, time.time())
            except spool.SpoolFullError as error:
                outcome = policy.DataOutcome.SPOOL_FULL
                logs.event(log, "spool.full", level=logging.ERROR, session=self.id, error=str(error))
            except spool.SpoolError as error:
                outcome = policy.DataOutcome.SPOOL_ERROR
                logs.event(log, "spool.error", level=logging.ERROR, session=self.id, error=str(error))
            else:
                queue_id = msg.id
                metrics.MESSAGES_ACCEPTED.inc()
                metrics.MESSAGE_SIZE.observe(msg.size)
                self.server.on_queued(msg)
                logs.event(log, "message.queued", level=logging.DEBUG, session=self.id, queue_id=msg.id,
                           size=msg.size, rcpts=len(envelope.rcpt_tos))
        else:
            logs.event(log, "message.rejected", session=self.id, reason=outcome.value, size=size)
        self._reset()
        self.reply(policy.data_reply(outcome, queue_id))

    async def _read_small_data(self, deadline: float) -> bytes | None:
        """DATA up to the terminating CRLF "." CRLF when it arrives within _BULK_LIMIT bytes: the block
        before the dot (consumed with the terminator), else None with nothing consumed (read by line)."""
        searched = self.pos
        while True:
            if self.closed:
                raise ConnectionClosed
            buffer = self.buffer
            if buffer[self.pos:self.pos + 3] == b".\r\n":
                self.pos += 3
                self._compact()
                return b""
            index = buffer.find(b"\r\n.\r\n", max(self.pos, searched - 4))
            if 0 <= index - self.pos < _BULK_LIMIT:
                block = bytes(buffer[self.pos:index + 2])
                self.pos = index + 5
                self._compact()
                return block
            if len(buffer) - self.pos >= _BULK_LIMIT:
                return None
            searched = len(buffer)
            await self._wait(deadline)

    async def smtp_RSET(self, arg: str) -> None:
        self._reset()
        self.reply(policy.OK)

    async def smtp_NOOP(self, arg: str) -> None:
        self.reply(policy.OK)

    async def smtp_VRFY(self, arg: str) -> None:
        self.reply(policy.VRFY)

    async def smtp_HELP(self, arg: str) -> None:
        self.reply(policy.HELP)

    async def smtp_QUIT(self, arg: str) -> None:
        self.reply_now(policy.BYE)
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            self.reply(policy.syntax("STARTTLS"))
            return
        if self.server.tls_context is None:
            self.reply(policy.TLS_NOT_AVAILABLE)
            return
        if self.tls:
            self.reply(policy.TLS_ALREADY)
            return
        # RFC 3207: anything the client pipelined after STARTTLS is discarded (command injection).
        self.buffer.clear()
        self.pos = 0
        self.reply_now(policy.START_TLS)
        assert self.transport is not None
        try:
            new_transport = await self.loop.start_tls(
                self.transport, self, self.server.tls_context, server_side=True,
                ssl_handshake_timeout=min(60.0, self.cfg.command_timeout))
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as error:
            logs.event(log, "tls.failed", session=self.id, error=error.__class__.__name__)
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            raise ConnectionClosed from None
        if new_transport is None:
            raise ConnectionClosed
        self.transport = new_transport
        self.buffer.clear()
        self.pos = 0
        self.tls = True
        self._reset()
        self.greeted = self.extended = False


def internal_error(hostname: str) -> policy.Reply:
    return policy.Reply(421, "4.3.0", f"{hostname} Error: internal error, try again later", close=True)


_HANDLERS = {
    "HELO": Session.smtp_HELO,
    "EHLO": Session.smtp_EHLO,
    "MAIL": Session.smtp_MAIL,
    "RCPT": Session.smtp_RCPT,
    "DATA": Session.smtp_DATA,
    "RSET": Session.smtp_RSET,
    "NOOP": Session.smtp_NOOP,
    "VRFY": Session.smtp_VRFY,
    "HELP": Session.smtp_HELP,
    "QUIT": Session.smtp_QUIT,
    "STARTTLS": Session.smtp_STARTTLS,
}


def tls_context(cfg: config.Config) -> ssl.SSLContext | None:
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
    return context
