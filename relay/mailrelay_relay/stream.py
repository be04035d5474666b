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

from mailrelay_relay import wire


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
        line), in one piece: one look at each line that starts with a dot (`wire.line_dot`), however
        many arrive. Call it right after the 354, with nothing of the DATA consumed. Raises BareLfEnd as
        soon as the buffer shows LF "." LF before the end (a DATA ended with bare line feeds, which would
        otherwise wait for the data timeout), and LimitOverrunError, leaving the buffer as it is, when
        the DATA does not end within the reader's limit."""
        at = -1  # line-start dots are looked for from here on; -1: the DATA's first byte is not known
        while True:
            buffer = self._buffer
            if at == -1 and buffer and buffer[0] != 0x2E:  # the DATA opens with no dot
                at = 0
            if at == -1:
                lf = -1 if buffer else None  # -1: the DATA opens with a dot
            else:
                found = wire.line_dot(buffer, at)
                lf = found if found >= 0 else None
            kind = _MORE if lf is None else _dot_line(buffer, lf)
            if kind == _BARE_END:
                raise BareLfEnd
            if kind == _STUFFED:
                assert lf is not None
                at = lf + 1
                continue
            if kind > self._limit or (kind == _MORE and len(buffer) > self._limit):
                raise asyncio.LimitOverrunError("DATA longer than the reader's limit", 0)
            if kind >= 0:
                return await self.readexactly(kind)
            if self._eof:
                raise asyncio.IncompleteReadError(bytes(buffer), None)
            if lf is not None:
                at = lf  # look at this dot again when the bytes after it are there
            elif at >= 0:
                at = max(at, len(buffer) - 1)  # the last byte may be the LF before a dot still to come
            await self._wait_for_data("read_data")


_MORE, _STUFFED, _BARE_END = -1, -2, -3


def _dot_line(buffer: bytes | bytearray, lf: int) -> int:
    """What the LF "." at `lf` (-1: the dot opens the DATA) is: the end of DATA (its length up to and
    including CRLF "." CRLF), _BARE_END (LF "." LF), _STUFFED (a line that starts with a dot), or _MORE
    (the bytes that tell are not there yet)."""
    after = lf + 2
    if after >= len(buffer):
        return _MORE
    if buffer[after] == 0x0A:
        return _BARE_END
    if after + 1 >= len(buffer):
        return _MORE
    crlf_before = lf == -1 or (lf >= 1 and buffer[lf - 1] == 0x0D)
    if crlf_before and buffer[after] == 0x0D and buffer[after + 1] == 0x0A:
        return after + 2
    return _STUFFED


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
