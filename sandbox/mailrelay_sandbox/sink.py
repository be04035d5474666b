"""An upstream SMTP sink for tests, the demo and the benchmark: a real aiosmtpd server that counts and
stores what arrives and can be told to fail.

What it is for: standing in for the relay's smarthost. It runs in its own thread with its own event
loop, so synchronous tests (smtplib) and asynchronous ones (the relay's own loop) can both use it, and
it can be stopped (every open session is cut, like a crashed upstream) and started again on the same
port. It also runs as a separate process for the demo: `python -m mailrelay_sandbox.sink --listen
127.0.0.1:2526` prints one JSON line of counts per interval and a final one on SIGTERM/SIGINT.

What it must not do: relay anything anywhere, or be imported by relay/ or operator/ code.

API (all methods are thread-safe and synchronous unless marked async):

    sink = Sink()                        # host="127.0.0.1", port=0 (a free port, kept across restarts)
    sink.start(); sink.port              # listening; `sink.address` is "127.0.0.1:PORT"
    sink.count                           # messages accepted with 250 at the end of DATA
    sink.messages                        # list of Received(mail_from, rcpt_tos, mail_options, content,
                                         #   received_at, session); the null sender <> is mail_from ""
    sink.received_bytes, sink.open_sessions, sink.reset()   # content bytes, live sessions, forget counts
    sink.messages_from(k)                # those after the first k (for polling long runs)
    sink.connections                     # sessions opened so far (shows connection reuse)
    sink.wait_for(n, timeout=30)         # block until count >= n (True) or timeout (False)
    await sink.wait_for_async(n, timeout=30)
    sink.fail("rcpt", 451)               # answer 451 at every RCPT from now on
    sink.fail("data", 550, times=1)      # answer 550 to the next end-of-data only
    sink.fail("rcpt", 550, recipients={"bad@example.org"})   # only those recipients
    sink.fail("connect", 421)            # 421 greeting, then close (also "ehlo", "mail", "noop")
    sink.clear_failures()
    sink.stop(); sink.start()            # upstream down, then back on the same port
    with Sink() as sink: ...             # start/stop; or module-level `with running(**kwargs) as sink:`

Commands that can fail: connect (the greeting), ehlo, mail, rcpt, data (the reply after the content),
noop, rset. A 421 reply is followed by closing the connection, as RFC 5321 requires. `Sink(tls=
"starttls"|"tls", certfile=..., keyfile=...)` serves STARTTLS or implicit TLS, `Sink(auth=("user",
"secret"))` requires AUTH PLAIN/LOGIN before MAIL, `Sink(keep_content=False)` only counts (benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import signal
import ssl
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

from aiosmtpd import smtp as aiosmtpd_smtp

COMMANDS = ("connect", "ehlo", "mail", "rcpt", "data", "noop", "rset")


@dataclasses.dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    mail_options: tuple[str, ...]
    content: bytes
    received_at: float
    session: int


@dataclasses.dataclass
class _Failure:
    command: str
    code: int
    text: str
    times: int | None
    recipients: frozenset[str] | None


_DEFAULT_TEXT = {
    421: "4.3.2 Service not available, closing transmission channel",
    450: "4.2.0 Mailbox unavailable",
    451: "4.3.0 Local error in processing",
    452: "4.3.1 Insufficient system storage",
    550: "5.1.1 Mailbox unavailable",
    552: "5.3.4 Message too big",
    554: "5.7.1 Transaction failed",
}


class _Protocol(aiosmtpd_smtp.SMTP):
    """aiosmtpd's server with a greeting hook (aiosmtpd has none) and session tracking."""

    def __init__(self, sink: Sink, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sink = sink
        self.sink_session = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.sink_session = self._sink._opened(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._sink._closed(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        failure = self._sink._take_failure("connect", None)
        if failure is not None:
            await self.push(f"{failure.code} {failure.text}")
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def _check(self, server: _Protocol, command: str, address: str | None = None) -> str | None:
        failure = self._sink._take_failure(command, address)
        if failure is None:
            return None
        if failure.code == 421:
            # Close after the reply is written (call_soon runs after aiosmtpd's push of this status).
            transport = server.transport
            if transport is not None:
                asyncio.get_running_loop().call_soon(transport.close)
        return f"{failure.code} {failure.text}"

    async def handle_EHLO(
        self, server: _Protocol, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        status = self._check(server, "ehlo")
        if status is not None:
            return [status]
        session.host_name = hostname
        return responses

    async def handle_NOOP(self, server: _Protocol, session: Any, envelope: Any, arg: str) -> str:
        return self._check(server, "noop") or "250 2.0.0 OK"

    async def handle_RSET(self, server: _Protocol, session: Any, envelope: Any) -> str:
        return self._check(server, "rset") or "250 2.0.0 OK"

    async def handle_MAIL(
        self, server: _Protocol, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        status = self._check(server, "mail", address)
        if status is not None:
            return status
        envelope.mail_from = address  # "<>" for the null sender (aiosmtpd needs it non-empty)
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: _Protocol, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        status = self._check(server, "rcpt", address)
        if status is not None:
            return status
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: _Protocol, session: Any, envelope: Any) -> str:
        status = self._check(server, "data")
        if status is not None:
            return status
        content = envelope.original_content or b""
        self._sink._store(
            "" if envelope.mail_from in (None, "<>") else envelope.mail_from,  # null sender: ""
            tuple(envelope.rcpt_tos),
            tuple(envelope.mail_options),
            content,
            server.sink_session,
        )
        return "250 2.0.0 OK: queued"


class Sink:
    """A real SMTP server in a background thread that counts, stores and fails on request."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: str = "none",
        certfile: str | None = None,
        keyfile: str | None = None,
        auth: tuple[str, str] | None = None,
        keep_content: bool = True,
        data_size_limit: int = 64 * 1024 * 1024,
    ) -> None:
        if tls not in ("none", "starttls", "tls"):
            raise ValueError("tls must be none, starttls or tls")
        if tls != "none" and not certfile:
            raise ValueError("tls needs certfile (and keyfile)")
        self.host = host
        self.port = port
        self._tls = tls
        self._certfile = certfile
        self._keyfile = keyfile
        self._auth = auth
        self._keep = keep_content
        self._size_limit = data_size_limit
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._messages: list[Received] = []
        self._count = 0
        self._bytes = 0
        self._connections = 0
        self._open: set[_Protocol] = set()
        self._failures: list[_Failure] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> Sink:
        """Listen (again) on host:port; the first start with port 0 picks a free port and keeps it."""
        if self._thread is not None:
            raise RuntimeError("sink already running")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(self._listen(loop))
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                self._shutdown(loop)

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"sink-{self.port}", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            self._thread.join(5)
            self._thread = None
            self._loop = None
            raise errors[0]
        return self

    async def _listen(self, loop: asyncio.AbstractEventLoop) -> asyncio.AbstractServer:
        context: ssl.SSLContext | None = None
        if self._tls != "none":
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self._certfile or "", self._keyfile)
        handler = _Handler(self)
        kwargs: dict[str, Any] = {
            "hostname": "sink.test",
            "data_size_limit": self._size_limit,
            "enable_SMTPUTF8": True,
            "decode_data": False,
            "ident": "mailrelay sink",
        }
        if self._tls == "starttls":
            kwargs["tls_context"] = context
        if self._auth is not None:
            user, password = self._auth

            def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
                ok = (
                    getattr(data, "login", None) == user.encode()
                    and getattr(data, "password", None) == password.encode()
                )
                return aiosmtpd_smtp.AuthResult(success=ok, handled=False)  # handled=False: send 535

            # With implicit TLS aiosmtpd cannot tell the session is encrypted: require TLS for AUTH
            # only where it knows (STARTTLS).
            kwargs.update(authenticator=authenticator, auth_required=True,
                          auth_require_tls=self._tls == "starttls")

        def factory() -> _Protocol:
            with warnings.catch_warnings():
                # "Requiring AUTH while not requiring TLS": deliberate for a loopback test sink.
                warnings.simplefilter("ignore", UserWarning)
                return _Protocol(self, handler, loop=loop, **kwargs)

        server = await loop.create_server(
            factory, self.host, self.port, ssl=context if self._tls == "tls" else None, reuse_address=True
        )
        self.port = server.sockets[0].getsockname()[1]
        return server

    def _shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._server is not None:
            self._server.close()
        for proto in list(self._open):
            transport = proto.transport
            if isinstance(transport, asyncio.WriteTransport):
                transport.abort()
            elif transport is not None:
                transport.close()
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.sleep(0))
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    def stop(self) -> None:
        """Stop listening and cut every open session (an upstream crash). start() brings it back."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        with self._lock:
            self._open.clear()
        self._thread = None
        self._loop = None
        self._server = None

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- what arrived -----------------------------------------------------------------------------

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    @property
    def received_bytes(self) -> int:
        with self._lock:
            return self._bytes

    @property
    def messages(self) -> list[Received]:
        with self._lock:
            return list(self._messages)

    def messages_from(self, start: int) -> list[Received]:
        """The messages received after the first `start` ones (cheap polling for long runs)."""
        with self._lock:
            return self._messages[start:]

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    @property
    def open_sessions(self) -> int:
        with self._lock:
            return len(self._open)

    def reset(self) -> None:
        """Forget what arrived (counts, messages, connections); failures stay."""
        with self._lock:
            self._messages.clear()
            self._count = self._bytes = self._connections = 0

    def wait_for(self, n: int, timeout: float = 30.0) -> bool:
        """Block until at least `n` messages arrived (True), or `timeout` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._count < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    async def wait_for_async(self, n: int, timeout: float = 30.0) -> bool:  # noqa: ASYNC109
        """Like wait_for, without blocking the caller's event loop."""
        deadline = time.monotonic() + timeout
        while self.count < n:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    # -- failures ---------------------------------------------------------------------------------

    def fail(
        self,
        command: str,
        code: int,
        text: str | None = None,
        *,
        times: int | None = None,
        recipients: set[str] | frozenset[str] | None = None,
    ) -> None:
        """Answer `code` at `command` (see COMMANDS), `times` times or until clear_failures()."""
        command = command.lower()
        if command not in COMMANDS:
            raise ValueError(f"command must be one of {COMMANDS}")
        if not 400 <= code <= 599:
            raise ValueError("code must be a 4xx or 5xx reply")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1")
        failure = _Failure(
            command=command,
            code=code,
            text=text or _DEFAULT_TEXT.get(code, f"{code // 100}.0.0 Failure injected by the sink"),
            times=times,
            recipients=frozenset(r.lower() for r in recipients) if recipients is not None else None,
        )
        with self._lock:
            self._failures.append(failure)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    # -- called from the server thread ------------------------------------------------------------

    def _take_failure(self, command: str, address: str | None) -> _Failure | None:
        with self._lock:
            for failure in self._failures:
                if failure.command != command:
                    continue
                if failure.recipients is not None and (address or "").lower() not in failure.recipients:
                    continue
                if failure.times is not None:
                    failure.times -= 1
                    if failure.times <= 0:
                        self._failures.remove(failure)
                return failure
            return None

    def _opened(self, proto: _Protocol) -> int:
        with self._lock:
            self._connections += 1
            self._open.add(proto)
            return self._connections

    def _closed(self, proto: _Protocol) -> None:
        with self._lock:
            self._open.discard(proto)

    def _store(
        self, mail_from: str, rcpt_tos: tuple[str, ...], options: tuple[str, ...], content: bytes,
        session: int,
    ) -> None:
        with self._changed:
            self._count += 1
            self._bytes += len(content)
            if self._keep:
                self._messages.append(
                    Received(mail_from, rcpt_tos, options, content, time.time(), session)
                )
            self._changed.notify_all()


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _parse_fail(value: str) -> tuple[str, int]:
    command, sep, code = value.partition(":")
    if not sep or command.lower() not in COMMANDS or not code.isdigit():
        raise argparse.ArgumentTypeError(f"expected COMMAND:CODE (e.g. rcpt:451), got {value!r}")
    return command.lower(), int(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mailrelay_sandbox.sink",
        description="An SMTP sink that counts what arrives and prints JSON lines of counts.",
    )
    parser.add_argument("--listen", type=_parse_listen, default=("127.0.0.1", 2526), help="HOST:PORT")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between count lines")
    parser.add_argument("--fail", type=_parse_fail, action="append", default=[],
                        help="COMMAND:CODE, e.g. rcpt:451 (repeatable)")
    parser.add_argument("--keep-content", action="store_true", help="keep messages in memory")
    args = parser.parse_args(argv)
    host, port = args.listen
    sink = Sink(host, port, keep_content=args.keep_content)
    for command, code in args.fail:
        sink.fail(command, code)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        sink.start()
    except OSError as exc:
        print(f"sink: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"event": "listening", "address": sink.address}), flush=True)
    last = 0
    start = time.monotonic()
    while not stop.wait(args.interval):
        count = sink.count
        rate = round((count - last) / args.interval, 1)
        print(json.dumps({"event": "counts", "received": count, "rate": rate,
                          "connections": sink.connections, "elapsed": round(time.monotonic() - start, 1)}),
              flush=True)
        last = count
    sink.stop()
    print(json.dumps({"event": "final", "received": sink.count, "bytes": sink.received_bytes,
                      "connections": sink.connections}), flush=True)
    return 0


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[Sink]:
    """`with sink.running() as s:` starts a Sink(**kwargs) and stops it afterwards."""
    s = Sink(**kwargs)
    s.start()
    try:
        yield s
    finally:
        s.stop()


if __name__ == "__main__":
    sys.exit(main())
