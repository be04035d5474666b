"""Delivery of spooled messages to the upstream smarthost: the queue, retries, dead-letter, and the
default Sender (a pool of reused aiosmtplib connections).

What it is for: every message the relay answered 250 for is `submit()`ted here (and every message
recovered from the spool at start). `Delivery` hands it to a `Sender` until the upstream answers 250,
then removes the spool file. Temporary failures (4xx, 421, a lost or refused connection, a timeout) are
retried on the schedule of `mailrelay_common.backoff` (exponential, jittered, capped); a permanent
failure (5xx), or a message that outlives the queue lifetime (`expiry`), is moved to the dead-letter
folder with its reason and counted, and its sender gets a delivery status notification (dsn.py builds
it; it is spooled and delivered like any message, from <>, so its own failure ends in dead-letter
without another; NOTIFY and --notify-senders decide who gets one, --delay-warning-time adds a one-time
delay warning, and NOTIFY=SUCCESS through an upstream without DSN gets a "relayed" report). Nothing is
ever dropped silently: a message leaves the queue only through `spool.remove` after the upstream's 250,
or through `spool.dead_letter` with a reason, and each way is counted (`messages_delivered_total` /
`messages_dead_lettered_total{reason}`), so per message exactly one of the two counters moves.

What it must not do: decide SMTP replies to clients, write spool files itself (spool.py owns the
format), read message content into logs, or block the event loop per message: small spool files are read
inline (the page cache makes that cheap; large ones in a thread), and delivered files are unlinked in
batches in a thread (unlink contends with the spool's group-commit renames for the queue directory's
lock). A crash between the upstream's 250 and the unlink means one duplicate delivery after the restart,
never a loss.

Throughput: connections are pooled and reused (one EHLO/STARTTLS/AUTH per connection, not per message),
`concurrency` workers each run one transaction at a time, a new message wakes exactly one idle worker,
and MAIL/RCPT are sent with the addresses exactly as accepted (no re-parsing per message).

Partial recipient failures (the choice made here): the message is sent to the recipients the upstream
accepted. Recipients refused with 4xx stay queued, and only they are retried (the spool file keeps the
full envelope; the remaining recipients are tracked in memory, so after a restart the accepted ones
may receive a duplicate: at-least-once, never lost). Recipients refused with 5xx are remembered; once
no recipient is left to retry, a message with any permanently refused recipient is dead-lettered
(reason `permanent`; the reason text names each refused recipient with the upstream's reply and how many
were delivered), else it is removed as delivered. When the lifetime expires first, it is dead-lettered
with reason `expired`.

Deferrals are logged at warning (`delivery.deferred`), rate-limited per kind of failure (e.g.
`connection SSLCertVerificationError`, `upstream 451`, `recipients 450`): the first one, then at most
one line per kind per `deferral_log_interval` seconds per process, carrying the count of those left out
(`suppressed`). The reason is the upstream's reply or the error, with the local part of any address cut
out (logs.redact); message content never reaches a log. Every deferral is still logged at debug.

Upstream outages: besides the per-message backoff, a connection failure or a 421 closes a short "gate"
(its own backoff, capped at a few seconds) during which no worker starts a new attempt, so a down upstream is
probed rather than hammered with every queued message. `retry_now()` (drain) opens the gate and wakes
every deferred message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import heapq
import logging
import random
import socket
import ssl
import time
import typing
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Literal, NamedTuple

import aiosmtplib
from mailrelay_common import backoff

from mailrelay_relay import dsn, expiry, logs, metrics, spool, wire

log = logging.getLogger("mailrelay.delivery")

# Content up to this size is read from the spool inline (a page-cache hit costs microseconds); bigger
# files are read in a thread so a 25 MiB message does not stall the event loop.
INLINE_READ_LIMIT = 1 << 20


class Reply(NamedTuple):
    code: int
    text: str


class DeliveryFailure(Exception):
    """The upstream refused the whole message with `code` and `text`."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


class TemporaryFailure(DeliveryFailure):
    """A 4xx (or otherwise unexpected, non-5xx) reply: retry later."""


class PermanentFailure(DeliveryFailure):
    """A 5xx reply to MAIL or DATA: the message goes to dead-letter."""


class RecipientsRejected(Exception):
    """Some recipients were refused at RCPT (or all of them). The others, if any, got the message.

    `failures` maps each refused recipient to the upstream's reply; 4xx ones are retried, 5xx ones
    dead-lettered (see the module docstring).
    """

    def __init__(self, failures: Mapping[str, Reply], *, dsn_passed: bool | None = None) -> None:
        super().__init__("; ".join(f"<{r}>: {c} {t}" for r, (c, t) in failures.items()))
        self.failures = dict(failures)
        self.dsn_passed = dsn_passed  # as send()'s result, for the recipients that were accepted


