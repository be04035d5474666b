"""Delivery status notifications: which recipients of a message the sender must hear about, and the
RFC 3464 report the relay mails to the sender for them.

What it is for: RFC 5321 section 6.1 says a relay that accepted a message and then cannot deliver it
must tell the sender. delivery.py asks `wanted` whether a recipient's NOTIFY parameter (RFC 3461) asks
for a notice of what happened to it, and `build` for the notification: a `multipart/report;
report-type=delivery-status` message, from the null reverse-path, to the message's envelope sender,
with a human-readable part, the machine-readable status per recipient and the original message (whole,
or its header alone when RET=HDRS asks for that or it is larger than `RETURN_LIMIT`). A message whose
own sender is `<>` never gets one (no notification loops; `needs_notice`).

What it must not do: I/O, clock reads or logging; the time and every fact come in as arguments, and the
notification leaves as bytes that delivery.py spools like any other message.
"""

from __future__ import annotations

import dataclasses
import email.utils
import re
from collections.abc import Sequence
from typing import Literal

Action = Literal["failed", "delayed", "relayed"]

# Postfix's bounce_size_limit: a larger original is returned as its header alone.
RETURN_LIMIT = 50_000

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclasses.dataclass(frozen=True)
class Recipient:
    address: str
    action: Action
    status: str  # enhanced status code, e.g. "5.1.1"
    diagnostic: str  # the upstream's reply ("550 5.1.1 ...") or the relay's own reason
    options: tuple[str, ...] = ()  # the recipient's RCPT parameters as accepted (NOTIFY=..., ORCPT=...)


@dataclasses.dataclass(frozen=True)
class Notification:
    envelope_sender: str  # whom it goes to
    content: bytes
    smtputf8: bool  # its envelope needs SMTPUTF8 (a UTF-8 recipient: the original's sender)
    eight_bit: bool  # its content has 8-bit octets (BODY=8BITMIME)


def option(options: Sequence[str], keyword: str) -> str | None:
    """The value of `keyword` (e.g. "NOTIFY") among ESMTP parameters like ("NOTIFY=SUCCESS", ...)."""
    prefix = keyword.upper() + "="
    for item in options:
        if item.upper().startswith(prefix):
            return item[len(prefix):]
    return None


def wanted(action: Action, rcpt_options: Sequence[str], *, delays_by_default: bool = False) -> bool:
    """Does the recipient's NOTIFY ask to hear about `action`? Without NOTIFY: failures, and delays when
    the relay sends delay warnings (`delays_by_default`), as RFC 3461 section 4.1 lets a relay choose and
    Postfix does; NOTIFY=NEVER: nothing."""
    notify = option(rcpt_options, "NOTIFY")
    if notify is None:
        return action == "failed" or (action == "delayed" and delays_by_default)
    wants = {item.strip().upper() for item in notify.split(",")}
    return {"failed": "FAILURE", "delayed": "DELAY", "relayed": "SUCCESS"}[action] in wants


def needs_notice(envelope_sender: str) -> bool:
    """A notification goes only to a real sender: never to <> (a notification's own failure is final)."""
    return envelope_sender != ""


