"""SMTP conformance on the wire: parameters, addresses and commands, each line sent to a real relay process
inside a transaction after EHLO, with the exact reply expected. The table holds the lines where the relay
once differed from Postfix 3.7 as a loopback relay (SMTPUTF8 and DSN parameters answered 455, BINARYMIME
455 instead of 555, malformed DSN values 455 instead of 501, a repeated parameter blamed on the address,
an IPv4 literal past 255 accepted, VRFY without an argument answered 252, HELP listing STARTTLS it did not
offer) and the neighbours that pin the intent: 555 for what the relay never offers, 501 5.5.4 for a
malformed or repeated parameter, 553 5.6.7 for a UTF-8 address without SMTPUTF8.
"""

from __future__ import annotations

import pytest
from mailrelay_sandbox import relayproc, smtpwire

MAIL = "MAIL FROM:<s@example.com>"

# (commands sent first, the command, the reply's code and enhanced status)
TABLE: list[tuple[tuple[str, ...], str, str]] = [
    # SMTPUTF8 and DSN are offered and relayed
    ((), f"{MAIL} SMTPUTF8", "250 2.1.0"),
    ((), f"{MAIL} RET=HDRS ENVID=QQ314159", "250 2.1.0"),
    ((), f"{MAIL} RET=FULL", "250 2.1.0"),
    ((MAIL,), "RCPT TO:<r@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;r@example.com", "250 2.1.5"),
    ((MAIL,), "RCPT TO:<r@example.com> NOTIFY=NEVER", "250 2.1.5"),
    ((MAIL,), "RCPT TO:<r@example.com> NOTIFY=DELAY,SUCCESS,FAILURE", "250 2.1.5"),
    ((MAIL,), "RCPT TO:<r@example.com> ORCPT=rfc822;r+40example.com", "250 2.1.5"),
    # never offered: 555, not a 455 a client would retry for days
    ((), f"{MAIL} BODY=BINARYMIME", "555 5.5.4"),
    ((), f"{MAIL} REQUIRETLS", "555 5.5.4"),
    ((), f"{MAIL} MT-PRIORITY=3", "555 5.5.4"),
    ((), f"{MAIL} FOO=1", "555 5.5.4"),
    ((MAIL,), "RCPT TO:<r@example.com> RRVS=2030-01-01T00:00:00Z", "555 5.5.4"),
    # malformed, or given twice: 501 5.5.4 (the parameter's fault, not the address's)
    ((), f"{MAIL} RET=FOO", "501 5.5.4"),
    ((), f"{MAIL} RET=FULL RET=HDRS", "501 5.5.4"),
    ((), f"{MAIL} SMTPUTF8=yes", "501 5.5.4"),
    ((), f"{MAIL} ENVID=a=b", "501 5.5.4"),
    ((), f"{MAIL} ENVID={'x' * 101}", "501 5.5.4"),
    ((), f"{MAIL} BODY=9BIT", "501 5.5.4"),
    ((), f"{MAIL} SIZE=1 SIZE=2", "501 5.5.4"),
    ((MAIL,), "RCPT TO:<r@example.com> NOTIFY=NEVER,SUCCESS", "501 5.5.4"),
    ((MAIL,), "RCPT TO:<r@example.com> NOTIFY=FOO", "501 5.5.4"),
    ((MAIL,), "RCPT TO:<r@example.com> NOTIFY=SUCCESS,SUCCESS", "501 5.5.4"),
    ((MAIL,), "RCPT TO:<r@example.com> ORCPT=foo", "501 5.5.4"),
    ((MAIL,), "RCPT TO:<r@example.com> ORCPT=rfc822;a+zz", "501 5.5.4"),
    ((MAIL,), "RCPT TO:<r@example.com> NOTIFY=NEVER NOTIFY=NEVER", "501 5.5.4"),
    # address literals: each IPv4 number 0-255, IPv6 after "IPv6:" (RFC 5321 section 4.1.3)
    ((), "MAIL FROM:<user@[300.1.1.1]>", "501 5.1.7"),
    ((), "MAIL FROM:<user@[1.2.3]>", "501 5.1.7"),
    ((), "MAIL FROM:<user@[IPv6:1::2::3]>", "501 5.1.7"),
    ((), "MAIL FROM:<user@[192.0.2.255]>", "250 2.1.0"),
    ((), "MAIL FROM:<user@[IPv6:2001:db8::1]>", "250 2.1.0"),
    ((MAIL,), "RCPT TO:<user@[256.0.0.1]>", "501 5.1.3"),
    ((MAIL,), "RCPT TO:<user@[IPv6:2001:db8::1]>", "250 2.1.5"),
    # UTF-8 addresses need SMTPUTF8 (RFC 6531 section 3.2)
    ((), "MAIL FROM:<üser@exämple.com> SMTPUTF8", "250 2.1.0"),
    ((), "MAIL FROM:<üser@exämple.com>", "553 5.6.7"),
    ((f"{MAIL} SMTPUTF8",), "RCPT TO:<rëcipient@exämple.com>", "250 2.1.5"),
    ((MAIL,), "RCPT TO:<rëcipient@exämple.com>", "553 5.6.7"),
    # commands
    ((), "VRFY", "501 5.5.4"),
    ((), "VRFY postmaster", "252 2.0.0"),
    ((), "HELO", "501 5.5.4"),
]


def send(wire: smtpwire.Wire, line: str) -> str:
    """One command line (UTF-8 where it is not ASCII); the last reply line as on the wire."""
    wire.send(line.encode("utf-8") + b"\r\n")
    code, lines = wire.reply()
    return f"{code} {lines[-1] if lines else ''}"


@pytest.mark.parametrize(("before", "command", "expected"), TABLE)
def test_reply(relay: relayproc.RelayProcess, before: tuple[str, ...], command: str, expected: str) -> None:
    wire = smtpwire.Wire(relay.smtp_address, source="127.0.0.1")
    try:
        wire.ehlo()
        for line in before:
            assert send(wire, line).startswith("250 "), line
        assert send(wire, command).startswith(expected + " "), command
        assert wire.cmd("NOOP")[0] == 250  # the session goes on
    finally:
        wire.close()


def test_ehlo_offers_smtputf8_and_dsn(relay: relayproc.RelayProcess) -> None:
    wire = smtpwire.Wire(relay.smtp_address, source="127.0.0.1")
    try:
        features = wire.ehlo()[1:]
        assert "SMTPUTF8" in features and "DSN" in features
        assert "STARTTLS" not in features
    finally:
        wire.close()


def test_help_lists_only_what_is_offered(relay: relayproc.RelayProcess) -> None:
    """Without a certificate STARTTLS is neither in EHLO nor in HELP."""
    wire = smtpwire.Wire(relay.smtp_address, source="127.0.0.1")
    try:
        wire.ehlo()
        code, text = wire.cmd("HELP")
        assert code == 214 and "MAIL" in text.split() and "STARTTLS" not in text.split()
    finally:
        wire.close()