class UpstreamUnavailable(ConnectionError):
    """The upstream could not be reached or refused the session (greeting, EHLO, TLS or AUTH)."""


class _DiedAtMail(aiosmtplib.SMTPServerDisconnected):
    """The connection was found closed when MAIL was sent: nothing of this message was handed on."""


def classify(code: int, text: str) -> DeliveryFailure:
    """A whole-message failure for an upstream reply: 5xx is permanent, anything else temporary."""
    return PermanentFailure(code, text) if 500 <= code <= 599 else TemporaryFailure(code, text)


class Sender(typing.Protocol):
    """The swappable upstream. The default is `SmtpSender`, made by `make_sender`."""

    async def send(self, envelope: spool.Envelope, content: bytes) -> bool | None:
        """Hand one message on; return on the upstream's 250 for every recipient: False when the
        upstream does not offer DSN, so the DSN parameters were not passed on and the relay must report
        NOTIFY=SUCCESS itself (None: not known, taken as passed on).

        Raises TemporaryFailure / PermanentFailure (whole message), RecipientsRejected (some or all
        recipients refused), or ConnectionError / TimeoutError / OSError (upstream unreachable or lost).
        """
        ...

    async def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class UpstreamConfig:
    host: str
    port: int
    tls: Literal["none", "starttls", "tls"] = "none"
    user: str | None = None
    password: str | None = None
    connections: int = 4
    timeout: float = 30.0
    # EHLO name; None uses the host name (no DNS lookup).
    local_hostname: str | None = None
    # Verify the upstream's certificate (tls/starttls); `cafile` adds a CA bundle (e.g. a private CA).
    validate_certs: bool = True
    cafile: str | None = None
    # A pooled connection idle longer than this is checked with NOOP before it carries a message.
    check_idle_after: float = 2.0
    # A pooled connection idle longer than this is closed instead of reused.
    max_idle: float = 120.0

    def __post_init__(self) -> None:
        if self.tls not in ("none", "starttls", "tls"):
            raise ValueError(f"upstream tls must be none, starttls or tls, not {self.tls!r}")
        if self.connections < 1:
            raise ValueError("upstream connections must be >= 1")
        if self.timeout <= 0:
            raise ValueError("upstream timeout must be > 0")
        if (self.user is None) != (self.password is None):
            raise ValueError("upstream user and password go together")


@dataclasses.dataclass
class _Connection:
    smtp: aiosmtplib.SMTP
    last_used: float


_ESMTP_PARAM_EXTENSION = {
    "BODY": "8bitmime",
    "SMTPUTF8": "smtputf8",
    "SIZE": "size",
    "RET": "dsn",
    "ENVID": "dsn",
    "REQUIRETLS": "requiretls",
}


def upstream_mail_options(options: tuple[str, ...], extensions: Mapping[str, str]) -> list[str]:
    """The MAIL parameters to pass on: those whose extension the upstream advertises in its EHLO.

    Others are left out (e.g. BODY=8BITMIME to a 7-bit upstream is sent as is, like Postfix does),
    except SMTPUTF8, which `_transaction` turns into a permanent failure when an address needs it.
    """
    kept = []
    for option in options:
        keyword = option.split("=", 1)[0].upper()
        extension = _ESMTP_PARAM_EXTENSION.get(keyword)
        if extension is not None and extension in extensions:
            kept.append(option)
    return kept


