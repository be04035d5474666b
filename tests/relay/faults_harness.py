"""Shared harness for the fault, fuzz and security tests (no tests of its own).

What it is for: real peers on real sockets, for tests that break the relay on purpose.
- `RecordingSink`: an upstream SMTP server (raw asyncio, in a background thread) that records every
  command line it receives byte for byte, and can be told to answer 4xx/5xx/421 at a chosen command, to
  answer slowly, to refuse or to advertise STARTTLS it cannot do. It records raw lines, not parsed
  envelopes, so a test can prove that nothing a client wrote inside an address became a command.
- `RawClient`: a blocking SMTP client on a plain socket (optionally bound to a chosen 127.x source
  address) that sends exact bytes and reads replies line by line.
- `check_reply`: the well-formedness rules every SMTP reply must follow.
- `RelayProcess`: a real `mailrelay-relay` process with its own spool, on chosen loopback addresses.
- `spool_problems`: what is wrong with a spool folder (a file that does not parse, a half-written entry).

What it must not do: fake the relay or decide what it should answer; the tests assert that.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

from mailrelay_sandbox import netutil, waiting

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
RELAY_BIN = pathlib.Path(sys.executable).with_name("mailrelay-relay")

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


# --------------------------------------------------------------------------------------------------
# raw client


class RawClient:
    """A blocking SMTP client that sends exact bytes and reads replies line by line."""

    def __init__(self, host: str, port: int, *, source: str | None = None, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.buf = b""
        self.closed = False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
                if self.buf:
                    rest, self.buf = self.buf, b""
                    return rest
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> list[bytes] | None:
        """One reply (all its lines, without CRLF), or None when the server closed first."""
        lines: list[bytes] = []
        while True:
            line = self._line()
            if line is None:
                if lines:
                    raise MalformedReply(f"connection closed inside a multi-line reply: {lines!r}")
                return None
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return lines

    def code(self) -> int | None:
        r = self.reply()
        return None if r is None else check_reply(r, enhanced=False)

    def cmd(self, line: bytes | str) -> list[bytes] | None:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.reply()

    def wait_closed(self, timeout: float) -> bool:
        """True when the server closes the connection within `timeout` (reading and discarding)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True


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


