"""`mailrelay_relay.wire`: line-start dots found as CPython's search would find them, content stuffed as
aiosmtplib's data() would send it, and a DATA block unstuffed back to the content."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from mailrelay_relay import wire

# Dots that start no line (more of them than line_dot looks at one by one), line-start dots, line ends.
_TOKENS = st.sampled_from([b".", b"..", b"a.b", b"x", b"\n", b"\r", b"\r\n", b"\r\n.", b"\n.", b"y" * 40])


@settings(max_examples=500)
@given(st.lists(_TOKENS, max_size=80).map(b"".join), st.integers(0, 50))
def test_line_dot_is_the_first_lf_dot(data: bytes, start: int) -> None:
    assert wire.line_dot(data, start) == data.find(b"\n.", start)
    assert wire.line_dot(bytearray(data), start) == data.find(b"\n.", start)


def test_line_dot_falls_back_after_many_dots_that_start_no_line() -> None:
    prose = b"One. Two. Three.\r\n" * 50
    assert wire.line_dot(prose + b"\r\n.end\r\n") == len(prose) + 1
    assert wire.line_dot(prose) == -1


# Content as the spool holds it: lines with CRLF endings, some starting with one or more dots.
_LINES = st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"a.b.c", b"text"]), max_size=30)


def _aiosmtplib_payload(content: bytes) -> bytes:
    """What aiosmtplib's data() writes for `content` (its own two passes), the reference for stuff()."""
    from aiosmtplib import protocol

    return protocol.PERIOD_REGEX.sub(b"..", protocol.normalize_message_line_endings(content)) + b".\r\n"


@settings(max_examples=400)
@given(_LINES, st.booleans())
def test_stuff_is_what_aiosmtplib_would_send(lines: list[bytes], last_line_ends: bool) -> None:
    content = b"".join(line + b"\r\n" for line in lines)
    if not last_line_ends and content:
        content = content[:-2]
    assert wire.stuff(content) == _aiosmtplib_payload(content)


@given(_LINES.filter(bool))
def test_unstuff_undoes_stuff(lines: list[bytes]) -> None:
    content = b"".join(line + b"\r\n" for line in lines)
    block = wire.stuff(content)[:-3]  # the DATA block before its final "." CRLF
    assert wire.unstuff(block) == content
    assert wire.has_stuffed_line(block) == any(line.startswith(b".") for line in lines)
