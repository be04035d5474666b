"""The pure notification rules and builder (mailrelay_relay.dsn): who wants to hear of what, the
enhanced status of an upstream reply, and a report that Python's `email` package parses back into the
same facts, for any recipients and diagnostics hypothesis draws."""

from __future__ import annotations

import email
import email.message
import email.policy

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailrelay_relay import dsn

ORIGINAL = b"From: a@client.test\r\nSubject: hi\r\nMessage-ID: <m1@client.test>\r\n\r\nbody line\r\n"


@pytest.mark.parametrize(
    ("action", "options", "wanted"),
    [
        ("failed", (), True),  # no NOTIFY: failures only
        ("delayed", (), False),
        ("relayed", (), False),
        ("failed", ("NOTIFY=NEVER",), False),
        ("failed", ("NOTIFY=SUCCESS",), False),
        ("relayed", ("NOTIFY=SUCCESS",), True),
        ("failed", ("NOTIFY=SUCCESS,FAILURE",), True),
        ("delayed", ("NOTIFY=DELAY", "ORCPT=rfc822;x"), True),
        ("failed", ("ORCPT=rfc822;x",), True),
    ],
)
def test_wanted(action: dsn.Action, options: tuple[str, ...], wanted: bool) -> None:
    assert dsn.wanted(action, options) is wanted


@pytest.mark.parametrize(
    ("code", "text", "status"),
    [
        (550, "5.1.1 No such user", "5.1.1"),
        (550, "No such user", "5.0.0"),
        (452, "4.5.3 Too many recipients", "4.5.3"),
        (550, "4.5.3 mismatched class", "5.0.0"),
        (554, "5.7.1", "5.7.1"),
        (553, "5.6.7 upstream does not offer SMTPUTF8", "5.6.7"),
    ],
)
def test_status_of(code: int, text: str, status: str) -> None:
    assert dsn.status_of(code, text) == status


def test_no_notice_for_the_null_sender() -> None:
    assert not dsn.needs_notice("")
    assert dsn.needs_notice("a@client.test")


def parse(content: bytes) -> email.message.EmailMessage:
    parsed = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


@pytest.mark.parametrize(("mail_options", "size", "returned_type"), [
    ((), 0, "message/rfc822"),
    (("RET=HDRS",), 0, "text/rfc822-headers"),
    (("RET=FULL",), dsn.RETURN_LIMIT + 1, "text/rfc822-headers"),  # too large: its header alone
])
def test_what_is_returned(mail_options: tuple[str, ...], size: int, returned_type: str) -> None:
    original = ORIGINAL + b"x" * size
    row = dsn.Recipient("b@dest.test", "failed", "5.1.1", "550 5.1.1 no")
    notice = dsn.build(reporting_mta="relay.test", envelope_sender="a@client.test",
                       mail_options=mail_options, arrival=0.0, recipients=[row], original=original, now=10.0,
                       message_id="q1.failed")
    parts = list(parse(notice.content).iter_parts())
    assert parts[2].get_content_type() == returned_type
    whole = returned_type != "text/rfc822-headers"
    assert b"Subject: hi" in notice.content and (b"body line" in notice.content) == whole


addresses = st.from_regex(r"[a-z0-9.]{1,20}@[a-z]{1,10}\.test", fullmatch=True)
diagnostics = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FF, exclude_characters="\r\n"),
                      max_size=200)


@given(st.lists(st.tuples(addresses, diagnostics), min_size=1, max_size=5),
       st.sampled_from(["failed", "relayed"]))
def test_the_report_parses_back(recipients: list[tuple[str, str]], action: dsn.Action) -> None:
    rows = [dsn.Recipient(a, action, "5.1.1" if action == "failed" else "2.0.0", f"550 {d}")
            for a, d in recipients]
    notice = dsn.build(reporting_mta="relay.test", envelope_sender="a@client.test", mail_options=(),
                       arrival=0.0, recipients=rows, original=ORIGINAL, now=10.0, message_id="q1")
    assert notice.content.isascii() and not notice.eight_bit and not notice.smtputf8
    assert all(len(line) <= 998 for line in notice.content.split(b"\r\n"))
    parsed = parse(notice.content)
    assert parsed.get_content_type() == "multipart/report"
    status = list(parsed.iter_parts())[1]
    groups = status.get_payload()
    assert isinstance(groups, list)
    assert [str(g["Final-Recipient"]) for g in groups[1:]] == [f"rfc822; {a}" for a, _ in recipients]
    assert {str(g["Action"]) for g in groups[1:]} == {action}


def test_utf8_addresses_use_the_global_types() -> None:
    row = dsn.Recipient("rë@dest.test", "failed", "5.6.7", "553 5.6.7 x")
    notice = dsn.build(reporting_mta="relay.test", envelope_sender="üser@exämple.test", mail_options=(),
                       arrival=0.0, recipients=[row], original=ORIGINAL, now=10.0, message_id="q1")
    assert notice.smtputf8 and notice.eight_bit
    assert b"message/global-delivery-status" in notice.content
    assert "Final-Recipient: utf-8; rë@dest.test".encode() in notice.content


@pytest.mark.parametrize(("options", "wanted"), [((), True), (("NOTIFY=FAILURE",), False),
                                                 (("NOTIFY=DELAY",), True), (("NOTIFY=NEVER",), False)])
def test_delay_warnings_by_default_when_the_relay_sends_them(options: tuple[str, ...], wanted: bool) -> None:
    assert dsn.wanted("delayed", options, delays_by_default=True) is wanted
