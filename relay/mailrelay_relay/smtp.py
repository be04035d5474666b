"""The relay's SMTP server: one asyncio protocol per connection, asking policy.py what to answer.

What it is for: the wire. `Session` is an asyncio StreamReaderProtocol of the relay's own: it reads
commands, streams DATA, keeps the session and transaction state and writes policy.py's replies. The
asyncio internals it needs (looks at the reader's buffer, the STARTTLS layering) are stream.py's.

- `connection_made`: the pod's session cap and the drain flag are checked (under podstate's lock) before
  anything is set up; a refused client gets its 421 and the connection closes, while the listener stays
  open.
- the command loop (`_handle_client`): policy.py's replies with enhanced status codes, replies to
  pipelined commands batched, the drain gate before each command, the per-command deadline, a session
  that is storing a message never cancelled (a lost connection ends it at its next read).
- MAIL/RCPT parameters are parsed by policy.py.
- DATA is streamed with policy.py's scanner: a small message in one pass, a large one line by line,
  content past the limits counted but never kept, and only a real CRLF "." CRLF ends it, so one DATA is
  never two messages. 250 only after spool.store().
- timeouts: one 0.1 s sweep per worker (`Server._sweep`) enforces the per-command, whole-DATA and
  client-must-read deadlines with 421 4.4.2; there is no timer per command.
- building a session is cheap (no introspection): the command table is built once per class.

The drain gate (421 4.3.2 to the next command outside a transaction) and the unprompted 421 to idle
sessions are driven by app.py through `Server`.

What it must not do: decide replies itself (policy.py does), deliver (delivery.py does), log message
content, or touch asyncio's private names (stream.py does).
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
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from mailrelay_relay import config, logs, metrics, podstate, policy, spool, stream

log = logging.getLogger("mailrelay.smtp")

SWEEP_INTERVAL = 0.1  # how often deadlines are checked (timeouts fire up to this much late)
READ_LIMIT = 128 * 1024  # the reader's limit: longest line or small DATA found in one piece
_MAX_QUEUED_REPLIES = 64  # replies held back for batching before they are written regardless
_RESERVATION_STEP = 64 * 1024  # growth step when DATA outgrows its reservation
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
                 tls_context: ssl.SSLContext | None = None, worker: int = 0,
                 upstream_lacks: Callable[[str], bool] = lambda extension: False) -> None:
        self.cfg = cfg
        self.upstream_lacks = upstream_lacks  # e.g. ("smtputf8"): the upstream's last EHLO lacked it
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
                session.timed_out()
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
            for session in self.sessions:  # a transaction in progress is the one each may complete
                if session.in_transaction:
                    session.drain_transaction = True
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


Command = Callable[["Session", str], Awaitable[None]]


def _command_table(cls: type[Session]) -> dict[str, Command]:
    """The verbs this relay implements and their methods, looked up once per class."""
    return {verb: getattr(cls, f"smtp_{verb}") for verb in sorted(policy.IMPLEMENTED)}


class Envelope:
    """The transaction in progress: MAIL FROM (None outside a transaction), its parameters, recipients."""

    __slots__ = ("mail_from", "mail_options", "rcpt_tos")

    def __init__(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.rcpt_tos: list[str] = []


class Session(asyncio.StreamReaderProtocol):
    """One SMTP connection (see the module docstring)."""

    _COMMANDS: ClassVar[dict[str, Command]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._COMMANDS = _command_table(cls)

    def __init__(self, server: Server) -> None:
        loop = asyncio.get_running_loop()
        self.reader = stream.Reader(limit=READ_LIMIT, loop=loop)
        super().__init__(self.reader, client_connected_cb=self._connected, loop=loop)
        cfg = server.cfg
        self.loop = loop
        self.tls_context = server.tls_context
        self.tls: stream.TlsLayer | None = None  # after STARTTLS
        self.transport: asyncio.BaseTransport | None = None
        self.writer: asyncio.StreamWriter  # set by _connected, when the connection is accepted
        self.task: asyncio.Task[None] | None = None  # the session's coroutine, once accepted
        self.host_name: str | None = None  # from HELO/EHLO
        self.extended_smtp = False  # EHLO rather than HELO
        self.envelope = Envelope()
        self.server = server
        self.cfg = cfg
        self.id = ""
        self.peer_ip: str | None = None
        self.counted = False
        self.closed = False
        self.write_paused = False
        self.out: list[bytes] = []
        self.lines_served = 0
        self.deadline: float | None = None  # loop time by which the awaited input (or drain) must come
        self.idle_since: float | None = None
        self.reservation = 0
        self.bad_commands = 0
        self.may_relay = False
        self.drain_transaction = False  # had a transaction while the relay was draining (policy.drain_gate)
        self.rcpt_options: list[tuple[str, ...]] = []  # per accepted recipient of this transaction
        self._greeting = policy.OK

    def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    # -- connection life cycle (asyncio.Protocol) ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.tls is not None:
            # the TLS layer after STARTTLS's handshake: RFC 3207 section 4.2, the session starts afresh
            # (no HELO/EHLO, no transaction) and plaintext that came meanwhile is dropped
            self.reset_transaction()
            self.host_name = None
            self.extended_smtp = False
            self.transport = transport
            self.tls.adopt(self.reader, self.writer)
            return
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
            typing.cast(asyncio.Transport, transport).write(reply.wire())  # uvloop's is not a subclass
            transport.close()
            self.closed = True
            return
        self.counted = True
        metrics.SESSIONS.inc()
        self.id = self.server.new_session_id()
        self._greeting = reply
        super().connection_made(transport)  # the reader's transport and the writer (_connected)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) and peer else None
        self.may_relay = policy.may_relay(self.peer_ip, cfg.accept_from)
        self.server.sessions.add(self)
        logs.event(log, "session.open", level=logging.DEBUG, session=self.id, peer=self.peer_ip)
        self.task = self.loop.create_task(self._handle_client())

    def connection_lost(self, error: Exception | None) -> None:
        """This does not cancel the session's coroutine: the reader gets EOF and the session ends at its
        next read, so a message being stored is stored and handed to delivery."""
        self.closed = True
        if self.task is None:
            return  # refused at the greeting: nothing was set up
        self.deadline = None
        self.idle_since = None
        self._release()
        if self.counted:
            self.counted = False
            self.server.state.add(podstate.SESSIONS, -1)
            metrics.SESSIONS.dec()
            self.server.sessions.discard(self)
            logs.event(log, "session.close", level=logging.DEBUG, session=self.id)
        if self.tls is not None:  # after STARTTLS the socket's own transport is closed explicitly
            self.tls.plain.close()
        super().connection_lost(error)
        self.transport = None

    def eof_received(self) -> bool | None:
        """The client closed its sending side: the reader gets EOF (the session's coroutine is not
        cancelled). The transport stays open (a half-close, except over TLS) until the session has
        answered what it received and reaches the EOF: Exim pipelines QUIT after a message's final dot
        and shuts down its side, then reads the 250; closing at the EOF would drop that 250 for a message
        already queued, and the client would send it again."""
        return super().eof_received()

    def pause_writing(self) -> None:
        self.write_paused = True
        super().pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        super().resume_writing()

    def timed_out(self) -> None:
        """The awaited input (or the client's reading) did not come by `deadline` (Server's sweep)."""
        logs.event(log, "session.timeout", session=self.id)
        self.abort(policy.timeout(self.cfg.hostname), "timeout")

    def reset_transaction(self) -> None:
        """Forget the transaction (after DATA, RSET, HELO/EHLO, STARTTLS): give back its in-flight
        reservation, and note a transaction that ends while draining."""
        if self.server.state.draining and self.in_transaction:
            self.drain_transaction = True
        self._release()
        self.envelope = Envelope()

    # -- replies and reading ----------------------------------------------------------------------------
    def abort(self, reply: policy.Reply, reason: str) -> None:
        """Send `reply` unprompted (421) and close; the session's coroutine ends at its next read."""
        transport = typing.cast(asyncio.Transport | None, self.transport)
        if self.closed or transport is None:
            return
        logs.event(log, "session.abort", session=self.id, reason=reason, code=reply.code)
        self.idle_since = None
        if self.write_paused:  # the client does not read: drop what is queued for it
            self.closed = True
            self.out.clear()
            transport.abort()
        else:
            self.reply_now(reply)
            self.closed = True
            transport.close()
        self.reader.feed_eof()  # wakes a read in progress

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
        transport = self.transport
        if self.out and transport is not None and not transport.is_closing():
            typing.cast(asyncio.Transport, transport).write(b"".join(self.out))
        self.out.clear()

    async def _writable(self, deadline: float) -> None:
        """Flush; if the client does not read its replies, wait for it, but only until `deadline`."""
        self.flush()
        if not self.write_paused or self.closed:
            return
        self.deadline = deadline
        try:
            await self.writer.drain()
        except OSError:
            raise ConnectionClosed from None
        finally:
            self.deadline = None
        if self.closed:
            raise ConnectionClosed

    async def _before_wait(self, deadline: float, idle: bool) -> None:
        """About to wait for the client: send what is queued, and give up if the deadline has passed."""
        await self._writable(deadline)
        if self.closed:
            raise ConnectionClosed
        if self.loop.time() >= deadline:
            self.timed_out()
            raise ConnectionClosed
        self.deadline = deadline  # enforced by Server's sweep (a timer per wait costs more than a sweep)
        if idle and not self.in_transaction:
            self.idle_since = self.loop.time()

    async def _read(self, deadline: float, separator: bytes, *, idle: bool = False,
                    data: bool = False) -> bytes:
        """reader.readuntil(separator); a LimitOverrunError (no separator within READ_LIMIT) propagates.
        With `data`, the whole DATA up to its CRLF "." CRLF instead (reader.read_data): a bare LF "." LF
        raises BareLfEnd."""
        if self.closed:
            raise ConnectionClosed
        reader = self.reader
        if self.write_paused or len(self.out) >= _MAX_QUEUED_REPLIES:
            await self._writable(deadline)  # a pipelining client must read its replies
        self.lines_served += 1
        if self.lines_served % _YIELD_EVERY == 0:
            await asyncio.sleep(0)  # a long pipelined burst must not starve other sessions
        if data or not reader.holds(separator):  # a DATA is read from right after its 354: send that
            await self._before_wait(deadline, idle)
        try:
            if data:
                return await reader.read_data()
            return await reader.readuntil(separator)
        except asyncio.IncompleteReadError:
            raise ConnectionClosed from None  # EOF
        except OSError:
            raise ConnectionClosed from None  # the connection was lost with an error
        finally:
            self.deadline = None
            self.idle_since = None

    async def readline(self, deadline: float, *, idle: bool = False) -> bytes:
        """The next line including its LF, or a chunk of at most READ_LIMIT bytes without LF for an
        over-long line. Raises ConnectionClosed on EOF or after an abort. `idle` marks the wait as
        "between transactions" for the drain's unprompted 421."""
        try:
            return await self._read(deadline, b"\n", idle=idle)
        except asyncio.LimitOverrunError as error:
            return await self.reader.read(error.consumed)

    # -- the session --------------------------------------------------------------------------------------
    async def _handle_client(self) -> None:
        try:
            self.reply(self._greeting)
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

    @property
    def in_transaction(self) -> bool:
        return self.envelope.mail_from is not None

    async def command(self, raw: bytes) -> None:
        if len(raw) > policy.MAX_COMMAND_LINE:
            self._bad(policy.LINE_TOO_LONG)
            return
        text = raw.rstrip(b"\r\n")
        try:
            line = text.decode("utf-8")  # UTF-8 only in MAIL and RCPT addresses (SMTPUTF8, below)
        except UnicodeDecodeError:
            self._bad(policy.BAD_SYNTAX)
            return
        if not line.isprintable() or not line.strip():
            self._bad(policy.BAD_SYNTAX)
            return
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if not line.isascii() and verb not in ("MAIL", "RCPT"):
            self._bad(policy.BAD_SYNTAX)
            return
        gate = policy.drain_gate(draining=self.server.state.draining, verb=verb,
                                 drain_transaction_used=self.drain_transaction, hostname=self.cfg.hostname)
        if gate is not None:
            self.abort(gate, "draining")
            return
        handler = self._COMMANDS.get(verb)
        if handler is None:
            if verb in policy.NOT_OFFERED:
                self._bad(policy.NOT_IMPLEMENTED)
            else:
                self._bad(policy.unknown_command(verb))
            return
        await handler(self, arg.strip())

    async def smtp_HELO(self, hostname: str) -> None:
        if not hostname:
            self.reply(policy.syntax("HELO hostname"))
            return
        self.reset_transaction()
        self.host_name = hostname
        self.extended_smtp = False
        self.reply(policy.helo(self.cfg.hostname))

    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            self.reply(policy.syntax("EHLO hostname"))
            return
        self.reset_transaction()
        self.host_name = hostname
        self.extended_smtp = True
        self.reply_lines(policy.ehlo(self.cfg.hostname, max_message_size=self.cfg.max_message_size,
                                     starttls=self.tls_context is not None and self.tls is None))

    async def smtp_MAIL(self, arg: str | None) -> None:
        state = self.server.state
        free = self.server.spool.free_bytes()
        cfg = self.cfg
        envelope = self.envelope

        def decide() -> policy.MailDecision:
            decision = policy.decide_mail(arg, policy.MailContext(
                extended=self.extended_smtp, greeted=self.host_name is not None,
                in_transaction=envelope.mail_from is not None,
                max_message_size=cfg.max_message_size, free_bytes=free,
                inflight_bytes=state.get(podstate.INFLIGHT), max_inflight_bytes=cfg.max_inflight_bytes,
                upstream_lacks_smtputf8=self.server.upstream_lacks("smtputf8")))
            if decision.accepted:
                state.set(podstate.INFLIGHT, state.get(podstate.INFLIGHT) + decision.reservation)
            return decision

        decision = state.atomic(decide)
        if decision.accepted:
            if state.draining:
                self.drain_transaction = True  # the one transaction a draining relay still completes
            envelope.mail_from = decision.mail_from
            envelope.mail_options = list(decision.options)
            envelope.rcpt_tos = []
            self.rcpt_options = []
            self.reservation = decision.reservation
            metrics.INFLIGHT_BYTES.inc(decision.reservation)
        elif decision.reply.code in (500, 501):
            self.bad_commands += 1
        self.reply(decision.reply)

    async def smtp_RCPT(self, arg: str | None) -> None:
        envelope = self.envelope
        decision = policy.decide_rcpt(arg, policy.RcptContext(
            extended=self.extended_smtp, in_transaction=envelope.mail_from is not None,
            recipients=len(envelope.rcpt_tos), max_recipients=self.cfg.max_recipients,
            may_relay=self.may_relay, smtputf8="SMTPUTF8" in envelope.mail_options))
        if decision.accepted:
            envelope.rcpt_tos.append(decision.address)
            self.rcpt_options.append(decision.options)
        elif decision.reply.code == 554:
            logs.event(log, "relay.denied", session=self.id, peer=self.peer_ip)
        self.reply(decision.reply)

    async def smtp_DATA(self, arg: str) -> None:
        envelope = self.envelope
        reply = policy.decide_data(arg, in_transaction=envelope.mail_from is not None,
                                   recipients=len(envelope.rcpt_tos))
        self.reply(reply)
        if reply.code != 354:
            return
        deadline = self.loop.time() + self.cfg.data_timeout
        try:
            await self._read_data(deadline, envelope)
        except stream.BareLfEnd:
            logs.event(log, "message.rejected", session=self.id, reason="bare_lf_end", size=0)
            self.abort(policy.bare_lf_end(self.cfg.hostname), "bare_lf_end")

    async def _read_data(self, deadline: float, envelope: Envelope) -> None:
        """DATA after the 354: read, check, store, answer. Raises BareLfEnd."""
        block = await self._read_small_data(deadline)
        if block is not None:  # the common case: the whole message at once, checked at C speed
            outcome, content = policy.scan_block(block, self.cfg.max_message_size)
            size = len(block)
            if len(content) > self.reservation and not self._grow_reservation(len(content)):
                outcome, content = policy.worse(outcome, policy.DataOutcome.INFLIGHT), b""
        else:  # a large message: line by line, never holding more than the limit
            scan = policy.DataScan(self.cfg.max_message_size)
            while not scan.done:
                piece = await self.readline(deadline)
                if piece == b".\n" and not scan.partial and scan.tail.endswith(b"\n"):
                    raise stream.BareLfEnd
                self._feed(scan, piece)
            outcome, content, size = scan.outcome, scan.content(), scan.size
            scan.chunks = []
        queue_id = ""
        if outcome is policy.DataOutcome.QUEUED:
            assert envelope.mail_from is not None
            record = spool.Envelope(envelope.mail_from, tuple(envelope.rcpt_tos),
                                    tuple(envelope.mail_options), tuple(self.rcpt_options))
            self.flush()
            try:
                msg = await self.server.spool.store(record, content, time.time())
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
                           size=msg.size, rcpts=len(record.rcpt_tos))
        else:
            logs.event(log, "message.rejected", session=self.id, reason=outcome.value, size=size)
        self.reset_transaction()
        self.reply(policy.data_reply(outcome, queue_id))

    def _feed(self, scan: policy.DataScan, piece: bytes) -> None:
        scan.feed(piece)
        if scan.size > self.reservation and scan.outcome is policy.DataOutcome.QUEUED \
                and not self._grow_reservation(scan.size):
            scan.refuse(policy.DataOutcome.INFLIGHT)

    async def _read_small_data(self, deadline: float) -> bytes | None:
        """DATA up to the terminating CRLF "." CRLF when it ends within READ_LIMIT bytes: the block before
        the dot (ending with its CRLF, or empty), read and scanned in one piece. None when it does not:
        nothing has been consumed, and the caller reads it by line."""
        try:
            return (await self._read(deadline, b"", data=True))[:-3]
        except asyncio.LimitOverrunError:
            return None

    async def smtp_RSET(self, arg: str) -> None:
        self.reset_transaction()
        self.reply(policy.OK)

    async def smtp_NOOP(self, arg: str) -> None:
        self.reply(policy.OK)

    async def smtp_VRFY(self, arg: str) -> None:
        self.reply(policy.vrfy(arg))

    async def smtp_HELP(self, arg: str) -> None:
        self.reply(policy.help_reply(starttls=self.tls_context is not None and self.tls is None))

    async def smtp_QUIT(self, arg: str) -> None:
        self.reply_now(policy.BYE)
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            self.reply(policy.syntax("STARTTLS"))
            return
        if self.tls_context is None:
            self.reply(policy.TLS_NOT_AVAILABLE)
            return
        if self.tls is not None:
            self.reply(policy.TLS_ALREADY)
            return
        # RFC 3207: anything the client pipelined after STARTTLS is discarded (command injection).
        self.reader.discard()
        self.reply_now(policy.START_TLS)
        # The TLS layer goes between the socket and this protocol; once the handshake is done asyncio
        # calls connection_made again (the branch that starts the session afresh).
        plain = self.transport
        assert plain is not None
        self.tls = stream.TlsLayer(self, plain, self.tls_context,
                                   handshake_timeout=max(1, min(60, int(self.cfg.command_timeout))))
        self.transport = self.tls.transport
        self.tls.start()
        try:
            await self.tls.handshake
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as error:
            logs.event(log, "tls.failed", session=self.id, error=error.__class__.__name__)
            plain.close()
            self.connection_lost(None)  # the TLS layer never hands the loss on during a handshake
            raise ConnectionClosed from None


def internal_error(hostname: str) -> policy.Reply:
    return policy.Reply(421, "4.3.0", f"{hostname} Error: internal error, try again later", close=True)


Session._COMMANDS = _command_table(Session)


def tls_context(cfg: config.Config) -> ssl.SSLContext | None:
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
    return context
