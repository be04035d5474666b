"""A recording TCP proxy between an SMTP client and a server, for the client-MTA tests (no tests here).

`Tap(upstream)` listens on a free 127.0.0.1 port and passes every byte through unchanged, keeping per
connection the client's commands (not the message content) and the server's replies, each reply paired
with the command it answers (FIFO, so pipelined commands pair too): "CONNECT" for the greeting, "."
for the end of DATA, "-" for a reply nobody asked for (the relay's unprompted 421 to an idle session).

`on_reply(session, reply)` runs in the proxy's thread before a reply is passed on, so a test can act at
an exact point of a real client's session (drain the relay when its K-th message is accepted) with no
race: the client has not seen the reply yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Reply:
    verb: str  # the command answered: CONNECT, EHLO, HELO, MAIL, RCPT, DATA, ".", RSET, QUIT, NOOP, "-"
    code: int
    text: str  # the last line, as on the wire ("421 4.3.2 relay.test Service shutting down, ...")


@dataclasses.dataclass
class Session:
    index: int
    opened: float = dataclasses.field(default_factory=time.monotonic)
    events: list[Reply | str] = dataclasses.field(default_factory=list)  # str: a client command line
    closed: bool = False
    accepted: int = 0  # 250 replies at the end of DATA

    def replies(self) -> list[Reply]:
        return [e for e in self.events if isinstance(e, Reply)]

    def commands(self) -> list[str]:
        return [e for e in self.events if isinstance(e, str)]

    def transcript(self) -> str:
        return " ".join(f"<{e.verb}:{e.code}>" if isinstance(e, Reply) else e.split(" ")[0]
                        for e in self.events)


class _Conn:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.pending: list[str] = ["CONNECT"]
        self.content = False


class Tap:
    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.host = host
        self.port = 0
        self.on_reply: Callable[[Session, Reply], None] | None = None
        self._sessions: list[Session] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def reset(self, upstream: tuple[str, int] | None = None) -> None:
        """Cut every open connection (a client sees it dropped), forget what was seen, drop the hook, and
        send new connections to `upstream` (when given)."""
        self.on_reply = None
        if upstream is not None:
            self.upstream = upstream
        loop = self._loop
        if loop is not None:
            async def cut() -> None:
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)

            asyncio.run_coroutine_threadsafe(cut(), loop).result(30)
        with self._lock:
            self._sessions.clear()

    def start(self) -> Tap:
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            self._server = loop.run_until_complete(asyncio.start_server(self._handle, self.host, 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="smtp-tap", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the tap did not start")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> Tap:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what was seen --------------------------------------------------------------------------

    @property
    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions)

    def open_sessions(self) -> int:
        return sum(1 for s in self.sessions if not s.closed)

    def replies(self) -> list[tuple[Session, Reply]]:
        return [(s, r) for s in self.sessions for r in s.replies()]

    def count(self, verb: str, code: int) -> int:
        return sum(1 for _, r in self.replies() if r.verb == verb and r.code == code)

    def transcripts(self) -> str:
        return "\n".join(f"#{s.index}{'' if s.closed else ' (open)'}: {s.transcript()}"
                         for s in self.sessions)

    # -- the proxy ------------------------------------------------------------------------------

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            session = Session(len(self._sessions) + 1)
            self._sessions.append(session)
        conn = _Conn(session)
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            session.closed = True
            client_w.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(self._client_to_server(conn, client_r, server_w),
                                 self._server_to_client(conn, server_r, client_w))
        except asyncio.CancelledError:
            pass
        finally:
            for writer in (client_w, server_w):
                with contextlib.suppress(Exception):
                    writer.close()
            session.closed = True
            self._tasks.discard(task)

    async def _client_to_server(self, conn: _Conn, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        buffer = b""
        try:
            while data := await reader.read(65536):
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    self._client_line(conn, line.rstrip(b"\r").decode("latin-1"))
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.write_eof()

    def _client_line(self, conn: _Conn, line: str) -> None:
        if conn.content:
            if line == ".":
                conn.content = False
                conn.pending.append(".")
                conn.session.events.append(".")
            return
        conn.session.events.append(line)
        conn.pending.append(line.split(" ")[0].split(":")[0].upper() or "?")

    async def _server_to_client(self, conn: _Conn, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        buffer = b""
        try:
            while data := await reader.read(65536):
                buffer += data
                out = b""
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    out += line + b"\n"
                    text = line.rstrip(b"\r").decode("latin-1")
                    if len(text) >= 3 and text[:3].isdigit() and text[3:4] != "-":
                        self._reply(conn, Reply(conn.pending.pop(0) if conn.pending else "-",
                                                int(text[:3]), text))
                writer.write(out)
                await writer.drain()
            if buffer:
                writer.write(buffer)
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.write_eof()

    def _reply(self, conn: _Conn, reply: Reply) -> None:
        if reply.verb == "DATA" and reply.code == 354:
            conn.content = True
        if reply.verb == "." and reply.code == 250:
            conn.session.accepted += 1
        conn.session.events.append(reply)
        if self.on_reply is not None:
            self.on_reply(conn.session, reply)

