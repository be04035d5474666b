"""The byte stream under an SMTP session: the one place the relay reaches into asyncio's internals.

What it is for: the two things smtp.py needs from asyncio that asyncio has no public API for.

- `Reader`, an asyncio.StreamReader that can look at its buffer: is a whole line already there (then the
  replies to pipelined commands stay batched), drop what is buffered (the plaintext a client pipelined
  after STARTTLS, RFC 3207), and read a whole DATA up to its CRLF "." CRLF in one piece while stopping
  early at a bare-LF end.
- `TlsLayer`, STARTTLS on a live server connection: asyncio's SSL protocol goes between the socket and
  the session's protocol, and once the handshake is done the session's reader and writer move onto the
  TLS transport and the plaintext read meanwhile is dropped. (`loop.start_tls` is public but hands the
  transport back only after the handshake and calls no protocol method on success, so the session
  would need a second code path for the reader's hand-over; this is the layering aiosmtpd used.)

The private names used (StreamReader._buffer, _limit, _eof, _wait_for_data, _transport;
StreamWriter._transport; asyncio.sslproto.SSLProtocol and its _app_transport) have been stable since
Python 3.7; tests/relay/test_engine.py checks each by behaviour on the running Python, on real sockets.

What it must not do: know SMTP (replies, commands, policy), or be imported by anything but smtp.py.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
import typing
from collections.abc import Awaitable, Callable


class BareLfEnd(Exception):
    """The client ended DATA with LF "." LF."""


class Reader(asyncio.StreamReader):
    """asyncio's stream reader plus the looks at its buffer a session needs."""

    _buffer: bytearray  # StreamReader's buffer, limit, EOF flag, waiter and transport (CPython asyncio)
    _limit: int
    _eof: bool
    _wait_for_data: Callable[[str], Awaitable[None]]
    _transport: asyncio.BaseTransport | None

    def holds(self, separator: bytes) -> bool:
        """Would readuntil(separator) return (or fail) without waiting?"""
        return self._buffer.find(separator) >= 0 or len(self._buffer) > self._limit

    def discard(self) -> None:
        """Drop everything buffered and not read yet."""
        self._buffer.clear()

    async def read_data(self) -> bytes:
        """The whole DATA up to and including its end, CRLF "." CRLF (or "." CRLF as its very first
        line), in one piece: one scan of each byte as it arrives, however many lines end with a dot.
        Call it right after the 354, with nothing of the DATA consumed. Raises BareLfEnd as soon as the
        buffer shows LF "." LF before the end (a DATA ended with bare line feeds, which would otherwise
        wait for the data timeout), and LimitOverrunError, leaving the buffer as it is, when the DATA
        does not end within the reader's limit."""
        scanned = 0
        while True:
            buffer = self._buffer
            if buffer[:2] == b".\n":
                raise BareLfEnd
            end = data_end(buffer, max(0, scanned - 4))
            if buffer.find(b"\n.\n", max(0, scanned - 2), end if end >= 0 else len(buffer)) >= 0:
                raise BareLfEnd
            if end > self._limit or (end < 0 and len(buffer) > self._limit):
                raise asyncio.LimitOverrunError("DATA longer than the reader's limit", 0)
            if end >= 0:
                return await self.readexactly(end)
            if self._eof:
                raise asyncio.IncompleteReadError(bytes(buffer), None)
            scanned = len(buffer)
            await self._wait_for_data("read_data")


def data_end(buffer: bytes | bytearray, start: int) -> int:
    """The length of the DATA in `buffer` (all of it from the start of DATA) up to and including its
    end, CRLF "." CRLF or a first line "." CRLF; -1 when `buffer` does not hold the end. `start`: where
    to begin looking (the bytes before it are known to hold no end)."""
    if buffer[:3] == b".\r\n":
        return 3
    end = buffer.find(b"\r\n.\r\n", start)
    return -1 if end < 0 else end + 5


class TlsLayer:
    """Server-side STARTTLS under `protocol`, on the plain `transport` it was given at connection_made.

    `TlsLayer(...)` builds the layer; `start()` puts it between the socket and `protocol` and begins the
    handshake; from then on `transport` is the one to write to. `handshake` resolves when the handshake
    is done (or raises its error); at that moment asyncio calls `protocol.connection_made(transport)` a
    second time, and the protocol calls `adopt()` to move its reader and writer onto the TLS transport.
    """

    def __init__(self, protocol: asyncio.Protocol, plain: asyncio.BaseTransport, context: ssl.SSLContext,
                 *, handshake_timeout: int) -> None:
        loop = asyncio.get_running_loop()
        self.plain = plain
        self.handshake: asyncio.Future[None] = loop.create_future()
        self._protocol = asyncio.sslproto.SSLProtocol(
            loop, protocol, context, self.handshake, server_side=True,
            ssl_handshake_timeout=handshake_timeout)
        self.transport: asyncio.BaseTransport = self._protocol._app_transport

    def start(self) -> None:
        self.plain.set_protocol(self._protocol)
        self._protocol.connection_made(self.plain)

    def adopt(self, reader: Reader, writer: asyncio.StreamWriter) -> None:
        """After the handshake: `reader` and `writer` use the TLS transport, and plaintext that arrived
        before it (RFC 3207 section 4.2: never to be acted on) is dropped."""
        reader._transport = self.transport
        typing.cast(typing.Any, writer)._transport = self.transport
        reader.discard()
