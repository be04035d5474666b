"""The SMTP engine: `mailrelay_relay.smtp.Session` is aiosmtpd's `SMTP`, subclassed.

- Its contract with aiosmtpd: a Session has every field a stock `SMTP` instance has after its
  constructor (the overrides skip that constructor and aiosmtpd's inherited methods read those fields),
  and building one never introspects (the cost the override exists to avoid).
- Its DATA reader, against a real relay and sink: a small DATA is read up to each ".CRLF" and ends only
  where the two bytes before it are a real CRLF, so lines ending in "." (sent whole or trickled) never
  end it; a DATA full of such lines that outgrows the one-pass limit, and a large one without them,
  continue line by line and arrive byte for byte.
"""

from __future__ import annotations

import asyncio
import inspect
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import aiosmtpd.smtp
import pytest
from mailrelay_relay import config, podstate, policy, smtp, spool
from mailrelay_sandbox import relayproc, smtpwire, waiting
from mailrelay_sandbox import sink as sinkmod

from tests.relay.relay_harness import start_relay


class _Handler:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


def _server(tmp_path: pathlib.Path) -> smtp.Server:
    cfg = config.Config(listen_host="127.0.0.5", listen_port=0, upstream_host="127.0.0.1", upstream_port=9,
                        spool=tmp_path / "spool", hostname="relay.test")
    return smtp.Server(cfg, podstate.PodState(1), spool.Spool(cfg.spool), lambda msg: None)


def test_session_has_every_field_of_a_stock_aiosmtpd_smtp(tmp_path: pathlib.Path) -> None:
    async def build() -> tuple[set[str], smtp.Session]:
        loop = asyncio.get_running_loop()
        stock = aiosmtpd.smtp.SMTP(_Handler(), hostname="relay.test", loop=loop)
        return set(vars(stock)), smtp.Session(_server(tmp_path))

    fields, session = asyncio.run(build())
    assert isinstance(session, aiosmtpd.smtp.SMTP)
    assert sorted(name for name in fields if not hasattr(session, name)) == []
    assert session.hostname == "relay.test"
    assert session.data_size_limit == session.cfg.max_message_size


def test_building_a_session_does_not_introspect(tmp_path: pathlib.Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("inspect.getmembers called")

    async def build() -> None:
        loop = asyncio.get_running_loop()
        server = _server(tmp_path)
        monkeypatch.setattr(inspect, "getmembers", forbidden)
        with pytest.raises(AssertionError, match="getmembers"):  # the stock constructor does
            aiosmtpd.smtp.SMTP(_Handler(), hostname="relay.test", loop=loop)
        session = smtp.Session(server)
        assert "_smtp_methods" not in vars(session)  # no per-connection method table either

    asyncio.run(build())


def test_command_table_holds_the_implemented_verbs_only() -> None:
    assert set(smtp.Session._COMMANDS) == policy.IMPLEMENTED
    assert "AUTH" not in smtp.Session._COMMANDS and "EXPN" not in smtp.Session._COMMANDS  # aiosmtpd's


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
