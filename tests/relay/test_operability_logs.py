"""Delivery deferrals in the relay's JSON log at the default level: an upstream that keeps failing
(an unverifiable certificate, a 4xx) leaves warning lines, rate-limited per kind of failure with the
count of those left out, and never message content or full addresses. Checked on a real relay's log;
the rate limiter and the redaction also on their own."""

from __future__ import annotations

import datetime
import itertools
import pathlib
import smtplib
import subprocess
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailrelay_relay import logs
from mailrelay_sandbox import relayproc, waiting
from mailrelay_sandbox import sink as sinkmod

from tests.conftest import require_tool
from tests.relay import relay_harness

SENDER = "secret.sender@client.test"
RCPT = "secret.rcpt@dest.test"
MARKER = "CONTENT-MARKER-7f3a"
WAIT = 60.0


def send_some(relay: relayproc.RelayProcess, n: int) -> None:
    content = (f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: {MARKER}\r\n\r\n{MARKER} body\r\n").encode()
    with smtplib.SMTP(*relay.smtp_address, timeout=30) as client:
        for _ in range(n):
            client.sendmail(SENDER, [RCPT], content)


def deferrals(relay: relayproc.RelayProcess) -> list[dict[str, Any]]:
    return [e for e in relay.log_events() if e.get("event") == "delivery.deferred"]


def attempts(relay: relayproc.RelayProcess, result: str) -> float:
    for line in relay.metrics().splitlines():
        if line.startswith(f'mailrelay_relay_delivery_attempts_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


def assert_nothing_private(relay: relayproc.RelayProcess) -> None:
    text = relay.log_text()
    for secret in ("secret.sender", "secret.rcpt", MARKER):
        assert secret not in text


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    openssl = require_tool("openssl")
    d = tmp_path_factory.mktemp("self-signed")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=upstream.test",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def test_unverifiable_upstream_certificate_is_logged_once_at_warning(
        tmp_path: pathlib.Path, self_signed: tuple[str, str]) -> None:
    cert, key = self_signed
    with sinkmod.running(tls="starttls", certfile=cert, keyfile=key) as sink:
        relay = relay_harness.start_relay(tmp_path, sink.address, args=["--upstream-tls", "starttls"])
        try:
            send_some(relay, 3)
            # Several failed attempts (each message is tried again after ~1 s), all within the 60 s
            # default interval.
            waiting.wait_until(lambda: attempts(relay, "connection_error") >= 5, within=WAIT,
                               what='attempts(relay, "connection_error") >= 5')
            events = deferrals(relay)
        finally:
            relay.kill()
        assert sink.count == 0
    assert len(events) == 1, events
    event = events[0]
    assert event["level"] == "warning" and event["logger"] == "mailrelay.delivery"
    assert event["kind"] == "connection SSLCertVerificationError"
    assert "certificate verify failed" in event["reason"]
    assert event["suppressed"] == 0 and event["attempts"] == 1
    assert_nothing_private(relay)


def test_upstream_4xx_is_logged_rate_limited_with_the_count_left_out(tmp_path: pathlib.Path) -> None:
    with sinkmod.running() as sink:
        # The upstream's reply names the recipient: the log must not.
        sink.fail("rcpt", 450, f"4.2.2 <{RCPT}>: mailbox full")
        relay = relay_harness.start_relay(tmp_path, sink.address, args=["--deferral-log-interval", "1"])
        try:
            send_some(relay, 3)
            waiting.wait_until(lambda: any(e["suppressed"] for e in deferrals(relay)[1:]), within=WAIT,
                               what='any(e["suppressed"] for e in deferrals(relay)[1:])')
            events = deferrals(relay)
            temporary = attempts(relay, "temporary")
        finally:
            relay.kill()
    assert events and all(e["level"] == "warning" for e in events)
    assert {e["kind"] for e in events} == {"recipients 450"}
    assert events[0]["suppressed"] == 0
    expected = "1 recipient(s) deferred: 450 4.2.2 <*@dest.test>: mailbox full"
    assert all(e["reason"] == expected for e in events)
    # One line per second at most, and every deferral is either a line or counted in the next one.
    times = [datetime.datetime.fromisoformat(e["ts"].replace("Z", "+00:00")) for e in events]
    assert all((b - a).total_seconds() >= 0.99 for a, b in itertools.pairwise(times))
    assert len(events) + sum(e["suppressed"] for e in events) <= temporary
    assert len(events) < temporary
    assert_nothing_private(relay)


@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 5)), max_size=60),
       st.sampled_from([0.0, 0.5, 1.0, 10.0]))
def test_rate_limiter_writes_one_line_per_key_per_interval_and_counts_the_rest(
        steps: list[tuple[str, float]], interval: float) -> None:
    limiter = logs.RateLimiter(interval)
    now = 0.0
    written: dict[str, list[float]] = {}
    calls: dict[str, int] = {}
    counted: dict[str, int] = {}
    for key, step in steps:
        now += step
        calls[key] = calls.get(key, 0) + 1
        result = limiter.allow(key, now)
        if result is not None:
            written.setdefault(key, []).append(now)
            counted[key] = counted.get(key, 0) + result
    for key, n in calls.items():
        lines = written.get(key, [])
        assert lines, "the first deferral of a kind is always written"
        assert all(b - a >= interval for a, b in itertools.pairwise(lines))
        # What is not written is counted in a later line, or still pending.
        assert counted.get(key, 0) <= n - len(lines)
    if interval == 0.0:
        assert sum(len(v) for v in written.values()) == len(steps)


def test_rate_limiter_forgets_the_oldest_key_beyond_its_bound() -> None:
    limiter = logs.RateLimiter(60.0, max_keys=2)
    assert limiter.allow("a", 0.0) == 0 and limiter.allow("a", 1.0) is None
    assert limiter.allow("b", 1.0) == 0 and limiter.allow("c", 1.0) == 0  # "a" is forgotten
    assert limiter.allow("a", 2.0) == 0 and limiter.allow("c", 3.0) is None
    assert limiter.allow("c", 61.5) == 1


@pytest.mark.parametrize(("text", "expected"), [
    ("450 4.2.2 <bob.smith@example.org>: mailbox full", "450 4.2.2 <*@example.org>: mailbox full"),
    ('550 "john doe"@example.org and a@[192.0.2.1]', "550 *@example.org and *@[192.0.2.1]"),
    ("line\r\nbreak\x00", "line break "),
    ("no address at all: 421 4.3.2 busy", "no address at all: 421 4.3.2 busy"),
])
def test_redact_cuts_local_parts_and_control_characters(text: str, expected: str) -> None:
    assert logs.redact(text) == expected


def test_redact_bounds_the_length() -> None:
    assert len(logs.redact("x" * 1000, 200)) == 200
