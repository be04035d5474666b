"""The SMTP engine: `mailrelay_relay.smtp.Session` on `mailrelay_relay.stream`, checked by behaviour.

- stream.py's contract with asyncio (the private names it uses), on the running Python and on both
  event loops the relay runs on (asyncio's and uvloop): the reader's looks at its buffer answer as
  readuntil() would, and STARTTLS layered under a live server protocol hands the reader and writer over
  to the TLS transport and drops the plaintext pipelined behind the STARTTLS line. A Python release that
  changes those internals fails here rather than in a session.
- Its DATA reader, against a real relay and sink: a small DATA is read up to each ".CRLF" and ends only
  where the two bytes before it are a real CRLF, so lines ending in "." (sent whole or trickled) never
  end it; a DATA full of such lines that outgrows the one-pass limit, and a large one without them,
  continue line by line and arrive byte for byte.
"""

from __future__ import annotations

import asyncio
import pathlib
import ssl
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st
from mailrelay_relay import smtp, stream
from mailrelay_sandbox import relayproc, smtpwire, waiting
from mailrelay_sandbox import sink as sinkmod

from tests.relay import relay_harness
from tests.relay.relay_harness import HOSTNAME, start_relay

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def _run(loop: str, main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(main, 60))


# -- stream.Reader ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_reader_holds_a_line_exactly_when_readuntil_would_not_wait(loop: str) -> None:
    async def main() -> None:
        reader = stream.Reader(limit=16)
        assert not reader.holds(b"\n")
        reader.feed_data(b"NOOP")
        assert not reader.holds(b"\n")
        reader.feed_data(b"\r\nRSET\r\n")
        assert reader.holds(b"\n")
        assert await reader.readuntil(b"\n") == b"NOOP\r\n"
        assert reader.holds(b"\n")
        assert await reader.readuntil(b"\n") == b"RSET\r\n"
        assert not reader.holds(b"\n")
        reader.feed_data(b"x" * 17)  # past the limit: readuntil fails at once, so it does not wait either
        assert reader.holds(b"\n")
        with pytest.raises(asyncio.LimitOverrunError):
            await reader.readuntil(b"\n")

    _run(loop, main())


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_reader_discard_drops_what_is_buffered_only(loop: str) -> None:
    async def main() -> None:
        reader = stream.Reader(limit=1024)
        reader.feed_data(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
        reader.discard()
        assert not reader.holds(b"\n")
        reader.feed_data(b"EHLO x\r\n")
        assert await reader.readuntil(b"\n") == b"EHLO x\r\n"

    _run(loop, main())


@pytest.mark.parametrize(("pieces", "expected"), [
    ([b"Hello.\r\n.\r\n"], b"Hello.\r\n.\r\n"),
    ([b"end.\r\nof.\r\nlines.\r\n.\r\n"], b"end.\r\nof.\r\nlines.\r\n.\r\n"),  # one piece, not per line
    ([b"a\r\n", b"b\r", b"\n.", b"\r\n"], b"a\r\nb\r\n.\r\n"),     # waits for more, across pieces
    ([b"a\r", b"\n", b".", b"\r", b"\n"], b"a\r\n.\r\n"),           # an end split byte by byte
    ([b".\r\n"], b".\r\n"),                                  # an empty DATA
    ([b"..\r\n.\r\n"], b"..\r\n.\r\n"),                        # a stuffed dot line is no end
    ([b"a\n.\r\nb\r\n.\r\n"], b"a\n.\r\nb\r\n.\r\n"),              # LF "." CRLF is no end either
    ([b"a\n.\nb\r\n.\r\n"], stream.BareLfEnd),                   # LF "." LF before the end
    ([b"a\n", b".", b"\nb\r\n.\r\n"], stream.BareLfEnd),            # ... across pieces
    ([b".\nb\r\n.\r\n"], stream.BareLfEnd),                      # ... at the start of DATA
    ([b"a\r\n.\r\nb\n.\n"], b"a\r\n.\r\n"),                      # a bare end after the real one
    ([b"x" * 2000], asyncio.LimitOverrunError),                 # no end within the limit
])
def test_reader_reads_a_whole_data(pieces: list[bytes], expected: bytes | type[Exception]) -> None:
    async def main() -> None:
        reader = stream.Reader(limit=1024)

        async def feed() -> None:
            for piece in pieces:
                await asyncio.sleep(0)
                reader.feed_data(piece)

        feeder = asyncio.create_task(feed())
        if isinstance(expected, bytes):
            assert await reader.read_data() == expected
        else:
            with pytest.raises(expected):
                await reader.read_data()
        await feeder

    _run("asyncio", main())


@given(st.binary(max_size=300), st.integers(1, 40))
def test_reader_data_end_agrees_with_the_first_end_of_data(data: bytes, step: int) -> None:
    """Fed in pieces of any size, read_data ends exactly where the first CRLF "." CRLF ends (or at a
    leading "." CRLF), and fails with BareLfEnd exactly when LF "." LF comes first."""
    framed = b"\r\n" + data
    end = framed.find(b"\r\n.\r\n")
    bare = min((i for i in (framed.find(b"\n.\n"),) if i >= 0), default=-1)

    async def main() -> bytes | type[Exception]:
        reader = stream.Reader(limit=1024)
        for i in range(0, len(data), step):
            reader.feed_data(data[i:i + step])
        reader.feed_eof()
        try:
            return await reader.read_data()
        except stream.BareLfEnd:
            return stream.BareLfEnd
        except asyncio.IncompleteReadError:
            return asyncio.IncompleteReadError

    got = asyncio.run(main())
    if bare >= 0 and (end < 0 or bare < end + 2):
        assert got is stream.BareLfEnd
    elif end >= 0:
        assert got == data[:end + 3]
    else:
        assert got is asyncio.IncompleteReadError


_DATA_TOKENS = st.sampled_from([b".", b"..", b"\r\n", b"\n", b"\r", b"x", b"xy" * 30, b"\r\n.", b"\n.\n",
                                b"\r\n.\r\n", b"a.b"])


@given(st.lists(_DATA_TOKENS, max_size=60).map(b"".join), st.integers(1, 40))
def test_reader_finds_the_end_of_dot_rich_data_fed_while_it_waits(data: bytes, step: int) -> None:
    """Data full of dots (more dots that start no line than the reader looks at one by one, stuffed lines,
    ends and bare ends), fed piece by piece while read_data waits: it ends exactly where the first
    CRLF "." CRLF ends, fails with BareLfEnd exactly when LF "." LF comes first, and otherwise waits until
    the end of the stream, holding every byte."""
    framed = b"\r\n" + data
    end = framed.find(b"\r\n.\r\n")
    bare = framed.find(b"\n.\n")

    async def main() -> bytes | type[Exception]:
        reader = stream.Reader(limit=100_000)

        async def feed() -> None:
            for i in range(0, len(data), step):
                await asyncio.sleep(0)
                reader.feed_data(data[i:i + step])
            await asyncio.sleep(0)
            reader.feed_eof()

        feeder = asyncio.create_task(feed())
        try:
            return await reader.read_data()
        except stream.BareLfEnd:
            return stream.BareLfEnd
        except asyncio.IncompleteReadError as error:
            assert error.partial == data
            return asyncio.IncompleteReadError
        finally:
            await feeder

    got = asyncio.run(main())
    if bare >= 0 and (end < 0 or bare < end + 2):
        assert got is stream.BareLfEnd
    elif end >= 0:
        assert got == data[:end + 3]
    else:
        assert got is asyncio.IncompleteReadError


# -- stream.TlsLayer ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    return relay_harness.certificate(tmp_path_factory.mktemp("tls"))


class _EchoAfterStartTls(asyncio.StreamReaderProtocol):
    """A server protocol shaped like smtp.Session: "STARTTLS" switches to TLS, then it echoes a line."""

    def __init__(self, context: ssl.SSLContext, done: asyncio.Future[list[bytes]]) -> None:
        self.reader = stream.Reader(limit=1024)
        super().__init__(self.reader, client_connected_cb=self._connected)
        self.context = context
        self.done = done
        self.tls: stream.TlsLayer | None = None
        self.made: list[asyncio.BaseTransport] = []

    def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(transport)
        if self.tls is not None:
            self.tls.adopt(self.reader, self.writer)
            return
        super().connection_made(transport)
        self.task = asyncio.get_running_loop().create_task(self.serve(transport))

    async def serve(self, plain: asyncio.BaseTransport) -> None:
        seen = []
        try:
            self.writer.write(b"220 ready\r\n")
            seen.append(await self.reader.readuntil(b"\n"))
            self.reader.discard()  # what the client pipelined behind STARTTLS
            self.writer.write(b"220 go ahead\r\n")
            self.tls = stream.TlsLayer(self, plain, self.context, handshake_timeout=30)
            self.tls.start()
            await self.tls.handshake
            seen.append(await self.reader.readuntil(b"\n"))
            self.writer.write(b"echo " + seen[-1])
            await self.writer.drain()
            self.done.set_result(seen)
        except Exception as error:  # handed to the test
            self.done.set_exception(error)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_tls_layer_hands_the_stream_over_and_drops_pipelined_plaintext(
        loop: str, certificate: tuple[pathlib.Path, pathlib.Path]) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(str(cert), str(key))
    client_context = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        done: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
        protocols: list[_EchoAfterStartTls] = []

        def factory() -> _EchoAfterStartTls:
            protocols.append(_EchoAfterStartTls(server_context, done))
            return protocols[-1]

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readuntil(b"\n") == b"220 ready\r\n"
        writer.write(b"STARTTLS\r\nMAIL FROM:<injected@example.org>\r\n")  # RFC 3207: never acted on
        assert await reader.readuntil(b"\n") == b"220 go ahead\r\n"
        await writer.start_tls(client_context, server_hostname=HOSTNAME)
        assert writer.get_extra_info("ssl_object") is not None
        writer.write(b"EHLO over tls\r\n")
        assert await reader.readuntil(b"\n") == b"echo EHLO over tls\r\n"
        assert await done == [b"STARTTLS\r\n", b"EHLO over tls\r\n"]
        (protocol,) = protocols
        assert len(protocol.made) == 2 and protocol.made[1] is protocol.tls.transport  # type: ignore[union-attr]
        assert protocol.made[1].get_extra_info("ssl_object") is not None
        writer.close()
        server.close()
        await server.wait_closed()

    _run(loop, main())


# -- the DATA reader on the wire ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sink() -> Iterator[sinkmod.Sink]:
    with sinkmod.running() as s:
        yield s


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, sink: sinkmod.Sink) -> Iterator[relayproc.RelayProcess]:
    r = start_relay(tmp_path_factory.mktemp("engine"), sink.address, args=["--max-message-size", "2000000"])
    yield r
    r.kill()