def status_of(code: int, text: str) -> str:
    """The enhanced status code of an upstream reply: the one it gives, else its class's generic one."""
    match = _STATUS.match(text.strip())
    if match and match.group(1) == str(code // 100):
        return match.group(0)
    return f"{code // 100}.0.0" if code // 100 in (4, 5) else "5.0.0"


def decode_xtext(text: str) -> str:
    """RFC 3461 section 4: "+XX" stands for the octet of hex XX."""
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def _clean(text: str) -> str:
    return _UNPRINTABLE.sub("?", text)[:900]


def _address_field(address: str) -> str:
    return f"utf-8; {address}" if not address.isascii() else f"rfc822; {address}"


def _header_of(content: bytes) -> bytes:
    end = content.find(b"\r\n\r\n")
    return content if end < 0 else content[:end + 2]


_SUMMARY = {
    "failed": ("Undelivered Mail Returned to Sender",
               "Your message could not be delivered to the recipients below. This is a permanent error:\n"
               "the relay has given up on them."),
    "delayed": ("Delayed Mail (still being retried)",
                "Your message has not yet been delivered to the recipients below. The relay keeps trying;\n"
                "you do not need to send it again."),
    "relayed": ("Successful Mail Delivery Report",
                "Your message was passed on to the next mail server, which does not report delivery\n"
                "itself, for the recipients below. You asked to hear about it (NOTIFY=SUCCESS)."),
}


def build(*, reporting_mta: str, envelope_sender: str, mail_options: Sequence[str], arrival: float,
          recipients: Sequence[Recipient], original: bytes, now: float, message_id: str) -> Notification:
    """The notification for `recipients` (all of one action) of a message from `envelope_sender`.

    `message_id` is the notification's own Message-ID local part; `mail_options` the original MAIL
    parameters (RET and ENVID are read from them)."""
    if not recipients:
        raise ValueError("a notification needs at least one recipient")
    action = recipients[0].action
    if any(r.action != action for r in recipients):
        raise ValueError("one notification reports one action")
    ret = (option(mail_options, "RET") or "").upper()
    envid = option(mail_options, "ENVID")
    # RFC 6533's global types where an address is UTF-8; the envelope needs SMTPUTF8 only for a UTF-8
    # sender (the notification's recipient); UTF-8 content alone needs 8BITMIME
    utf8 = not envelope_sender.isascii() or any(not r.address.isascii() for r in recipients)
    whole = ret != "HDRS" and len(original) <= RETURN_LIMIT
    returned = original if whole else _header_of(original)
    boundary = f"{message_id}/{reporting_mta}"
    subject, summary = _SUMMARY[action]
    listing = "\n".join(f"<{r.address}>: {_clean(r.diagnostic)}" for r in recipients)
    human = (f"This is the mail relay at {reporting_mta}.\n\n{summary}\n\n{listing}\n").replace("\n", "\r\n")

    per_message = [f"Reporting-MTA: dns; {reporting_mta}",
                   f"Arrival-Date: {email.utils.formatdate(arrival)}"]
    if envid is not None:
        per_message.insert(0, f"Original-Envelope-Id: {_clean(decode_xtext(envid))}")
    fields = ["\r\n".join(per_message)]
    for r in recipients:
        lines = []
        orcpt = option(r.options, "ORCPT")
        if orcpt is not None:
            kind, _, value = orcpt.partition(";")
            lines.append(f"Original-Recipient: {kind}; {_clean(decode_xtext(value))}")
        lines += [f"Final-Recipient: {_address_field(r.address)}", f"Action: {r.action}",
                  f"Status: {r.status}", f"Diagnostic-Code: smtp; {_clean(r.diagnostic)}"]
        fields.append("\r\n".join(lines))
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    if whole:
        returned_type = "message/global" if utf8 else "message/rfc822"
    else:
        returned_type = "message/global-headers" if utf8 else "text/rfc822-headers"

    header = "\r\n".join([
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{envelope_sender}>",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate(now)}",
        f"Message-ID: <{message_id}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ])
    text = (f"{header}\r\n\r\nThis is a MIME-encapsulated message.\r\n\r\n"
            f"--{boundary}\r\nContent-Description: Notification\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n\r\n{human}\r\n"
            f"--{boundary}\r\nContent-Description: Delivery report\r\nContent-Type: {status_type}\r\n\r\n"
            + "\r\n\r\n".join(fields) + "\r\n\r\n"
            f"--{boundary}\r\nContent-Description: Undelivered message\r\n"
            f"Content-Type: {returned_type}\r\n\r\n")
    tail = f"\r\n--{boundary}--\r\n".encode("ascii")
    body = returned if returned.endswith(b"\r\n") or not returned else returned + b"\r\n"
    content = text.encode("utf-8") + body + tail
    return Notification(envelope_sender=envelope_sender, content=content,
                        smtputf8=not envelope_sender.isascii(), eight_bit=any(b > 0x7F for b in content))
