"""A small asyncio SMTP client for the session, cap and overload measurements, where smtp-source cannot
time single sessions: it timestamps the greeting (220 or 421) and the 250 after DATA of each session.

What it must not do: retry or back off on its own inside a session; each call is one session and returns
what happened, and the callers decide what to do next.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time

_ids = itertools.count()


def message(size: int) -> bytes:
    """A message of about `size` bytes, CRLF lines, dot-safe, ending with the DATA terminator."""
    head = (
        f"From: bench@example.com\r\nTo: sink@example.org\r\nSubject: bench\r\n"
        f"Message-ID: <bench-{next(_ids)}-{time.time_ns()}@example.com>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body + b".\r\n"


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    """One SMTP reply (all its lines); (code, last line). Code 0 when the peer closed first."""
    while True:
        line = await reader.readline()
        if not line:
            return 0, ""
        text = line.decode("ascii", "replace").rstrip("\r\n")
        if len(text) < 4 or text[3] != "-":
            return int(text[:3]) if text[:3].isdigit() else 0, text


@dataclasses.dataclass(frozen=True)
class Outcome:
    kind: str  # accepted, refused (4xx/5xx at greeting), rejected (later), error
    latency: float  # from connect() to the greeting (refused) or to the 250 after DATA (accepted)
    code: int
    detail: str = ""


PHASES = ("connect+greeting", "EHLO", "MAIL", "RCPT", "DATA", "end of data -> 250", "QUIT")


async def send_one(
    port: int, payload: bytes, limit: float = 30.0, marks: list[float] | None = None
) -> Outcome:
    """Connect, send one message, QUIT. Never raises for network trouble: it becomes an `error` outcome.

    With `marks`, the seconds each of PHASES took are appended (only for a fully accepted session).
    """
    started = time.monotonic()
    stamps = [started]
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            code, text = await read_reply(reader)
            stamps.append(time.monotonic())
            if code != 220:
                return Outcome("refused", time.monotonic() - started, code, text)
            for command, expect in ((b"EHLO bench.example.com\r\n", 250),
                                    (b"MAIL FROM:<bench@example.com>\r\n", 250),
                                    (b"RCPT TO:<sink@example.org>\r\n", 250),
                                    (b"DATA\r\n", 354)):  # fmt: skip
                writer.write(command)
                code, text = await read_reply(reader)
                stamps.append(time.monotonic())
                if code != expect:
                    return Outcome("rejected", time.monotonic() - started, code, text)
            writer.write(payload)
            code, text = await read_reply(reader)
            stamps.append(time.monotonic())
            if code != 250:
                return Outcome("rejected", time.monotonic() - started, code, text)
            accepted = time.monotonic() - started
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(OSError, TimeoutError):
                await read_reply(reader)
            stamps.append(time.monotonic())
            if marks is not None:
                marks.extend(b - a for a, b in itertools.pairwise(stamps))
            return Outcome("accepted", accepted, 250)
    except (OSError, TimeoutError, ValueError) as error:
        return Outcome("error", time.monotonic() - started, 0, type(error).__name__)
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def greet(port: int, limit: float = 10.0) -> Outcome:
    """Connect and read the greeting only; QUIT politely after a 220."""
    started = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            code, text = await read_reply(reader)
            latency = time.monotonic() - started
            if code == 220:
                writer.write(b"QUIT\r\n")
                with contextlib.suppress(OSError):
                    await read_reply(reader)
            return Outcome("accepted" if code == 220 else "refused", latency, code, text)
    except (OSError, TimeoutError, ValueError) as error:
        return Outcome("error", time.monotonic() - started, 0, type(error).__name__)
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class IdleSessions:
    """N sessions that greeted and said EHLO, then sit idle until close()."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.failed = 0

    async def open(self, port: int, count: int, parallel: int = 50) -> None:
        gate = asyncio.Semaphore(parallel)

        async def one() -> None:
            async with gate:
                try:
                    async with asyncio.timeout(30):
                        reader, writer = await asyncio.open_connection("127.0.0.1", port)
                        code, _ = await read_reply(reader)
                        if code != 220:
                            writer.close()
                            self.failed += 1
                            return
                        writer.write(b"EHLO idle.example.com\r\n")
                        await read_reply(reader)
                        self.writers.append(writer)
                except (OSError, TimeoutError):
                    self.failed += 1

        await asyncio.gather(*(one() for _ in range(count)))

    async def close(self) -> None:
        for writer in self.writers:
            with contextlib.suppress(Exception):
                writer.write(b"QUIT\r\n")
            writer.close()
        for writer in self.writers:
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        self.writers.clear()