def _send(relay: relayproc.RelayProcess, wire_data: bytes, *, piece: int = 0) -> tuple[int, list[str]]:
    """One transaction whose DATA content is `wire_data` (dot-stuffed, ending with CRLF . CRLF), sent
    whole or in pieces of `piece` bytes; returns the reply to the end of DATA."""
    w = smtpwire.Wire(relay.smtp_address)
    try:
        w.ehlo()
        assert w.cmd("MAIL FROM:<a@client.test>")[0] == 250
        assert w.cmd("RCPT TO:<b@dest.test>")[0] == 250
        assert w.cmd("DATA")[0] == 354
        if piece:
            for start in range(0, len(wire_data), piece):
                w.send(wire_data[start:start + piece])
                time.sleep(0.001)
        else:
            w.send(wire_data)
        reply = w.reply()
        assert w.cmd("QUIT")[0] == 221
        return reply
    finally:
        w.close()


def _content(marker: str, lines: list[bytes]) -> bytes:
    return (f"From: a@client.test\r\nTo: b@dest.test\r\nSubject: {marker}\r\n\r\n".encode()
            + b"".join(line + b"\r\n" for line in lines))


def _stuff(content: bytes) -> bytes:
    lines = content.split(b"\r\n")[:-1]
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


def _arrived(sink: sinkmod.Sink, marker: str) -> bytes:
    needle = f"Subject: {marker}\r\n".encode()
    waiting.wait_until(lambda: any(needle in m.content for m in sink.messages), within=60,
                       what='any(needle in m.content for m in sink.messages)')
    found = [m.content for m in sink.messages if needle in m.content]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("piece", [0, 1, 7])
