"""Helpers for the relay-core tests that talk to a real `mailrelay-relay` process (no tests here).

- `Wire`: a blocking raw-socket SMTP client that sends exact bytes and reads whole replies, for
  transcripts with exact codes (optionally bound to a chosen 127.x source address).
- `start_relay`: a RelayProcess (sandbox.relayproc) on 127.0.0.5 with a fresh spool and short timeouts.
- `message`: a small RFC 5322 message with a unique Message-ID.
"""

from __future__ import annotations

import pathlib
import socket
import uuid
from collections.abc import Sequence

from mailrelay_sandbox import relayproc

RELAY_HOST = "127.0.0.5"
HOSTNAME = "relay.test"


class Wire:
    def __init__(self, address: tuple[str, int], *, source: str | None = None, timeout: float = 20.0,
                 greet: bool = True) -> None:
        self.sock = socket.create_connection(address, timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.file = self.sock.makefile("rb")
        self.greeting: tuple[int, list[str]] | None = self.reply() if greet else None

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode("ascii") if isinstance(data, str) else data)

    def reply(self) -> tuple[int, list[str]]:
        """One whole reply: (code, [text of each line]); (0, []) when the server closed."""
        lines: list[str] = []
        while True:
            raw = self.file.readline(4096)
            if not raw:
                return (0, lines)
            assert raw.endswith(b"\r\n"), raw
            text = raw[:-2].decode("ascii")
            lines.append(text[4:])
            if text[3:4] != "-":
                return (int(text[:3]), lines)

    def cmd(self, line: str) -> tuple[int, str]:
        """Send one command line; return (code, last text line)."""
        self.send(line + "\r\n")
        code, lines = self.reply()
        return code, lines[-1] if lines else ""

    def line(self, command: str) -> str:
        """Send one command line; return the whole last reply line as on the wire ("250 2.1.0 Ok")."""
        code, text = self.cmd(command)
        return f"{code} {text}"

    def ehlo(self) -> list[str]:
        self.send("EHLO client.test\r\n")
        code, lines = self.reply()
        assert code == 250, lines
        return lines

    def closed(self, timeout: float = 20.0) -> bool:
        """True when the server closes the connection (EOF) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            return self.file.read(1) == b""
        except (ConnectionResetError, TimeoutError):
            return False

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


def message(subject: str = "test", body: str = "hello", size: int = 0) -> tuple[str, bytes]:
    """(Message-ID, content) for a message whose body is padded to about `size` bytes."""
    msg_id = f"<{uuid.uuid4().hex}@client.test>"
    text = (f"From: a@client.test\r\nTo: b@dest.test\r\nSubject: {subject}\r\nMessage-ID: {msg_id}\r\n"
            f"\r\n{body}\r\n")
    while len(text) < size:
        text += "x" * 76 + "\r\n"
    return msg_id, text.encode("ascii")


def start_relay(tmp_path: pathlib.Path, upstream: str, *, args: Sequence[str] = (), workers: int = 1,
                token: str | None = "test-token", env: dict[str, str] | None = None,
                name: str = "relay") -> relayproc.RelayProcess:
    relay = relayproc.RelayProcess(
        upstream=upstream, spool=tmp_path / name / "spool", host=RELAY_HOST, token=token, workers=workers,
        hostname=HOSTNAME, extra_args=list(args), env=env, startup_timeout=60.0, stop_timeout=60.0,
    )
    relay.start()
    return relay

