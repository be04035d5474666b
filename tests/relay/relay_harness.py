"""Helpers for the relay-core tests that talk to a real `mailrelay-relay` process (no tests here); they
talk to it with `mailrelay_sandbox.smtpwire.Wire`.

- `start_relay`: a RelayProcess (sandbox.relayproc) on 127.0.0.5 with a fresh spool and short timeouts.
- `message`: a small RFC 5322 message with a unique Message-ID.
- `sentinel`: the barrier before asserting that something did NOT reach the upstream.
"""

from __future__ import annotations

import pathlib
import subprocess
import uuid
from collections.abc import Callable, Sequence

from mailrelay_sandbox import relayproc, smtpwire, waiting

from tests.conftest import require_tool

RELAY_HOST = "127.0.0.5"
HOSTNAME = "relay.test"


def certificate(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A self-signed certificate and key for HOSTNAME, made by openssl in `directory`."""
    openssl = require_tool("openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", f"/CN={HOSTNAME}", "-addext",
                    f"subjectAltName=DNS:{HOSTNAME}"], check=True, capture_output=True, timeout=120)
    return cert, key


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



def sentinel(relay: relayproc.RelayProcess, arrived: Callable[[bytes], bool], within: float = 60.0) -> None:
    """A barrier for "nothing else reached the upstream": send a sentinel message on a new session, then
    wait until `arrived(its Message-ID)` at the upstream and the relay's queue is empty. Whatever the
    relay accepted before the sentinel has then been delivered (or dead-lettered) too."""
    msg_id, content = message("sentinel")
    with smtpwire.Wire(relay.smtp_address) as wire:
        wire.ehlo()
        assert wire.cmd("MAIL FROM:<sentinel@client.test>")[0] == 250
        assert wire.cmd("RCPT TO:<sentinel@dest.test>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        wire.send(content + b".\r\n")
        assert wire.reply()[0] == 250, "the sentinel was refused"
    waiting.wait_until(lambda: arrived(msg_id.encode()), within=within, what="the sentinel at the upstream")
    waiting.wait_until(lambda: relay.status()["queue"]["messages"] == 0, within=within,
                       what="the relay's queue empty after the sentinel")
