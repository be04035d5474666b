"""Shared harness for the fault, fuzz and security tests (no tests of its own).

What it is for: real peers on real sockets, for tests that break the relay on purpose.
- `RecordingSink`: an upstream SMTP server (raw asyncio, in a background thread) that records every
  command line it receives byte for byte, and can be told to answer 4xx/5xx/421 at a chosen command, to
  answer slowly, to refuse or to advertise STARTTLS it cannot do. It records raw lines, not parsed
  envelopes, so a test can prove that nothing a client wrote inside an address became a command.
- `check_reply`: the well-formedness rules every SMTP reply must follow (of the raw lines
  `smtpwire.Wire.reply_lines` returns).
- `relay_process` / `relay`: a real relay (`relayproc.RelayProcess`) with its own spool and log under the
  test's folder, on chosen loopback addresses; `send_one`: one message through it over `smtpwire.Wire`;
  `start_data`: a session up to DATA's 354.
- `spool_problems`: what is wrong with a spool folder (a file that does not parse, a half-written entry).

What it must not do: fake the relay or decide what it should answer; the tests assert that.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from mailrelay_sandbox import netutil, relayproc, smtpwire, waiting

REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -])(.*)$", re.DOTALL)
ENHANCED = re.compile(rb"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


# --------------------------------------------------------------------------------------------------
# replies


class MalformedReply(AssertionError):
    pass


def check_reply(lines: Sequence[bytes], *, enhanced: bool) -> int:
    """Assert that `lines` (each without CRLF) form one well-formed SMTP reply; return its code.

    Rules (RFC 5321 §4.2, RFC 2034): every line is `ddd-text` except the last, `ddd text` or `ddd`;
    all lines carry the same code; the first digit is 2-5; no line holds a bare CR or LF; with
    ENHANCEDSTATUSCODES advertised, every 2xx/4xx/5xx line after the greeting starts with an enhanced
    code whose class matches the reply's first digit.
    """
    if not lines:
        raise MalformedReply("empty reply")
    code: bytes | None = None
    for i, line in enumerate(lines):
        m = REPLY_LINE.match(line)
        if m is None or b"\r" in line or b"\n" in line:
            raise MalformedReply(f"malformed reply line {line!r} in {list(lines)!r}")
        if code is None:
            code = m.group(1)
        elif m.group(1) != code:
            raise MalformedReply(f"mixed codes in one reply: {list(lines)!r}")
        last = i == len(lines) - 1
        if (m.group(2) == b"-") == last:
            raise MalformedReply(f"bad continuation marker in {list(lines)!r}")
        if enhanced and (m.group(3) or not last):
            text = m.group(3)
            em = ENHANCED.match(text)
            if em is None or em.group(1) != code[:1]:
                raise MalformedReply(f"missing or mismatched enhanced status code in {line!r}")
    assert code is not None
    return int(code)


def text(reply: list[bytes] | None) -> str:
    return "<closed>" if reply is None else " | ".join(x.decode("latin-1") for x in reply)


def first_code(reply: list[bytes] | None) -> int | None:
    return None if not reply else int(reply[0][:3])


# --------------------------------------------------------------------------------------------------
# recording sink


@dataclasses.dataclass
class SinkMessage:
    mail_from: bytes
    rcpt_tos: list[bytes]
    data: bytes
    session: int


@dataclasses.dataclass
class SinkBehaviour:
    """How the sink answers. `fail` maps an upper-case verb (MAIL, RCPT, DATA, DOT, EHLO, CONNECT) to a
    full reply line such as b"451 4.3.0 try later"; DOT is the answer after the message content."""

    fail: dict[str, bytes] = dataclasses.field(default_factory=dict)
    delay: float = 0.0              # seconds before every reply
    advertise_starttls: bool = False  # advertise STARTTLS but answer it 454 (a broken TLS upstream)
    drop: set[str] = dataclasses.field(default_factory=set)  # verbs (or DOT) at which to hang up, no reply
    close_after_message: bool = False  # hang up right after answering 250 to a message (idle close)


class RecordingSink:
    """A raw SMTP upstream on 127.0.0.1 that records every line it receives."""

    def __init__(self, behaviour: SinkBehaviour | None = None, host: str = "127.0.0.1") -> None:
        self.behaviour = behaviour or SinkBehaviour()
        self.host = host
        self.port = 0
        self.lines: list[bytes] = []          # every command line, across sessions (without CRLF)
        self.messages: list[SinkMessage] = []
        self.sessions = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # lifecycle -------------------------------------------------------------------------------------
    def start(self, port: int = 0) -> RecordingSink:
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, args=(port,), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("sink did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> RecordingSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _run(self, port: int) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        server = loop.run_until_complete(
            asyncio.start_server(self._session, self.host, port, reuse_address=True)
        )
        self._server = server
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    # queries ---------------------------------------------------------------------------------------
    def snapshot(self) -> tuple[list[bytes], list[SinkMessage]]:
        with self._lock:
            return list(self.lines), list(self.messages)

    def wait_messages(self, n: int, within: float) -> None:
        waiting.wait_until(lambda: len(self.snapshot()[1]) >= n, within=within,
                           what=f"{n} messages at the recording sink")

    def bodies_containing(self, marker: bytes) -> list[SinkMessage]:
        return [m for m in self.snapshot()[1] if marker in m.data]

    # protocol --------------------------------------------------------------------------------------
    async def _reply(self, writer: asyncio.StreamWriter, line: bytes) -> None:
        if self.behaviour.delay:
            await asyncio.sleep(self.behaviour.delay)
        writer.write(line + b"\r\n")
        await writer.drain()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.sessions += 1
            session = self.sessions
        fail = self.behaviour.fail
        try:
            if "CONNECT" in fail:
                await self._reply(writer, fail["CONNECT"])
                return
            await self._reply(writer, b"220 sink.test ESMTP recording sink")
            mail_from = b""
            rcpts: list[bytes] = []
            while True:
                raw = await reader.readline()
                if not raw:
                    return
                line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
                with self._lock:
                    self.lines.append(line)
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper().decode("latin-1")
                if verb in self.behaviour.drop:
                    return
                if verb in fail and verb not in ("DOT",):
                    await self._reply(writer, fail[verb])
                    if fail[verb].startswith(b"421"):
                        return
                    continue
                if verb in ("EHLO", "HELO"):
                    ext = [b"250-sink.test", b"250-PIPELINING", b"250-8BITMIME", b"250-SIZE 104857600"]
                    if self.behaviour.advertise_starttls:
                        ext.append(b"250-STARTTLS")
                    ext.append(b"250 ENHANCEDSTATUSCODES")
                    if verb == "HELO":
                        ext = [b"250 sink.test"]
                    if self.behaviour.delay:
                        await asyncio.sleep(self.behaviour.delay)
                    writer.write(b"".join(e + b"\r\n" for e in ext))
                    await writer.drain()
                elif verb == "STARTTLS":
                    await self._reply(writer, b"454 4.7.0 TLS not available")
                elif verb == "MAIL":
                    mail_from, rcpts = line[5:], []
                    await self._reply(writer, b"250 2.1.0 Ok")
                elif verb == "RCPT":
                    rcpts.append(line[5:])
                    await self._reply(writer, b"250 2.1.5 Ok")
                elif verb == "DATA":
                    await self._reply(writer, b"354 go ahead")
                    chunks: list[bytes] = []
                    while True:
                        d = await reader.readline()
                        if not d:
                            return
                        if d == b".\r\n":
                            break
                        chunks.append(d[1:] if d.startswith(b".") else d)
                    if "DOT" in self.behaviour.drop:
                        return
                    if "DOT" in fail:
                        await self._reply(writer, fail["DOT"])
                        if fail["DOT"].startswith(b"421"):
                            return
                    else:
                        with self._lock:
                            self.messages.append(SinkMessage(mail_from, rcpts, b"".join(chunks), session))
                        await self._reply(writer, b"250 2.0.0 Ok: stored")
                        if self.behaviour.close_after_message:
                            return
                    mail_from, rcpts = b"", []
                elif verb in ("RSET", "NOOP"):
                    mail_from, rcpts = b"", []
                    await self._reply(writer, b"250 2.0.0 Ok")
                elif verb == "QUIT":
                    await self._reply(writer, b"221 2.0.0 Bye")
                    return
                else:
                    await self._reply(writer, b"500 5.5.2 unknown command")
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()


# --------------------------------------------------------------------------------------------------
# relay process

TOKEN = "s3cret-token"


def relay_process(tmp: pathlib.Path, upstream: str, *, host: str = "127.0.0.1", smtp_host: str | None = None,
                  spool: pathlib.Path | None = None, token: str | None = TOKEN, extra: Sequence[str] = (),
                  env: dict[str, str] | None = None) -> relayproc.RelayProcess:
    """A real relay (not started) with its own spool under `tmp` and its log in `tmp` (never on the
    spool's filesystem, which a test may fill); `host` serves admin (and SMTP unless `smtp_host`)."""
    smtp_port = netutil.free_port(smtp_host or host)
    return relayproc.RelayProcess(
        upstream=upstream, spool=spool or tmp / "spool", host=host, smtp_host=smtp_host, smtp_port=smtp_port,
        token=token, extra_args=extra, env=env, log_path=tmp / f"relay-{smtp_port}.log",
        startup_timeout=60.0, stop_timeout=30.0,
    )


@contextlib.contextmanager
def relay(tmp: pathlib.Path, upstream: str, **kw: Any) -> Iterator[relayproc.RelayProcess]:
    """A started `relay_process`, SIGKILLed (not drained) on exit."""
    r = relay_process(tmp, upstream, **kw)
    try:
        yield r.start()
    finally:
        r.kill()
        r.close()


# --------------------------------------------------------------------------------------------------
# SMTP helpers


def send_one(address: tuple[str, int], marker: str, *, source: str | None = None,
             rcpt: str = "to@example.net", mail_from: str = "from@example.org",
             body: bytes | None = None) -> list[bytes] | None:
    """Send one message over a raw client; returns the reply to the end of DATA (None if closed)."""
    content = body if body is not None else (
        f"Subject: {marker}\r\nMessage-ID: <{marker}@test>\r\n\r\nbody {marker}\r\n".encode()
    )
    with smtpwire.Wire(address, source=source, greet=False) as c:
        greeting = c.reply_lines()
        if first_code(greeting) != 220:
            return greeting
        c.cmd_lines("EHLO client.test")
        r = c.cmd_lines(f"MAIL FROM:<{mail_from}>")
        if first_code(r) != 250:
            return r
        r = c.cmd_lines(f"RCPT TO:<{rcpt}>")
        if first_code(r) != 250:
            return r
        r = c.cmd_lines("DATA")
        if first_code(r) != 354:
            return r
        c.send(content + b".\r\n")
        final = c.reply_lines()
        with contextlib.suppress(OSError):
            c.cmd_lines("QUIT")
        return final


def start_data(c: smtpwire.Wire, *, helo: str = "client.test", mail: str = "MAIL FROM:<a@example.org>",
               rcpt: str = "b@example.net") -> None:
    """Read the greeting and open a transaction up to DATA's 354, asserting every step."""
    c.reply_lines()
    c.cmd_lines(f"EHLO {helo}")
    assert first_code(c.cmd_lines(mail)) == 250
    assert first_code(c.cmd_lines(f"RCPT TO:<{rcpt}>")) == 250
    assert first_code(c.cmd_lines("DATA")) == 354


# --------------------------------------------------------------------------------------------------
# spool


def spool_problems(root: pathlib.Path) -> list[str]:
    """Everything wrong with a spool folder: queue files that do not parse as complete records, stray
    files in queue/ (a .done file without its queue file is one), dead-letter entries without a reason.
    An empty list means the spool is intact."""
    from mailrelay_relay import spool

    problems: list[str] = []
    queue_dir = root / "queue"
    if queue_dir.is_dir():
        for path in sorted(queue_dir.iterdir()):
            if path.name.endswith(spool.DONE_SUFFIX) and path.with_suffix(spool.SUFFIX).exists():
                continue
            if not path.name.endswith(spool.SUFFIX):
                problems.append(f"stray file in queue/: {path.name}")
                continue
            try:
                error = spool.decode_records(path.read_bytes())[1]
            except OSError as unreadable:
                error = unreadable
            if error is not None:
                problems.append(f"queue/{path.name} does not parse: {error}")
    dead_dir = root / "deadletter"
    if dead_dir.is_dir():
        for path in sorted(dead_dir.glob("*" + spool.SUFFIX)):
            reason = path.with_suffix(spool.REASON_SUFFIX)
            if not reason.exists() or not reason.read_text(errors="replace").strip():
                problems.append(f"deadletter/{path.name} has no reason")
    return problems


def queue_entries(root: pathlib.Path) -> list[tuple[str, Any, bytes]]:
    """(id, envelope, content) of every message still queued, oldest first."""
    from mailrelay_relay import spool

    return [(r.id, r.envelope, r.content) for r in spool.read_queue(root)]


def dead_letters(root: pathlib.Path) -> list[tuple[str, str, bytes]]:
    """(id, reason, content) of every dead-letter entry."""
    from mailrelay_relay import spool

    out = []
    for path in sorted((root / "deadletter").glob("*" + spool.SUFFIX)):
        reason_path = path.with_suffix(spool.REASON_SUFFIX)
        reason = reason_path.read_text(errors="replace").strip() if reason_path.exists() else ""
        try:
            _, _, content, _ = spool.decode_record(path.read_bytes())
        except spool.CorruptRecord:
            content = path.read_bytes()
        out.append((path.name[: -len(spool.SUFFIX)], reason, content))
    return out
