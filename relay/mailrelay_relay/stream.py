"""The byte stream under an SMTP session: the one place the relay reaches into asyncio's internals.

What it is for: the two things smtp.py needs from asyncio that asyncio has no public API for.

- `Reader`, an asyncio.StreamReader that can look at its buffer: is a whole line already there (then the
  replies to pipelined commands stay batched), drop what is buffered (the plaintext a client pipelined
  after STARTTLS, RFC 3207), and read DATA up to ".\\r\\n" while stopping early at a bare-LF end.
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

    async def read_data_piece(self, at_line_start: bool) -> bytes:
        """readuntil(b".\\r\\n"), but raise BareLfEnd as soon as the buffer shows LF "." LF before it (a DATA
        ended with bare line feeds, which would otherwise wait for the data timeout). `at_line_start`:
        the bytes consumed so far end with a line feed (the start of DATA counts as one)."""
        while True:
            buffer = self._buffer
            end = buffer.find(b".\r\n")
            bare = buffer.find(b"\n.\n")
            if at_line_start and buffer[:2] == b".\n":
                bare = -1 if end == 0 else 0
            if bare >= 0 and (end < 0 or bare < end):
                raise BareLfEnd
            if end >= 0 or len(buffer) > self._limit or self._eof:
                return await self.readuntil(b".\r\n")
            await self._wait_for_data("readuntil")


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
