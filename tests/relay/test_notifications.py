"""Delivery status notifications, SMTPUTF8 and DSN through real peers: a relay process, its upstream a
recording sink (SMTPUTF8, no DSN) or Postfix's smtp-sink (DSN, no SMTPUTF8), the client smtplib.

- A recipient the upstream refuses for good: the sender gets an RFC 3464 report (parsed with Python's
  `email` package), from <>, through the same upstream; the message's dead-letter copy stays.
- No notification for a message from <> or for NOTIFY=NEVER: a sentinel message that must be reported
  is sent after it, and once the sentinel's report has arrived the other is known absent.
- A notification that itself cannot be delivered is dead-lettered, and nothing more is sent.
- NOTIFY=SUCCESS through an upstream without DSN: the relay reports "relayed" itself; through smtp-sink,
  which offers DSN, NOTIFY, ORCPT, RET and ENVID are passed on instead and the relay reports nothing.
- SMTPUTF8: a UTF-8 address reaches an upstream that offers SMTPUTF8; an upstream without it makes the
  message fail for good (5.6.7), and the sender hears of it.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import pathlib
import smtplib
import uuid
from collections.abc import Iterator

import pytest
from mailrelay_relay import spool
from mailrelay_sandbox import netutil, relayproc, waiting
from mailrelay_sandbox import sink as sinkmod

from tests.relay.delivery_harness import SmtpSink
from tests.relay.relay_harness import start_relay

WAIT = 60.0
SENDER = "sender@client.test"
REFUSED = "gone@dest.test"


@pytest.fixture
def upstream(sink: sinkmod.Sink) -> Iterator[sinkmod.Sink]:
    sink.reset()
    sink.clear_failures()
    sink.fail("rcpt", 550, "5.1.1 No such user here", recipients={REFUSED})
    yield sink
    sink.clear_failures()


def message(subject: str) -> tuple[str, bytes]:
    msg_id = f"<{uuid.uuid4().hex}@client.test>"
    return msg_id, (f"From: {SENDER}\r\nTo: someone@dest.test\r\nSubject: {subject}\r\n"
                    f"Message-ID: {msg_id}\r\n\r\nhello\r\n").encode("ascii")


def send(relay: relayproc.RelayProcess, sender: str, recipients: list[str], content: bytes,
         mail_options: tuple[str, ...] = (), rcpt_options: tuple[str, ...] = ()) -> None:
    with smtplib.SMTP(*relay.smtp_address, timeout=30) as client:
        client.ehlo("client.test")
        refused = client.sendmail(sender, recipients, content, list(mail_options), list(rcpt_options))
        assert refused == {}


def notifications(sink: sinkmod.Sink) -> list[tuple[sinkmod.Received, email.message.EmailMessage]]:
    out = []
    for m in sink.messages:
        if m.mail_from == "":
            parsed = email.message_from_bytes(m.content, policy=email.policy.default)
            assert isinstance(parsed, email.message.EmailMessage)
            out.append((m, parsed))
    return out


def report_of(notice: email.message.EmailMessage) -> tuple[list[dict[str, str]], email.message.Message]:
    """(per-recipient fields, the returned part) of an RFC 3464 report."""
    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    parts = list(notice.iter_parts())
    assert [p.get_content_type() for p in parts][:2] == ["text/plain", "message/delivery-status"]
    status = parts[1]
    groups = status.get_payload()
    assert isinstance(groups, list) and len(groups) >= 2
    assert str(groups[0]["Reporting-MTA"]).startswith("dns; ")
    recipients = [{k: str(v) for k, v in g.items()} for g in groups[1:]]
    return recipients, parts[2]


def wait_for_notices(sink: sinkmod.Sink, n: int) -> list[tuple[sinkmod.Received, email.message.EmailMessage]]:
    waiting.wait_until(lambda: len(notifications(sink)) >= n, within=WAIT)
    return notifications(sink)


def dead_letters(relay: relayproc.RelayProcess) -> list[pathlib.Path]:
    return sorted((relay.spool / "deadletter").glob("*.msg"))


def test_a_refused_recipient_is_reported_to_the_sender(relay: relayproc.RelayProcess,
                                                       upstream: sinkmod.Sink) -> None:
    before = len(dead_letters(relay))
    msg_id, content = message("bounce")
    send(relay, SENDER, ["ok@dest.test", REFUSED], content)
    [(received, notice)] = wait_for_notices(upstream, 1)
    assert received.rcpt_tos == (SENDER,)
    assert notice["To"].addresses[0].addr_spec == SENDER and notice["Auto-Submitted"] == "auto-replied"
    recipients, returned = report_of(notice)
    assert recipients == [{"Final-Recipient": f"rfc822; {REFUSED}", "Action": "failed", "Status": "5.1.1",
                           "Diagnostic-Code": "smtp; 550 5.1.1 No such user here"}]
    assert returned.get_content_type() == "message/rfc822"
    assert msg_id in returned.as_string()
    delivered = [m for m in upstream.messages if m.mail_from == SENDER]
    assert [m.rcpt_tos for m in delivered] == [("ok@dest.test",)]
    assert len(dead_letters(relay)) == before + 1  # the copy stays for the operator


@pytest.mark.parametrize(("sender", "rcpt_options"), [("", ()), (SENDER, ("NOTIFY=NEVER",))],
                         ids=["null sender", "NOTIFY=NEVER"])
def test_no_notification_where_none_is_wanted(relay: relayproc.RelayProcess, upstream: sinkmod.Sink,
                                              sender: str, rcpt_options: tuple[str, ...]) -> None:
    _, quiet = message("must not be reported")
    send(relay, sender, [REFUSED], quiet, rcpt_options=rcpt_options)
    sentinel_id, sentinel = message("sentinel: must be reported")
    send(relay, SENDER, [REFUSED], sentinel)
    [(_, notice)] = wait_for_notices(upstream, 1)
    _, returned = report_of(notice)
    assert sentinel_id in returned.as_string()  # the one report is the sentinel's


def test_a_notification_that_fails_is_dead_lettered_once(relay: relayproc.RelayProcess,
                                                         upstream: sinkmod.Sink) -> None:
    before = len(dead_letters(relay))
    upstream.fail("rcpt", 550, "5.1.1 No such user here", recipients={"lost@client.test"})
    _, content = message("both fail")
    send(relay, "lost@client.test", [REFUSED], content)
    waiting.wait_until(lambda: len(dead_letters(relay)) == before + 2, within=WAIT)
    waiting.wait_until(lambda: relay.status()["queue"]["messages"] == 0, within=WAIT)
    senders = sorted(spool.decode_record(p.read_bytes())[1].mail_from for p in dead_letters(relay)[-2:])
    assert senders == ["", "lost@client.test"]
    assert len(dead_letters(relay)) == before + 2 and notifications(upstream) == []


def test_notify_success_through_an_upstream_without_dsn_is_relayed(relay: relayproc.RelayProcess,
                                                                   upstream: sinkmod.Sink) -> None:
    msg_id, content = message("tell me it went")
    send(relay, SENDER, ["ok@dest.test"], content, mail_options=("RET=HDRS", "ENVID=QQ314159"),
         rcpt_options=("NOTIFY=SUCCESS", "ORCPT=rfc822;ok+40dest.test"))
    [(_, notice)] = wait_for_notices(upstream, 1)
    recipients, returned = report_of(notice)
    assert recipients[0]["Action"] == "relayed" and recipients[0]["Status"] == "2.0.0"
    assert recipients[0]["Original-Recipient"] == "rfc822; ok@dest.test"
    assert returned.get_content_type() == "text/rfc822-headers"  # RET=HDRS
    parts = list(notice.iter_parts())
    assert str(parts[1].get_payload()[0]["Original-Envelope-Id"]) == "QQ314159"
    original = [m for m in upstream.messages if m.mail_from == SENDER]
    assert len(original) == 1 and msg_id.encode() in original[0].content
    assert original[0].mail_options == ()  # the upstream has no DSN: nothing of it passed on


def test_dsn_parameters_are_passed_to_an_upstream_that_offers_dsn(tmp_path: pathlib.Path) -> None:
    smtp_sink = SmtpSink(netutil.free_port())
    relay = start_relay(tmp_path, f"127.0.0.1:{smtp_sink.port}")
    try:
        _, content = message("dsn passed on")
        send(relay, SENDER, ["ok@dest.test"], content, mail_options=("RET=HDRS", "ENVID=QQ314159"),
             rcpt_options=("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;ok+40dest.test"))
        waiting.wait_until(lambda: len(smtp_sink.files()) == 1, within=WAIT)
        waiting.wait_until(lambda: relay.status()["queue"]["messages"] == 0, within=WAIT)
        dump = smtp_sink.files()[0].read_text(errors="replace")
        mail_args = [line for line in dump.splitlines() if line.startswith("X-Mail-Args:")]
        rcpt_args = [line for line in dump.splitlines() if line.startswith("X-Rcpt-Args:")]
        assert mail_args and "RET=HDRS" in mail_args[0] and "ENVID=QQ314159" in mail_args[0], dump[:500]
        assert rcpt_args and "NOTIFY=SUCCESS,FAILURE" in rcpt_args[0], dump[:500]
        assert "ORCPT=rfc822;ok+40dest.test" in rcpt_args[0], dump[:500]
        assert len(smtp_sink.files()) == 1  # no "relayed" report: the upstream took NOTIFY on
    finally:
        relay.kill()
        smtp_sink.stop()


def test_smtputf8_reaches_an_upstream_that_offers_it(relay: relayproc.RelayProcess,
                                                     upstream: sinkmod.Sink) -> None:
    content = "From: üser@exämple.com\r\nSubject: ünïcode\r\n\r\nhallo\r\n".encode()
    send(relay, "üser@exämple.com", ["rëcipient@dest.test"], content, mail_options=("SMTPUTF8",))
    assert upstream.wait_for(1, timeout=WAIT)
    [got] = upstream.messages
    assert got.mail_from == "üser@exämple.com" and got.rcpt_tos == ("rëcipient@dest.test",)
    assert "SMTPUTF8" in got.mail_options and got.content == content


def test_smtputf8_through_an_upstream_without_it_fails_and_is_reported(
    tmp_path: pathlib.Path, sink: sinkmod.Sink,
) -> None:
    """smtp-sink offers no SMTPUTF8: the message fails for good (5.6.7); the report goes out through
    the same upstream, and smtp-sink keeps it."""
    smtp_sink = SmtpSink(netutil.free_port())
    relay = start_relay(tmp_path, f"127.0.0.1:{smtp_sink.port}")
    try:
        content = b"From: sender@client.test\r\nSubject: x\r\n\r\nhallo\r\n"
        send(relay, SENDER, ["rëcipient@dest.test"], content, mail_options=("SMTPUTF8",))
        waiting.wait_until(lambda: len(smtp_sink.files()) == 1, within=WAIT)
        dump = smtp_sink.files()[0].read_bytes()
        body = dump[dump.index(b"\n\n") + 2:] if b"\n\n" in dump else dump
        assert b"Status: 5.6.7" in body and b"Action: failed" in body
        assert b"message/global-delivery-status" in body  # a UTF-8 recipient: RFC 6533's types
        assert len(dead_letters(relay)) == 1
        # now the relay knows its upstream lacks SMTPUTF8: the next such MAIL is refused for now (455),
        # so the client keeps the message instead of getting it back
        with smtplib.SMTP(*relay.smtp_address, timeout=30) as client:
            client.ehlo("client.test")
            assert client.mail(SENDER, ["SMTPUTF8"]) == (
                455, b"4.3.3 Error: SMTPUTF8 is not available upstream now, try again later")
            assert client.mail(SENDER)[0] == 250
    finally:
        relay.kill()
        smtp_sink.stop()


def test_a_delay_warning_is_sent_once(tmp_path: pathlib.Path, upstream: sinkmod.Sink) -> None:
    """--delay-warning-time: a message still deferred after it gets one "delayed" report; once the
    upstream takes it, it arrives, and the report was the only one."""
    upstream.fail("rcpt", 451, "4.2.0 Try again later", recipients={"slow@dest.test"})
    relay = start_relay(tmp_path, upstream.address, args=["--delay-warning-time", "1"])
    try:
        msg_id, content = message("slow")
        send(relay, SENDER, ["slow@dest.test"], content)
        [(_, notice)] = wait_for_notices(upstream, 1)
        recipients, _ = report_of(notice)
        assert recipients[0]["Action"] == "delayed"
        assert recipients[0]["Final-Recipient"] == "rfc822; slow@dest.test"
        assert "451 4.2.0 Try again later" in recipients[0]["Diagnostic-Code"]
        upstream.clear_failures()
        waiting.wait_until(lambda: any(msg_id.encode() in m.content for m in upstream.messages
                                      if m.mail_from == SENDER), within=WAIT)
        assert len(notifications(upstream)) == 1
    finally:
        relay.kill()
