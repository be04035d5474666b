"""Inbound STARTTLS (--tls-cert/--tls-key) on a real relay, with a certificate made by openssl."""

from __future__ import annotations

import pathlib
import smtplib
import socket
import ssl
from collections.abc import Iterator

import pytest
from mailrelay_sandbox import relayproc, smtpwire, waiting
from mailrelay_sandbox import sink as sinkmod

from tests.relay import relay_harness
from tests.relay.relay_harness import HOSTNAME, message, start_relay


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    return relay_harness.certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, sink: sinkmod.Sink,
          certificate: tuple[pathlib.Path, pathlib.Path]) -> Iterator[relayproc.RelayProcess]:
    cert, key = certificate
    r = start_relay(tmp_path_factory.mktemp("tlsrelay"), sink.address,
                    args=["--tls-cert", str(cert), "--tls-key", str(key)])
    yield r
    r.kill()


def client_context(cert: pathlib.Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    return context


def test_starttls_with_smtplib(relay: relayproc.RelayProcess, sink: sinkmod.Sink,
                               certificate: tuple[pathlib.Path, pathlib.Path]) -> None:
    host, port = relay.smtp_address
    msg_id, content = message("tls")
    with smtplib.SMTP(host, port) as client:
        client._host = HOSTNAME  # type: ignore[attr-defined]  # verify against the name, not the address
        client.ehlo()
        assert client.has_extn("starttls")
        code, _ = client.starttls(context=client_context(certificate[0]))
        assert code == 220
        client.ehlo()
        assert not client.has_extn("starttls")  # not offered twice
        assert client.sock is not None and isinstance(client.sock, ssl.SSLSocket)
        client.sendmail("a@client.test", ["b@dest.test"], content)
    waiting.wait_until(lambda: any(msg_id.encode() in m.content for m in sink.messages),
                       what='any(msg_id.encode() in m.content for m in sink.messages)')


def test_starttls_discards_pipelined_plaintext(relay: relayproc.RelayProcess,
                                               certificate: tuple[pathlib.Path, pathlib.Path]) -> None:
    w = smtpwire.Wire(relay.smtp_address)
    try:
        w.ehlo()
        w.send(b"STARTTLS\r\nMAIL FROM:<injected@attacker.test>\r\n")  # RFC 3207 command injection
        assert w.reply() == (220, ["2.0.0 Ready to start TLS"])
        tls = client_context(certificate[0]).wrap_socket(w.sock, server_hostname=HOSTNAME)
        reader = tls.makefile("rb")
        tls.sendall(b"MAIL FROM:<a@client.test>\r\n")
        # had the injected MAIL been kept, this would be "503 nested MAIL" or its 250 would come first
        assert reader.readline() == b"503 5.5.1 Error: send HELO/EHLO first\r\n"
        tls.sendall(b"EHLO client.test\r\n")
        lines = []
        while True:
            line = reader.readline()
            lines.append(line)
            if line[3:4] == b" ":
                break
        assert all(b"STARTTLS" not in line for line in lines)
        tls.sendall(b"STARTTLS\r\n")
        assert reader.readline() == b"503 5.5.1 Error: TLS already active\r\n"
        tls.close()
    finally:
        w.close()


def test_failed_handshake_closes_only_that_session(relay: relayproc.RelayProcess) -> None:
    w = smtpwire.Wire(relay.smtp_address)
    try:
        w.ehlo()
        assert w.cmd("STARTTLS")[0] == 220
        w.send(b"this is not a TLS client hello\r\n" * 10)
        assert w.closed()
    finally:
        w.close()
    with socket.create_connection(relay.smtp_address, timeout=20) as sock:
        assert sock.makefile("rb").readline().startswith(b"220 ")
    assert relay.status()["sessions"] <= 1