class RelayProcess:
    """A real `mailrelay-relay` process. Start it with `start()`, stop it with `stop()` or `kill()`."""

    def __init__(
        self,
        tmp: pathlib.Path,
        upstream: str,
        *,
        host: str = "127.0.0.1",
        spool: pathlib.Path | None = None,
        token: str | None = "s3cret-token",
        extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
        smtp_host: str | None = None,
    ) -> None:
        self.tmp = tmp
        self.host = host  # admin API (and SMTP unless smtp_host is given)
        self.smtp_host = smtp_host or host
        self.port = netutil.free_port(self.smtp_host)
        self.admin_port = netutil.free_port(host)
        self.spool = spool or (tmp / "spool")
        self.token = token
        self.upstream = upstream
        self.extra = list(extra)
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = tmp / f"relay-{self.port}.log"
        self.starts = 0

    def argv(self) -> list[str]:
        listen_host = f"[{self.smtp_host}]" if ":" in self.smtp_host else self.smtp_host
        args = [
            str(RELAY_BIN),
            "--listen", f"{listen_host}:{self.port}",
            "--admin-listen", f"{self.host}:{self.admin_port}",
            "--upstream", self.upstream,
            "--spool", str(self.spool),
            "--hostname", "relay.test",
        ]
        if self.token is not None:
            token_file = self.tmp / "admin-token"
            token_file.write_text(self.token + "\n")
            args += ["--admin-token-file", str(token_file)]
        return args + self.extra

    def start(self, wait: bool = True) -> RelayProcess:
        self.spool.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILRELAY_")}
        env.update(self.env)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log, env=env, start_new_session=True)
        log.close()
        self.starts += 1
        if wait:
            waiting.wait_until(lambda: self.healthy() or not self.alive(), within=60, every=0.1,
                               what="the relay healthy")
            if not self.alive():
                raise RuntimeError(f"relay did not start; log:\n{self.log()[-3000:]}")
            waiting.wait_until(self.smtp_ready, within=30, what="the relay's SMTP port")
        return self

    def smtp_ready(self) -> bool:
        try:
            with socket.create_connection((self.smtp_host, self.port), timeout=2):
                return True
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def http(
        self, method: str, path: str, *, token: str | None = None, timeout: float = 10
    ) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://{self.host}:{self.admin_port}{path}", method=method)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        if method == "POST":
            req.data = b""
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read()

    def healthy(self) -> bool:
        try:
            return self.http("GET", "/healthz", timeout=2)[0] == 200
        except OSError:
            return False

    def status(self) -> dict[str, Any]:
        code, body = self.http("GET", "/status", token=self.token)
        assert code == 200, (code, body)
        result: dict[str, Any] = json.loads(body)
        return result

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group (workers included) and reap it."""
        if self.proc is None:
            return
        self.signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM and wait; SIGKILL after `timeout`. Returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def rss_bytes(self) -> int:
        """Resident memory of the relay and its children (the workers), in bytes."""
        assert self.proc is not None
        total = 0
        for pid in _process_tree(self.proc.pid):
            with contextlib.suppress(OSError):
                for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total


def _process_tree(root: int) -> list[int]:
    pids = [root]
    children: dict[int, list[int]] = {}
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            ppid = int(d.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d.name))
    i = 0
    while i < len(pids):
        pids.extend(children.get(pids[i], []))
        i += 1
    return pids


@contextlib.contextmanager
def relay(tmp: pathlib.Path, upstream: str, **kw: Any) -> Iterator[RelayProcess]:
    r = RelayProcess(tmp, upstream, **kw)
    try:
        yield r.start()
    finally:
        r.kill()


# --------------------------------------------------------------------------------------------------
# SMTP helpers


def send_one(host: str, port: int, marker: str, *, source: str | None = None, rcpt: str = "to@example.net",
             mail_from: str = "from@example.org", body: bytes | None = None) -> list[bytes] | None:
    """Send one message over a raw client; returns the reply to the end of DATA (None if closed)."""
    content = body if body is not None else (
        f"Subject: {marker}\r\nMessage-ID: <{marker}@test>\r\n\r\nbody {marker}\r\n".encode()
    )
    with RawClient(host, port, source=source) as c:
        greeting = c.reply()
        if first_code(greeting) != 220:
            return greeting
        c.cmd("EHLO client.test")
        r = c.cmd(f"MAIL FROM:<{mail_from}>")
        if first_code(r) != 250:
            return r
        r = c.cmd(f"RCPT TO:<{rcpt}>")
        if first_code(r) != 250:
            return r
        r = c.cmd("DATA")
        if first_code(r) != 354:
            return r
        c.send(content + b".\r\n")
        final = c.reply()
        with contextlib.suppress(OSError):
            c.cmd("QUIT")
        return final


# --------------------------------------------------------------------------------------------------
# spool


def spool_problems(root: pathlib.Path) -> list[str]:
    """Everything wrong with a spool folder: queue entries that do not parse as complete records, stray
    files in queue/, dead-letter entries without a reason. An empty list means the spool is intact."""
    from mailrelay_relay import spool

    problems: list[str] = []
    queue_dir = root / "queue"
    if queue_dir.is_dir():
        for path in sorted(queue_dir.iterdir()):
            if not path.name.endswith(spool.SUFFIX):
                problems.append(f"stray file in queue/: {path.name}")
                continue
            try:
                spool.decode_record(path.read_bytes())
            except (spool.CorruptRecord, OSError) as error:
                problems.append(f"queue/{path.name} does not parse: {error}")
    dead_dir = root / "deadletter"
    if dead_dir.is_dir():
        for path in sorted(dead_dir.glob("*" + spool.SUFFIX)):
            reason = path.with_suffix(spool.REASON_SUFFIX)
            if not reason.exists() or not reason.read_text(errors="replace").strip():
                problems.append(f"deadletter/{path.name} has no reason")
    return problems


def queue_entries(root: pathlib.Path) -> list[tuple[str, Any, bytes]]:
    """(id, envelope, content) of every queue entry (assumes they parse)."""
    from mailrelay_relay import spool

    out = []
    for path in sorted((root / "queue").glob("*" + spool.SUFFIX)):
        msg_id, envelope, content, _ = spool.decode_record(path.read_bytes())
        out.append((msg_id, envelope, content))
    return out


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
