"""A raw SMTP client on a plain blocking socket, for tests that need exact bytes on the wire.

What it is for: the one client the relay tests use when smtplib would hide what they check: it sends
exactly the bytes it is given (bare LF, NUL, pipelined commands, a fake end of data), reads whole replies
line by line, and can bind a chosen source address (127.x, or a pod-network address) to look like a
particular client. Replies come two ways: `reply()` parsed as (code, [text of each line]), and
`reply_lines()` as the raw lines (without CRLF), for tests that check a reply's form.

What it must not do: decide whether a reply is right (the tests do), retry, or speak TLS (tests that need
TLS wrap the socket themselves).

    from mailrelay_sandbox import smtpwire

    with smtpwire.Wire(("127.0.0.5", 2525), source="127.0.0.9") as wire:   # reads the 220 greeting
        wire.ehlo()                             # the EHLO reply's lines (asserts 250)
        wire.cmd("MAIL FROM:<a@example.org>")   # (250, "2.1.0 Ok")
        wire.line("RCPT TO:<b@example.net>")    # "250 2.1.5 Ok"
        wire.send(b"DATA\\r\\n"); wire.reply()   # (354, ["End data with <CR><LF>.<CR><LF>"])
        wire.cmd_lines("NOOP")                  # [b"250 2.0.0 Ok"], or None when the server closed
        wire.closed()                           # True once the server closed (EOF, nothing more sent)
"""

from __future__ import annotations

import contextlib
import socket


class Wire:
    def __init__(self, address: tuple[str, int], *, source: str | None = None, timeout: float = 30.0,
                 greet: bool = True) -> None:
        host, port = address
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.buf = b""
        self.eof = False
        self.greeting: tuple[int, list[str]] | None = self.reply() if greet else None

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode("ascii") if isinstance(data, str) else data)

    # -- raw replies -------------------------------------------------------------------------------
    def _line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
                if self.buf:
                    rest, self.buf = self.buf, b""
                    return rest
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply_lines(self) -> list[bytes] | None:
        """One reply, all its lines as sent (without CRLF), or None when the server closed first.
        A close inside a multi-line reply raises AssertionError."""
        lines: list[bytes] = []
        while True:
            line = self._line()
            if line is None:
                if lines:
                    raise AssertionError(f"connection closed inside a multi-line reply: {lines!r}")
                return None
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return lines

    def cmd_lines(self, line: bytes | str) -> list[bytes] | None:
        """Send one command line (CRLF added); return its reply's raw lines (None: closed)."""
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply_lines()

    # -- parsed replies ----------------------------------------------------------------------------
    def reply(self) -> tuple[int, list[str]]:
        """One whole reply: (code, [text of each line]); (0, []) when the server closed."""
        lines = self.reply_lines()
        if lines is None:
            return (0, [])
        return (int(lines[-1][:3]), [line[4:].decode("ascii") for line in lines])

    def cmd(self, line: str) -> tuple[int, str]:
        """Send one command line; return (code, last text line)."""
        self.send(line + "\r\n")
        code, lines = self.reply()
        return code, lines[-1] if lines else ""

    def line(self, command: str) -> str:
        """Send one command line; return the whole last reply line as on the wire ("250 2.1.0 Ok")."""
        code, text = self.cmd(command)
        return f"{code} {text}"

    def ehlo(self, name: str = "client.test") -> list[str]:
        self.send(f"EHLO {name}\r\n")
        code, lines = self.reply()
        assert code == 250, lines
        return lines

    # -- the end of the session --------------------------------------------------------------------
    def closed(self, timeout: float = 20.0) -> bool:
        """True when the server closes the connection (EOF) within `timeout` and sends nothing more."""
        if self.buf:
            return False
        if self.eof:
            return True
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            return False

    def wait_closed(self, timeout: float) -> bool:
        """True when the server closes the connection within `timeout`, whatever it sends first (read
        and discarded); a reset counts as closed."""
        self.buf = b""
        if self.eof:
            return True
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True