class SmtpSender:
    """The default Sender: up to `connections` aiosmtplib connections to one upstream, reused.

    Each `send` borrows one connection (LIFO, so a hot connection is reused and extra ones idle out),
    runs one transaction and returns it. A connection that sat idle for `check_idle_after` seconds is
    checked with NOOP first; a reused connection found dead at MAIL is replaced once, transparently,
    before anything was accepted. A connection that saw a 421, a timeout or a lost connection is closed.
    """

    def __init__(self, cfg: UpstreamConfig) -> None:
        self._cfg = cfg
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(cfg.connections)
        self._closed = False
        self._local_hostname = cfg.local_hostname or socket.gethostname() or "localhost"
        self._tls_context: ssl.SSLContext | None = None
        self.extensions: frozenset[str] | None = None  # what the upstream's last EHLO offered
        if cfg.tls != "none":
            context = ssl.create_default_context(cafile=cfg.cafile)
            if not cfg.validate_certs:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._tls_context = context

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def _connect(self) -> _Connection:
        cfg = self._cfg
        smtp = aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            local_hostname=self._local_hostname,
            timeout=cfg.timeout,
            use_tls=cfg.tls == "tls",
            start_tls=cfg.tls == "starttls",
            tls_context=self._tls_context,
            username=cfg.user,
            password=cfg.password,
        )
        try:
            await smtp.connect()
            if smtp.is_ehlo_or_helo_needed:
                try:
                    await smtp.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await smtp.helo()  # an upstream without ESMTP
            self.extensions = frozenset(smtp.esmtp_extensions)
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise UpstreamUnavailable(f"upstream refused the session: {exc.code} {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            smtp.close()
            raise UpstreamUnavailable(f"upstream unavailable: {exc}") from exc
        return _Connection(smtp, time.monotonic())

    async def _acquire(self) -> tuple[_Connection, bool]:
        """A connection and whether it is a reused one (the caller holds a slot)."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            idle = now - conn.last_used
            if not conn.smtp.is_connected or idle > self._cfg.max_idle:
                conn.smtp.close()
                continue
            if idle > self._cfg.check_idle_after:
                try:
                    await conn.smtp.noop(timeout=min(self._cfg.timeout, 10.0))
                except (aiosmtplib.SMTPException, OSError):
                    conn.smtp.close()
                    continue
            return conn, True
        return await self._connect(), False

    def _release(self, conn: _Connection) -> None:
        if conn.smtp.is_connected and not self._closed:
            conn.last_used = time.monotonic()
            self._idle.append(conn)
        else:
            conn.smtp.close()

    async def send(self, envelope: spool.Envelope, content: bytes) -> bool | None:
        if self._closed:
            raise UpstreamUnavailable("sender is closed")
        async with self._slots:
            conn, reused = await self._acquire()
            try:
                try:
                    return await self._transaction(conn.smtp, envelope, content)
                except _DiedAtMail:
                    if not reused:
                        raise
                    # The reused connection had died before MAIL was answered: nothing was handed
                    # on, so one retry on a fresh connection is safe.
                    conn.smtp.close()
                    conn = await self._connect()
                    return await self._transaction(conn.smtp, envelope, content)
            finally:
                self._release(conn)

    async def _transaction(self, smtp: aiosmtplib.SMTP, envelope: spool.Envelope, content: bytes) -> bool:
        utf8 = any(o.upper() == "SMTPUTF8" for o in envelope.mail_options)
        dsn_passed = "dsn" in smtp.esmtp_extensions
        if utf8 and "smtputf8" not in smtp.esmtp_extensions:
            raise PermanentFailure(553, "5.6.7 upstream does not offer SMTPUTF8, which this message needs")
        encoding = "utf-8" if utf8 else "ascii"
        options = upstream_mail_options(envelope.mail_options, smtp.esmtp_extensions)
        try:
            await _command(smtp, b"MAIL FROM:", envelope.mail_from, options, encoding, (250,))
        except aiosmtplib.SMTPServerDisconnected as exc:
            raise _DiedAtMail(str(exc)) from exc
        except aiosmtplib.SMTPResponseException as exc:
            await _reset(smtp)
            raise classify(exc.code, exc.message) from exc
        except (UnicodeEncodeError, ValueError) as exc:
            await _reset(smtp)
            raise PermanentFailure(553, f"5.1.7 sender address not usable upstream: {exc}") from exc
        failures: dict[str, Reply] = {}
        accepted: list[str] = []
        for index, rcpt in enumerate(envelope.rcpt_tos):
            rcpt_options = list(envelope.options_of(index)) if dsn_passed else []
            try:
                await _command(smtp, b"RCPT TO:", rcpt, rcpt_options, encoding, (250, 251))
            except aiosmtplib.SMTPResponseException as exc:
                if not smtp.is_connected:
                    # 421 (or a reply and a hang-up): the upstream closed the session mid-transaction.
                    raise classify(exc.code, exc.message) from exc
                failures[rcpt] = Reply(exc.code, exc.message)
            except (UnicodeEncodeError, ValueError) as exc:
                failures[rcpt] = Reply(553, f"5.1.3 recipient address not usable upstream: {exc}")
            else:
                accepted.append(rcpt)
        if not accepted:
            await _reset(smtp)
            raise RecipientsRejected(failures)
        try:
            await _data(smtp, wire.stuff(content))
        except aiosmtplib.SMTPResponseException as exc:
            if not failures:
                raise classify(exc.code, exc.message) from exc
            failures.update({rcpt: Reply(exc.code, exc.message) for rcpt in accepted})
            raise RecipientsRejected(failures) from exc
        if failures:
            raise RecipientsRejected(failures, dsn_passed=dsn_passed)
        return dsn_passed

    async def close(self) -> None:
        """Close every pooled connection (QUIT, best effort). Idempotent."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                await conn.smtp.quit(timeout=2.0)
            except (aiosmtplib.SMTPException, OSError):
                pass
            finally:
                conn.smtp.close()


async def _command(
    smtp: aiosmtplib.SMTP, verb: bytes, address: str, options: list[str], encoding: str,
    ok: tuple[int, ...],
) -> None:
    """MAIL FROM:<address> / RCPT TO:<address> with the address exactly as the relay accepted it.

    aiosmtplib's mail()/rcpt() re-parse addresses with email.utils.parseaddr, which costs time per
    message and can rewrite unusual (but valid) local parts; execute_command still refuses CR, LF and
    NUL in any argument (the CR/LF injection fix) and closes the connection on a 421.
    """
    arg = verb + b"<" + address.encode(encoding) + b">"
    response = await smtp.execute_command(arg, *(o.encode("ascii") for o in options))
    if response.code not in ok:
        raise aiosmtplib.SMTPResponseException(response.code, response.message)


async def _data(smtp: aiosmtplib.SMTP, payload: bytes) -> None:
    """DATA, then `payload` (`wire.stuff`) in one write, then the upstream's reply: smtp.data() without
    its second pass over the message. Raises SMTPResponseException (SMTPDataError) on any reply but 354
    and 250, and closes the connection when it is lost or times out, as data() does."""
    response = await smtp.execute_command(b"DATA")
    if response.code != 354:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    try:
        protocol.write(payload)
        # No await between the write and read_response, which marks the reply as expected before it
        # waits: the reply cannot arrive unexpected.
        response = await protocol.read_response(timeout=smtp.timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()
        raise
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)


async def _reset(smtp: aiosmtplib.SMTP) -> None:
    """RSET after a refused transaction, so the connection can carry the next one; close if that fails."""
    if not smtp.is_connected:
        return
    try:
        await smtp.rset()
    except (aiosmtplib.SMTPException, OSError):
        smtp.close()


def _root_cause(exc: BaseException) -> str:
    """The class name of the innermost cause (e.g. SSLCertVerificationError inside UpstreamUnavailable)."""
    seen = 0
    while exc.__cause__ is not None and seen < 10:
        exc, seen = exc.__cause__, seen + 1
    return type(exc).__name__


def _only(envelope: spool.Envelope, recipients: tuple[str, ...]) -> spool.Envelope:
    """The envelope for the recipients still to try, each with its own RCPT parameters."""
    options = tuple(envelope.options_of(envelope.rcpt_tos.index(r)) for r in recipients)
    return dataclasses.replace(envelope, rcpt_tos=recipients,
                               rcpt_options=options if any(options) else ())


def make_sender(cfg: UpstreamConfig) -> Sender:
    return SmtpSender(cfg)


@dataclasses.dataclass(frozen=True)
class QueueStats:
    messages: int
    bytes: int
    oldest_age_seconds: float


@dataclasses.dataclass(eq=False)
class _Item:
    msg: spool.QueuedMessage
    remaining: tuple[str, ...]
    attempts: int = 0
    delivered_to: int = 0
    permanent: list[str] = dataclasses.field(default_factory=list)
    failed: list[dsn.Recipient] = dataclasses.field(default_factory=list)  # for the sender's notification
    warned: bool = False  # the sender had its delay warning (in memory: a restart may warn once more)


class Delivery:
    """The delivery queue: workers that take ready messages, a timer for deferred ones.

    `concurrency` workers run attempts in parallel (match the sender's connection count). `schedule`
    is the retry backoff; `rand` draws the jitter (a parameter so tests can make it deterministic).
    `stop()` lets attempts in flight finish for up to `stop_grace` seconds, then closes the sender.
    """

    def __init__(
        self,
        spool: spool.Spool,
        sender: Sender,
        *,
        queue_lifetime: float,
        clock: Callable[[], float] = time.time,
        concurrency: int = 4,
        schedule: backoff.Schedule | None = None,
        rand: Callable[[], float] = random.random,
        stop_grace: float = 10.0,
        deferral_log_interval: float = 60.0,
        hostname: str = "localhost",
        notify: bool = False,
        delay_warning: float = 0.0,
    ) -> None:
        if queue_lifetime <= 0:
            raise ValueError("queue_lifetime must be > 0")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._spool = spool
        self._sender = sender
        self._lifetime = queue_lifetime
        self._clock = clock
        self._concurrency = concurrency
        self._schedule = schedule or backoff.Schedule()
        self._gate_schedule = backoff.Schedule(
            base=min(0.1, self._schedule.base), factor=2.0, cap=min(5.0, self._schedule.cap), jitter=0.25
        )
        self._rand = rand
        self._stop_grace = stop_grace
        self._items: dict[str, _Item] = {}
        self._bytes = 0
        self._ready: collections.deque[_Item] = collections.deque()
        self._deferred: list[tuple[float, int, _Item]] = []
        self._seq = 0
        self._inflight = 0
        self._conn_failures = 0
        self._gate_until = 0.0
        # Idle workers wait on one future each; a new message wakes exactly one of them.
        self._idle_workers: collections.deque[asyncio.Future[None]] = collections.deque()
        self._wake_timer: asyncio.Event | None = None
        self._gate_open: asyncio.Event | None = None
        self._empty: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._removals: list[_Item] = []
        self._remover: asyncio.Task[None] | None = None
        self._stopping = False
        self._deferral_log = logs.RateLimiter(deferral_log_interval)
        self._hostname = hostname  # the Reporting-MTA of notifications
        self._notify = notify  # False: no notifications to senders (--notify-senders false)
        self._notifying: set[asyncio.Task[None]] = set()
        self._delay_warning = delay_warning  # > 0: warn the sender once a message has waited this long

    # -- the interface app.py uses ----------------------------------------------------------------

    def submit(self, msg: spool.QueuedMessage) -> None:
        """Queue a newly accepted or recovered message for an immediate attempt."""
        if msg.id in self._items:
            return
        item = _Item(msg=msg, remaining=tuple(msg.envelope.rcpt_tos))
        self._items[msg.id] = item
        self._bytes += msg.size
        self._ready.append(item)
        if self._empty is not None:
            self._empty.clear()
        self._wake_workers(1)
        self._publish()

    def upstream_lacks(self, extension: str) -> bool:
        """True when the upstream's last EHLO (seen by this worker's sender) did not offer `extension`
        (lower case, e.g. "smtputf8"); False while that is not known."""
        offered: frozenset[str] | None = getattr(self._sender, "extensions", None)
        return offered is not None and extension not in offered

    def stats(self) -> QueueStats:
        """Messages and bytes queued (waiting, deferred or in flight) and the oldest one's age."""
        oldest = 0.0
        if self._items:
            first = next(iter(self._items.values()))
            oldest = max(0.0, self._clock() - first.msg.received_at)
        return QueueStats(messages=len(self._items), bytes=self._bytes, oldest_age_seconds=oldest)

    async def start(self) -> None:
        self._stopping = False
        self._wake_timer = asyncio.Event()
        self._gate_open = asyncio.Event()
        self._empty = asyncio.Event()
        if not self._items:
            self._empty.set()
        self._tasks = [asyncio.create_task(self._worker(), name=f"delivery-{n}")
                       for n in range(self._concurrency)]
        self._tasks.append(asyncio.create_task(self._timer(), name="delivery-timer"))
        self._publish_all()

    async def stop(self) -> None:
        """Stop taking messages, let attempts in flight finish (bounded), then close the sender.

        Whatever is still queued stays in the spool for the next process start (recover + submit).
        This is final for this Delivery: its sender is closed, so build a new one rather than start again.
        """
        self._stopping = True
        self._open_gate()
        workers = [t for t in self._tasks if t.get_name() != "delivery-timer"]
        if workers:
            _, pending = await asyncio.wait(workers, timeout=self._stop_grace)
            for task in pending:
                task.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._notifying:  # each one spools a notification, then dead-letters its message: let it end
            await asyncio.wait(set(self._notifying), timeout=self._stop_grace)
        if self._remover is not None:
            await self._remover
        await self._sender.close()

    def retry_now(self) -> None:
        """Drain: every deferred message gets an immediate attempt, and the outage gate opens."""
        while self._deferred:
            _, _, item = heapq.heappop(self._deferred)
            self._ready.append(item)
        self._open_gate()

    async def wait_empty(self, timeout: float) -> bool:  # noqa: ASYNC109 (the interface app.py uses)
        """True once the queue is empty (all delivered or dead-lettered), False after `timeout`."""
        if not self._items:
            return True
        if self._empty is None:
            return False
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except TimeoutError:
            return not self._items
        return True

    # -- workers ----------------------------------------------------------------------------------

    async def _worker(self) -> None:
        assert self._gate_open is not None
        loop = asyncio.get_running_loop()
        while not self._stopping:
            gate = self._gate_until - loop.time()
            if gate > 0:
                # The upstream just failed to connect: pause until the gate opens (or retry_now).
                self._gate_open.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._gate_open.wait(), gate)
                continue
            if self._ready:
                item = self._ready.popleft()
                self._inflight += 1
                try:
                    await self._attempt(item)
                except Exception as exc:  # never let a worker die; the message stays queued
                    logs.event(log, "delivery.worker_error", level=logging.ERROR, queue_id=item.msg.id,
                               error=repr(exc))
                    self._defer(item, f"internal error: {exc!r}", "internal")
                finally:
                    self._inflight -= 1
                continue
            waiter = loop.create_future()
            self._idle_workers.append(waiter)
            await waiter

    def _wake_workers(self, n: int | None) -> None:
        """Wake `n` idle workers (None: all of them)."""
        while self._idle_workers and (n is None or n > 0):
            waiter = self._idle_workers.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if n is not None:
                    n -= 1

    async def _timer(self) -> None:
        """Move deferred messages whose time has come to the ready queue; publish the queue gauges."""
        assert self._wake_timer is not None
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            moved = 0
            while self._deferred and self._deferred[0][0] <= now:
                _, _, item = heapq.heappop(self._deferred)
                self._ready.append(item)
                moved += 1
            if moved:
                self._wake_workers(moved)
            self._publish_all()
            timeout = 1.0
            if self._deferred:
                timeout = min(timeout, max(0.0, self._deferred[0][0] - now))
            self._wake_timer.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_timer.wait(), timeout)

    async def _read(self, msg: spool.QueuedMessage) -> bytes:
        if msg.size <= INLINE_READ_LIMIT:
            return self._spool.read_content(msg)
        return await asyncio.to_thread(self._spool.read_content, msg)

    async def _attempt(self, item: _Item) -> None:
        msg = item.msg
        try:
            content = await self._read(msg)
        except FileNotFoundError:
            # The file is gone (removed by hand?): nothing left to deliver or dead-letter.
            logs.event(log, "delivery.spool_file_missing", level=logging.ERROR, queue_id=msg.id)
            self._forget(item)
            return
        except OSError as exc:
            logs.event(log, "delivery.spool_read_failed", level=logging.ERROR, queue_id=msg.id,
                       error=str(exc))
            self._defer(item, f"spool read failed: {exc}", "spool read")
            return
        except ValueError as exc:  # spool.CorruptRecord: the file cannot be a message we accepted whole
            item.permanent.append(f"corrupt spool record: {exc}")
            self._dead_letter(item, "permanent", f"permanent failure: corrupt spool record: {exc}")
            return
        envelope = msg.envelope
        if item.remaining != tuple(envelope.rcpt_tos):
            envelope = _only(envelope, item.remaining)
        item.attempts += 1
        try:
            dsn_passed = await self._sender.send(envelope, content)
        except RecipientsRejected as exc:
            self._on_recipients_rejected(item, exc.failures, exc.dsn_passed, content)
        except PermanentFailure as exc:
            metrics.attempt("permanent")
            self._upstream_ok()
            item.permanent.extend(f"<{r}>: {exc.code} {exc.text}" for r in item.remaining)
            item.failed.extend(self._recipient(item, r, "failed", dsn.status_of(exc.code, exc.text),
                                               f"{exc.code} {exc.text}") for r in item.remaining)
            item.remaining = ()
            self._finish(item)
        except TemporaryFailure as exc:
            metrics.attempt("temporary")
            if exc.code == 421:
                # "Service not available": the upstream as a whole, not this message; pause like for
                # a refused connection rather than reconnecting for every queued message.
                self._upstream_failed()
            else:
                self._upstream_ok()
            self._defer(item, f"{exc.code} {exc.text}", f"upstream {exc.code}")
        except (ConnectionError, TimeoutError, OSError) as exc:
            metrics.attempt("connection_error")
            self._upstream_failed()
            self._defer(item, f"connection: {exc or type(exc).__name__}", f"connection {_root_cause(exc)}")
        except asyncio.CancelledError:
            # Stopped mid-attempt: the message stays in the spool and is retried after a restart.
            raise
        except Exception as exc:  # a bug or an unexpected library error: retry, never drop
            logs.event(log, "delivery.unexpected_error", level=logging.ERROR, queue_id=msg.id,
                       error=repr(exc))
            metrics.attempt("temporary")
            self._defer(item, f"unexpected error: {exc!r}", "internal")
        else:
            metrics.attempt("success")
            self._upstream_ok()
            if dsn_passed is False:
                self._relayed(item, item.remaining, content)
            item.delivered_to += len(item.remaining)
            item.remaining = ()
            self._finish(item)

    def _on_recipients_rejected(self, item: _Item, failures: Mapping[str, Reply], dsn_passed: bool | None,
                                content: bytes) -> None:
        temporary = tuple(r for r in item.remaining if r in failures and not 500 <= failures[r].code <= 599)
        permanent = [r for r in item.remaining if r in failures and 500 <= failures[r].code <= 599]
        if dsn_passed is False:
            self._relayed(item, [r for r in item.remaining if r not in failures], content)
        item.delivered_to += len(item.remaining) - len(temporary) - len(permanent)
        item.permanent.extend(f"<{r}>: {failures[r].code} {failures[r].text}" for r in permanent)
        item.failed.extend(
            self._recipient(item, r, "failed", dsn.status_of(failures[r].code, failures[r].text),
                            f"{failures[r].code} {failures[r].text}") for r in permanent)
        self._upstream_ok()
        if temporary:
            metrics.attempt("temporary")
            item.remaining = temporary
            first = failures[temporary[0]]
            self._defer(item, f"{len(temporary)} recipient(s) deferred: {first.code} {first.text}",
                        f"recipients {first.code}")
        else:
            metrics.attempt("permanent")
            item.remaining = ()
            self._finish(item)

    def _open_gate(self) -> None:
        self._gate_until = 0.0
        if self._gate_open is not None:
            self._gate_open.set()
        self._wake_workers(None)

    def _upstream_ok(self) -> None:
        self._conn_failures = 0
        if self._gate_until:
            self._open_gate()

    def _upstream_failed(self) -> None:
        self._conn_failures += 1
        pause = backoff.delay(self._gate_schedule, self._conn_failures, self._rand_unit())
        self._gate_until = asyncio.get_running_loop().time() + pause

    def _rand_unit(self) -> float:
        value = self._rand()
        return value if 0 <= value < 1 else 0.0

    def _defer(self, item: _Item, why: str, kind: str) -> None:
        """Retry later (or dead-letter when expired). `kind` is a bounded name of the failure: the key
        of the deferral log's rate limit."""
        now = self._clock()
        decision = expiry.after_temporary_failure(
            self._schedule,
            attempts=max(1, item.attempts),
            received_at=item.msg.received_at,
            now=now,
            queue_lifetime=self._lifetime,
            rand=self._rand_unit(),
        )
        if isinstance(decision, expiry.Expire):
            item.failed.extend(self._recipient(item, r, "failed", "4.4.7",
                                               f"delivery time expired; last error: {why}")
                               for r in item.remaining)
            self._dead_letter(item, "expired", f"expired after {decision.age:.0f}s in the queue "
                              f"({item.attempts} attempts); last error: {why}")
            return
        delay = max(0.0, decision.at - now)
        if self._delay_warning > 0 and not item.warned and now - item.msg.received_at >= self._delay_warning:
            item.warned = True
            waiting = [self._recipient(item, r, "delayed", "4.0.0", why) for r in item.remaining]
            late = self._due(item, waiting)
            if late:
                self._spawn(self._queue_notice(item, late, None))
        suppressed = self._deferral_log.allow(kind, time.monotonic())
        logs.event(log, "delivery.deferred", level=logging.DEBUG if suppressed is None else logging.WARNING,
                   kind=kind, reason=logs.redact(why), queue_id=item.msg.id, attempts=item.attempts,
                   retry_in=round(delay, 3), suppressed=suppressed)
        if self._stopping:
            return
        due = asyncio.get_running_loop().time() + delay
        self._seq += 1
        heapq.heappush(self._deferred, (due, self._seq, item))
        if self._wake_timer is not None:
            self._wake_timer.set()

    def _finish(self, item: _Item) -> None:
        """No recipient left to try: remove as delivered, or dead-letter if any was refused for good."""
        if item.permanent:
            total = len(item.msg.envelope.rcpt_tos)
            self._dead_letter(item, "permanent", "permanent failure: " + "; ".join(item.permanent)
                              + f" (delivered to {item.delivered_to} of {total} recipients)")
            return
        metrics.MESSAGES_DELIVERED.inc()
        metrics.DELIVERY_DURATION.observe(max(0.0, self._clock() - item.msg.received_at))
        logs.event(log, "delivery.delivered", level=logging.DEBUG, queue_id=item.msg.id,
                   attempts=item.attempts)
        # The spool file is unlinked off the event loop, in batches (one thread hop for all messages
        # delivered meanwhile): unlink takes the queue directory's lock, which the spool's group commit
        # holds for its renames, so inline it could stall every SMTP session of this worker.
        self._removals.append(item)
        if self._remover is None:
            self._remover = asyncio.create_task(self._remove_loop(), name="delivery-remover")

    async def _remove_loop(self) -> None:
        try:
            while self._removals:
                batch, self._removals = self._removals, []
                await asyncio.to_thread(self._remove_batch, [item.msg for item in batch])
                for item in batch:
                    self._forget(item)
        finally:
            self._remover = None

    def _remove_batch(self, msgs: list[spool.QueuedMessage]) -> None:
        for msg, exc in self._spool.remove_many(msgs):
            # Delivered, but it stayed in the spool: it may be delivered again after a restart (never lost).
            logs.event(log, "delivery.spool_remove_failed", level=logging.ERROR, queue_id=msg.id,
                       error=str(exc))

    # -- notifications to the sender (dsn.py builds them) -------------------------------------------

    def _recipient(self, item: _Item, address: str, action: dsn.Action, status: str,
                   diagnostic: str) -> dsn.Recipient:
        envelope = item.msg.envelope
        index = envelope.rcpt_tos.index(address) if address in envelope.rcpt_tos else len(envelope.rcpt_tos)
        return dsn.Recipient(address, action, status, diagnostic, envelope.options_of(index))

    def _due(self, item: _Item, recipients: list[dsn.Recipient]) -> list[dsn.Recipient]:
        """The recipients the sender asked (or by default wants) to hear about."""
        if not self._notify or not dsn.needs_notice(item.msg.envelope.mail_from):
            return []
        return [r for r in recipients
                if dsn.wanted(r.action, r.options, delays_by_default=self._delay_warning > 0)]

    def _relayed(self, item: _Item, delivered: Sequence[str], content: bytes) -> None:
        """NOTIFY=SUCCESS through an upstream without DSN: RFC 3461 section 6.2.3 has the relay report
        "relayed" itself."""
        due = self._due(item, [self._recipient(item, r, "relayed", "2.0.0", "250 passed on to an upstream "
                                               "that does not report delivery") for r in delivered])
        if due:
            self._spawn(self._queue_notice(item, due, content))

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._notifying.add(task)
        task.add_done_callback(self._notifying.discard)

    async def _queue_notice(self, item: _Item, recipients: list[dsn.Recipient],
                            content: bytes | None) -> None:
        """Build the notification and spool it (it is then delivered like any message: from <>, so its
        own failure is dead-lettered without another notification). A failure is logged; the message's
        dead-letter copy stays either way."""
        msg = item.msg
        try:
            if content is None:
                content = await self._read(msg)
            now = self._clock()
            notice = dsn.build(reporting_mta=self._hostname, envelope_sender=msg.envelope.mail_from,
                               mail_options=msg.envelope.mail_options, arrival=msg.received_at,
                               recipients=recipients, original=content, now=now,
                               message_id=f"{msg.id}.{recipients[0].action}")
            options = (("SMTPUTF8",) if notice.smtputf8 else ()) + (("BODY=8BITMIME",) if notice.eight_bit
                                                                    else ())
            queued = await self._spool.store(
                spool.Envelope("", (notice.envelope_sender,), options), notice.content, now)
        except (OSError, ValueError, spool.SpoolError) as exc:  # the spool full, say: the copy stays
            logs.event(log, "delivery.notification_failed", level=logging.ERROR, queue_id=msg.id,
                       error=str(exc))
            return
        metrics.notification(recipients[0].action)
        logs.event(log, "delivery.notification_queued", queue_id=msg.id, notification_id=queued.id,
                   kind=recipients[0].action, recipients=len(recipients))
        self.submit(queued)

    async def _notice_then_dead_letter(self, item: _Item, recipients: list[dsn.Recipient],
                                       reason: Literal["permanent", "expired"], text: str) -> None:
        try:
            await self._queue_notice(item, recipients, None)
        finally:  # whatever became of the notification, the message itself is dead-lettered
            self._dead_letter_now(item, reason, text)

    def _dead_letter(self, item: _Item, reason: Literal["permanent", "expired"], text: str) -> None:
        """Dead-letter the message; first, when its sender wants to hear of it, spool a notification."""
        due = self._due(item, item.failed)
        item.failed = []
        if due:
            self._spawn(self._notice_then_dead_letter(item, due, reason, text))
        else:
            self._dead_letter_now(item, reason, text)

    def _dead_letter_now(self, item: _Item, reason: Literal["permanent", "expired"], text: str) -> None:
        try:
            self._spool.dead_letter(item.msg, text)
        except OSError as exc:
            logs.event(log, "delivery.dead_letter_failed", level=logging.ERROR, queue_id=item.msg.id,
                       error=str(exc))
            # Keep it queued; it is tried again (and dead-lettered again) later.
            item.remaining = item.remaining or tuple(item.msg.envelope.rcpt_tos)
            if not self._stopping:
                self._seq += 1
                due = asyncio.get_running_loop().time() + self._schedule.cap
                heapq.heappush(self._deferred, (due, self._seq, item))
            return
        metrics.dead_lettered(reason)
        logs.event(log, "delivery.dead_lettered", level=logging.WARNING, queue_id=item.msg.id,
                   reason=reason, detail=logs.redact(text, 500), attempts=item.attempts)
        self._forget(item)

    def _forget(self, item: _Item) -> None:
        if self._items.pop(item.msg.id, None) is not None:
            self._bytes -= item.msg.size
        if not self._items and self._empty is not None:
            self._empty.set()
        self._publish()

    def _publish(self) -> None:
        """Queue size gauges, on every change (cheap: no scan)."""
        metrics.QUEUE_MESSAGES.set(len(self._items))
        metrics.QUEUE_BYTES.set(self._bytes)

    def _publish_all(self) -> None:
        """Every queue gauge, including the oldest age (on the timer: it grows without any event)."""
        stats = self.stats()
        metrics.set_queue(stats.messages, stats.bytes, stats.oldest_age_seconds)