def test_lines_ending_in_a_dot_do_not_end_data(relay: relayproc.RelayProcess, sink: sinkmod.Sink,
                                               piece: int) -> None:
    marker = f"dots-{piece}"
    content = _content(marker, [b"Regards.", b"x.", b".", b"..", b"...", b". .", b"", b"end."])
    reply = _send(relay, _stuff(content), piece=piece)
    assert reply[0] == 250 and reply[1][0].startswith("2.0.0 Ok: queued as "), reply
    assert _arrived(sink, marker) == content


def test_many_dot_lines_past_the_one_pass_limit(relay: relayproc.RelayProcess, sink: sinkmod.Sink) -> None:
    marker = "dots-large"
    lines = [f"line {i:06d} ends with a dot.".encode() for i in range(10000)]  # about 300 KiB
    content = _content(marker, lines)
    assert len(content) > 2 * smtp.READ_LIMIT
    reply = _send(relay, _stuff(content))
    assert reply[0] == 250, reply
    assert _arrived(sink, marker) == content


def test_large_data_is_read_line_by_line(relay: relayproc.RelayProcess, sink: sinkmod.Sink) -> None:
    marker = "large"
    lines = [b"." + b"y" * 900 if i % 50 == 0 else b"z" * 998 for i in range(600)]  # about 600 KiB
    content = _content(marker, lines)
    reply = _send(relay, _stuff(content), piece=65536)
    assert reply[0] == 250, reply
    assert _arrived(sink, marker) == content
