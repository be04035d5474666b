"""The relay's SMTP reply policy (docs/relay.md, "Replies"), as pure functions of the command and the
relay's state.

What it is for: every decision about what to answer — the greeting under load or drain, MAIL/RCPT
parsing with our own ESMTP parameter handling, SIZE against the fixed maximum, the spool's free space
and the pod's in-flight bytes, recipients, relay access, DATA outcomes, timeouts — lives here, so it can
be tested with tables and hypothesis. smtp.py gathers the state, calls these and writes the reply.

What it must not do: I/O, clock reads, asyncio, logging. State and time come in as arguments.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import ipaddress
import re
from collections.abc import Sequence

from mailrelay_relay import wire

# A MAIL without SIZE reserves this much of --max-inflight-bytes (capped at --max-message-size).
DEFAULT_RESERVATION = 1024 * 1024
MAX_COMMAND_LINE = 2048  # octets including CRLF; RFC 5321 says 512, plus room for ESMTP parameters
MAX_TEXT_LINE = 1000  # octets including CRLF (RFC 5321 section 4.5.3.1.6)
MAX_BAD_COMMANDS = 10  # unknown or malformed commands before the session is closed
MAX_PATH = 256  # RFC 5321 section 4.5.3.1.3
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255


@dataclasses.dataclass(frozen=True)
class Reply:
    code: int
    status: str  # enhanced status code, "" when none applies (220, 354, EHLO)
    text: str
    close: bool = False  # close the connection after sending

    def line(self) -> str:
        if self.status:
            return f"{self.code} {self.status} {self.text}"
        return f"{self.code} {self.text}"

    def wire(self) -> bytes:
        return self.line().encode("ascii", "replace") + b"\r\n"


# --- session-level replies ------------------------------------------------------------------------------

class Greeting(enum.Enum):
    ACCEPTED = "accepted"
    REFUSED_BUSY = "refused_busy"
    REFUSED_DRAINING = "refused_draining"


def greeting(*, draining: bool, sessions: int, max_sessions: int, hostname: str) -> tuple[Greeting, Reply]:
    """At connect. `sessions` counts the pod's open sessions, not including this one."""
    if draining:
        return Greeting.REFUSED_DRAINING, shutting_down(hostname)
    if sessions >= max_sessions:
        return Greeting.REFUSED_BUSY, _busy_reply(hostname)
    return Greeting.ACCEPTED, _greeting_reply(hostname)


@functools.lru_cache(maxsize=64)
def shutting_down(hostname: str) -> Reply:
    return Reply(421, "4.3.2", f"{hostname} Service shutting down, try again later", close=True)


@functools.lru_cache(maxsize=64)
def timeout(hostname: str) -> Reply:
    return Reply(421, "4.4.2", f"{hostname} Error: timeout exceeded", close=True)


@functools.lru_cache(maxsize=64)
def too_many_errors(hostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many errors", close=True)


def drain_gate(*, draining: bool, verb: str, drain_transaction_used: bool, hostname: str) -> Reply | None:
    """While draining, a session greeted before the drain is still served: every command is answered as
    usual (EHLO, HELO, RSET, NOOP never get 421), and it may complete one transaction, the one in
    progress when the drain began or else the first one it starts after. The next MAIL after that gets
    421 4.3.2 and the session closes. `drain_transaction_used`: this session has had a transaction while
    the relay was draining. (New connections get their 421 at the greeting: `greeting`.)"""
    if draining and verb == "MAIL" and drain_transaction_used:
        return shutting_down(hostname)
    return None


@functools.lru_cache(maxsize=64)
def _greeting_reply(hostname: str) -> Reply:
    return Reply(220, "", f"{hostname} ESMTP mailrelay")


@functools.lru_cache(maxsize=64)
def _busy_reply(hostname: str) -> Reply:
    return Reply(421, "4.3.2", f"{hostname} Too busy, try again later", close=True)


def ehlo(hostname: str, *, max_message_size: int, starttls: bool) -> list[str]:
    """The EHLO reply lines (without CRLF)."""
    features = [hostname, "PIPELINING", f"SIZE {max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES",
                "SMTPUTF8", "DSN"]
    if starttls:
        features.append("STARTTLS")
    return [f"250-{item}" for item in features[:-1]] + [f"250 {features[-1]}"]


@functools.lru_cache(maxsize=64)
def helo(hostname: str) -> Reply:
    return Reply(250, "", hostname)


OK = Reply(250, "2.0.0", "Ok")
MAIL_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
BYE = Reply(221, "2.0.0", "Bye", close=True)
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: command line too long")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
START_TLS = Reply(220, "2.0.0", "Ready to start TLS")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
TLS_ALREADY = Reply(503, "5.5.1", "Error: TLS already active")


def vrfy(arg: str) -> Reply:
    """VRFY needs an argument (RFC 5321 section 4.1.1.6); the relay never verifies one (252)."""
    return VRFY if arg.strip() else syntax("VRFY address")


def help_reply(*, starttls: bool) -> Reply:
    """The commands this session may use: STARTTLS only where it is offered (a certificate, not yet TLS)."""
    verbs = "HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP" + (" STARTTLS" if starttls else "")
    return Reply(214, "2.0.0", f"Commands: {verbs}")


def unknown_command(verb: str) -> Reply:
    safe = "".join(ch for ch in verb[:16] if 32 < ord(ch) < 127)
    return Reply(500, "5.5.2", f"Error: command {safe!r} not recognized")


def syntax(usage: str, status: str = "5.5.4") -> Reply:
    return Reply(501, status, f"Syntax: {usage}")


IMPLEMENTED = {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP", "STARTTLS"}
NOT_OFFERED = {"BDAT", "EXPN", "TURN", "ETRN", "ATRN", "AUTH", "SEND", "SOML", "SAML"}


# --- addresses and ESMTP parameters ---------------------------------------------------------------------

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_UTF8 = "\u0080-\U0010ffff"  # RFC 6531: UTF8-non-ascii may stand in local parts and domain labels
_ATEXT_UTF8 = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{_UTF8}-]"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_QUOTED_UTF8 = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_LABEL_UTF8 = rf"[A-Za-z0-9{_UTF8}](?:[A-Za-z0-9{_UTF8}-]*[A-Za-z0-9{_UTF8}])?"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"


def _mailbox(atext: str, quoted: str, label: str) -> re.Pattern[str]:
    dot_string = rf"{atext}+(?:\.{atext}+)*"
    domain = rf"{label}(?:\.{label})*"
    return re.compile(rf"(?P<local>{dot_string}|{quoted})@(?P<domain>{domain}|{_LITERAL})")


_MAILBOX = _mailbox(_ATEXT, _QUOTED, _LABEL)
_MAILBOX_UTF8 = _mailbox(_ATEXT_UTF8, _QUOTED_UTF8, _LABEL_UTF8)
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_SOURCE_ROUTE = re.compile(rf"@{_DOMAIN}(?:,@{_DOMAIN})*:")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+")  # RFC 3461 section 4
_ATOM = re.compile(rf"{_ATEXT}+")

# What the relay offers. Anything else is never offered (555 5.5.4): a client that retried it as a 4xx
# would gain nothing. SMTPUTF8 (RFC 6531) and DSN (RFC 3461: RET, ENVID, NOTIFY, ORCPT) are relayed.
MAIL_PARAMS_OFFERED = {"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID"}
RCPT_PARAMS_OFFERED = {"NOTIFY", "ORCPT"}
MAX_ENVID = 100  # RFC 3461 section 4.4
MAX_ORCPT = 500  # RFC 3461 section 4.2


@dataclasses.dataclass(frozen=True)
class Path:
    address: str  # "" for the null reverse-path <>
    params: tuple[tuple[str, str | None], ...]  # (KEYWORD upper-cased, value or None)


class PathError(enum.Enum):
    ADDRESS = "address"  # the path: 501 5.1.7 at MAIL, 501 5.1.3 at RCPT
    PARAMETERS = "parameters"  # malformed or repeated parameters: 501 5.5.4


def parse_path(arg: str, keyword: str) -> Path | PathError:
    """Parse 'FROM:<a@b> P1 P2=v' (keyword 'FROM') or 'TO:<a@b> ...'. Non-ASCII addresses parse here;
    whether the transaction allows them (SMTPUTF8) is the caller's question."""
    text = arg.strip()
    if text[: len(keyword) + 1].upper() != keyword + ":":
        return PathError.ADDRESS
    text = text[len(keyword) + 1:].lstrip(" ")
    if text.startswith("<"):
        end = text.find(">")
        if end < 0:
            return PathError.ADDRESS
        inner, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(" "):
            return PathError.ADDRESS
    else:  # lenient: a bare address without angle brackets
        inner, _, rest = text.partition(" ")
        if not inner:
            return PathError.ADDRESS
    route = _SOURCE_ROUTE.match(inner)
    if route:
        inner = inner[route.end():]
    if inner and not valid_mailbox(inner) and not (keyword == "TO" and inner.lower() == "postmaster"):
        return PathError.ADDRESS
    params = parse_params(rest)
    if params is None:
        return PathError.PARAMETERS
    return Path(inner, params)


def valid_mailbox(address: str) -> bool:
    """A mailbox of RFC 5321 section 4.1.2, with RFC 6531's UTF-8 where it is not ASCII; an address
    literal must be a valid IPv4 address or `IPv6:` and a valid IPv6 address (section 4.1.3)."""
    if len(address.encode("utf-8")) > MAX_PATH - 2:
        return False
    match = (_MAILBOX if address.isascii() else _MAILBOX_UTF8).fullmatch(address)
    if match is None:
        return False
    local, domain = match.group("local"), match.group("domain")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART or len(domain.encode("utf-8")) > MAX_DOMAIN:
        return False
    return not domain.startswith("[") or valid_address_literal(domain[1:-1])


def valid_address_literal(text: str) -> bool:
    """The inside of `[...]`: IPv4 dotted quad (each number 0-255) or `IPv6:` and an IPv6 address."""
    try:
        if text[:5].upper() == "IPV6:":
            ipaddress.IPv6Address(text[5:])
        else:
            ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def parse_params(text: str) -> tuple[tuple[str, str | None], ...] | None:
    """ESMTP parameters; None when one is malformed or given twice."""
    params: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _KEYWORD.fullmatch(key) or (eq and not _VALUE.fullmatch(value)):
            return None
        upper = key.upper()
        if upper in seen:
            return None
        seen.add(upper)
        params.append((upper, value if eq else None))
    return tuple(params)


def valid_notify(value: str | None) -> bool:
    """NOTIFY=NEVER, or a list of SUCCESS, FAILURE and DELAY, each at most once (RFC 3461 section 4.1)."""
    if not value:
        return False
    items = [v.upper() for v in value.split(",")]
    if items == ["NEVER"]:
        return True
    return len(set(items)) == len(items) and set(items) <= {"SUCCESS", "FAILURE", "DELAY"}


def valid_orcpt(value: str | None) -> bool:
    """ORCPT=addr-type;xtext (RFC 3461 section 4.2)."""
    if not value or len(value) > MAX_ORCPT:
        return False
    addr_type, semi, original = value.partition(";")
    return bool(semi) and _ATOM.fullmatch(addr_type) is not None and _XTEXT.fullmatch(original) is not None


def _bad_param(key: str) -> Reply:
    return Reply(501, "5.5.4", f"Error: bad {key} parameter value")


def _unsupported(verb: str, key: str) -> Reply:
    return Reply(555, "5.5.4", f"Error: {verb} parameter {key} not supported")


NEED_SMTPUTF8 = Reply(553, "5.6.7", "Error: non-ASCII address needs SMTPUTF8")


@functools.lru_cache(maxsize=4096)
def may_relay(peer_ip: str | None,
              networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    """True when the client's address is inside one of the --accept-from networks (memoised: pure)."""
    if not peer_ip:
        return False
    try:
        address = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)


# --- MAIL -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MailContext:
    extended: bool  # the client said EHLO (ESMTP parameters allowed)
    greeted: bool  # HELO or EHLO seen
    in_transaction: bool  # a MAIL was already accepted
    max_message_size: int
    free_bytes: int  # free space on the spool's file system now
    inflight_bytes: int  # the pod's sum of reservations of open transactions
    max_inflight_bytes: int
    upstream_lacks_smtputf8: bool = False  # the upstream's last EHLO did not offer SMTPUTF8


@dataclasses.dataclass(frozen=True)
class MailDecision:
    reply: Reply
    accepted: bool = False
    mail_from: str = ""
    options: tuple[str, ...] = ()  # MAIL parameters to pass upstream
    reservation: int = 0  # bytes to add to the pod's in-flight sum

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.options


def _mail_option(key: str, value: str | None) -> str | Reply:
    """The option to keep for one offered MAIL parameter, or the reply refusing it."""
    if key == "BODY":
        body = (value or "").upper()
        if body == "BINARYMIME":  # needs CHUNKING, which the relay never offers
            return Reply(555, "5.5.4", "Error: BODY=BINARYMIME not supported")
        return f"BODY={body}" if body in ("7BIT", "8BITMIME") else _bad_param(key)
    if key == "SMTPUTF8":
        return "SMTPUTF8" if value is None else _bad_param(key)
    if key == "RET":
        ret = (value or "").upper()
        return f"RET={ret}" if ret in ("FULL", "HDRS") else _bad_param(key)
    # ENVID
    if value is None or len(value) > MAX_ENVID or _XTEXT.fullmatch(value) is None:
        return _bad_param(key)
    return f"ENVID={value}"


def decide_mail(arg: str | None, ctx: MailContext) -> MailDecision:
    if not ctx.greeted:
        return MailDecision(NEED_HELO)
    if ctx.in_transaction:
        return MailDecision(Reply(503, "5.5.1", "Error: nested MAIL command"))
    path = parse_path(arg or "", "FROM")
    if path is PathError.ADDRESS:
        return MailDecision(syntax("MAIL FROM:<address> [parameters]", "5.1.7"))
    if path is PathError.PARAMETERS:
        return MailDecision(Reply(501, "5.5.4", "Error: malformed or repeated MAIL parameter"))
    assert isinstance(path, Path)
    if path.params and not ctx.extended:
        return MailDecision(Reply(501, "5.5.4", "Error: parameters need EHLO"))
    size: int | None = None
    options: list[str] = []
    for key, value in path.params:
        if key not in MAIL_PARAMS_OFFERED:
            return MailDecision(_unsupported("MAIL", key))
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                return MailDecision(Reply(501, "5.5.4", "Error: bad SIZE value"))
            size = int(value)
            continue
        option = _mail_option(key, value)
        if isinstance(option, Reply):
            return MailDecision(option)
        options.append(option)
    if not path.address.isascii() and "SMTPUTF8" not in options:
        return MailDecision(NEED_SMTPUTF8)
    if "SMTPUTF8" in options and ctx.upstream_lacks_smtputf8:
        # offered, but impossible now: the message could only bounce; the client keeps it and retries
        return MailDecision(Reply(455, "4.3.3", "Error: SMTPUTF8 is not available upstream now, "
                                  "try again later"))
    if size is not None and size > ctx.max_message_size:
        return MailDecision(Reply(552, "5.3.4", "Error: message size exceeds fixed maximum message size"))
    reservation = size if size is not None else min(DEFAULT_RESERVATION, ctx.max_message_size)
    if ctx.free_bytes - ctx.inflight_bytes < reservation:
        return MailDecision(Reply(452, "4.3.1", "Error: insufficient system storage"))
    if ctx.inflight_bytes > 0 and ctx.inflight_bytes + reservation > ctx.max_inflight_bytes:
        return MailDecision(Reply(455, "4.3.2", "Error: too much mail in flight, try again later"))
    return MailDecision(
        MAIL_OK, accepted=True, mail_from=path.address, options=tuple(options),
        reservation=reservation,
    )


# --- RCPT -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RcptContext:
    extended: bool
    in_transaction: bool
    recipients: int  # accepted so far in this transaction
    max_recipients: int
    may_relay: bool
    smtputf8: bool = False  # the transaction's MAIL carried SMTPUTF8


@dataclasses.dataclass(frozen=True)
class RcptDecision:
    reply: Reply
    accepted: bool = False
    address: str = ""
    options: tuple[str, ...] = ()  # RCPT parameters to pass upstream (NOTIFY, ORCPT)


def decide_rcpt(arg: str | None, ctx: RcptContext) -> RcptDecision:
    if not ctx.in_transaction:
        return RcptDecision(Reply(503, "5.5.1", "Error: need MAIL command"))
    path = parse_path(arg or "", "TO")
    if path is PathError.PARAMETERS:
        return RcptDecision(Reply(501, "5.5.4", "Error: malformed or repeated RCPT parameter"))
    if not isinstance(path, Path) or not path.address:
        return RcptDecision(syntax("RCPT TO:<address> [parameters]", "5.1.3"))
    if path.params and not ctx.extended:
        return RcptDecision(Reply(501, "5.5.4", "Error: parameters need EHLO"))
    options: list[str] = []
    for key, value in path.params:
        if key not in RCPT_PARAMS_OFFERED:
            return RcptDecision(_unsupported("RCPT", key))
        if key == "NOTIFY":
            if not valid_notify(value):
                return RcptDecision(_bad_param(key))
            options.append(f"NOTIFY={(value or '').upper()}")
        else:
            if not valid_orcpt(value):
                return RcptDecision(_bad_param(key))
            options.append(f"ORCPT={value}")
    if not path.address.isascii() and not ctx.smtputf8:
        return RcptDecision(NEED_SMTPUTF8)
    if not ctx.may_relay:
        return RcptDecision(Reply(554, "5.7.1", "Relay access denied"))
    if ctx.recipients >= ctx.max_recipients:
        return RcptDecision(Reply(452, "4.5.3", "Error: too many recipients"))
    return RcptDecision(RCPT_OK, accepted=True, address=path.address, options=tuple(options))


# --- DATA -----------------------------------------------------------------------------------------------

def decide_data(arg: str | None, *, in_transaction: bool, recipients: int) -> Reply:
    if arg:
        return syntax("DATA")
    if not in_transaction:
        return Reply(503, "5.5.1", "Error: need MAIL command")
    if recipients == 0:
        return Reply(503, "5.5.1", "Error: need RCPT command")
    return Reply(354, "", "End data with <CR><LF>.<CR><LF>")


class DataOutcome(enum.Enum):
    QUEUED = "queued"
    TOO_BIG = "too_big"
    BARE_NEWLINE = "bare_newline"
    NUL = "nul"  # a NUL octet: <CRLF>NUL.<CRLF> ends DATA early for a receiver that drops NULs
    LINE_TOO_LONG = "line_too_long"
    INFLIGHT = "inflight"  # the content outgrew its reservation past --max-inflight-bytes
    SPOOL_FULL = "spool_full"
    SPOOL_ERROR = "spool_error"


def data_reply(outcome: DataOutcome, queue_id: str = "") -> Reply:
    if outcome is DataOutcome.QUEUED:
        return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
    if outcome is DataOutcome.TOO_BIG:
        return Reply(552, "5.3.4", "Error: message size exceeds fixed maximum message size")
    if outcome is DataOutcome.BARE_NEWLINE:
        return Reply(550, "5.6.0", "Error: bare CR or LF in message data (RFC 5321 section 2.3.8)")
    if outcome is DataOutcome.NUL:
        return Reply(550, "5.6.0", "Error: NUL octet in message data (RFC 5321 section 2.3.8)")
    if outcome is DataOutcome.LINE_TOO_LONG:
        return Reply(550, "5.6.0", "Error: line longer than 1000 octets (RFC 5321 section 4.5.3.1.6)")
    if outcome is DataOutcome.INFLIGHT:
        return Reply(451, "4.3.2", "Error: too much mail in flight, try again later")
    if outcome is DataOutcome.SPOOL_FULL:
        return Reply(452, "4.3.1", "Error: insufficient system storage")
    return Reply(451, "4.3.0", "Error: local error in processing, try again later")


_SEVERITY = {DataOutcome.QUEUED: 0, DataOutcome.INFLIGHT: 1, DataOutcome.TOO_BIG: 2,
             DataOutcome.LINE_TOO_LONG: 3, DataOutcome.NUL: 4, DataOutcome.BARE_NEWLINE: 5}


def bare_lf_end(hostname: str) -> Reply:
    """DATA ended with LF "." LF (bare line feeds) instead of CRLF "." CRLF: answered at once, and the
    session closes, rather than left to wait for the data timeout (Postfix's smtpd_forbid_bare_newline
    = reject does the same)."""
    return Reply(550, "5.6.0", f"{hostname} Error: bare <LF> received; end DATA with <CRLF>.<CRLF> "
                 "(RFC 5321 section 4.1.1.4)", close=True)


def worse(a: DataOutcome, b: DataOutcome) -> DataOutcome:
    """The more telling of two DATA outcomes: a permanent content error beats load, load beats OK."""
    return a if _SEVERITY[a] >= _SEVERITY[b] else b


def may_grow(*, total: int, mine: int, extra: int, limit: int) -> bool:
    """May a transaction holding `mine` (part of the pod's `total`) hold `extra` more bytes of DATA?
    Yes while the pod stays within `limit`, or when no other transaction holds anything (a lone
    transaction always passes, as at MAIL)."""
    return total + extra <= limit or total - mine <= 0


@dataclasses.dataclass
class DataScan:
    """Scanner state for DATA, fed the stream in the pieces the reader returns.

    Each piece is a line ending in LF, or (for a line longer than the reader's buffer) a chunk without
    LF whose rest follows. Pure and incremental: `done` turns true only at a '.' CRLF line whose
    preceding bytes were CRLF (or at the very start), so a bare LF or CR never ends DATA and one DATA can
    never become two messages. Content beyond the size limit, and after a bare CR/LF or an over-long
    line, is counted but not kept.
    """

    max_size: int
    size: int = 0
    outcome: DataOutcome = DataOutcome.QUEUED
    done: bool = False
    chunks: list[bytes] = dataclasses.field(default_factory=list)
    tail: bytes = b"\r\n"  # the last two bytes of the stream so far (the start counts as after CRLF)
    partial: bool = False  # inside an over-long line

    def feed(self, piece: bytes) -> None:
        at_line_start = not self.partial and self.tail == b"\r\n"
        self.tail = (self.tail + piece)[-2:]
        if not piece.endswith(b"\n"):  # a chunk of an over-long line
            self.partial = True
            self.size += len(piece)
            self._fail(DataOutcome.LINE_TOO_LONG)
            return
        if self.partial:  # the end of an over-long line
            self.partial = False
            self.size += len(piece)
            return
        if piece == b".\r\n" and at_line_start:
            self.done = True
            return
        line = piece[1:] if piece[:1] == b"." else piece
        if not at_line_start or not line.endswith(b"\r\n") or line.find(b"\r", 0, len(line) - 2) >= 0:
            self._fail(DataOutcome.BARE_NEWLINE)
        elif b"\x00" in line:
            self._fail(DataOutcome.NUL)
        elif len(line) > MAX_TEXT_LINE:
            self._fail(DataOutcome.LINE_TOO_LONG)
        self.size += len(line)
        if self.size > self.max_size:
            self._fail(DataOutcome.TOO_BIG)
        if self.outcome is DataOutcome.QUEUED:
            self.chunks.append(line)

    def refuse(self, outcome: DataOutcome) -> None:
        """Stop keeping the content for a reason found outside the scan (e.g. DataOutcome.INFLIGHT)."""
        self._fail(outcome)

    def _fail(self, outcome: DataOutcome) -> None:
        """Keep the most telling reason: bare CR/LF, then NUL, then an over-long line, then the size."""
        if _SEVERITY[outcome] > _SEVERITY[self.outcome]:
            self.outcome = outcome
        self.chunks = []

    def content(self) -> bytes:
        return b"".join(self.chunks)


def scan_block(block: bytes, max_size: int) -> tuple[DataOutcome, bytes]:
    """The whole DATA content at once, as on the wire between the DATA reply and the terminating
    CRLF "." CRLF (`block` ends with the CRLF before the dot, or is empty). Same rules as DataScan, at
    C speed: (outcome, unstuffed content or b"")."""
    lines = block.splitlines()
    breaks = len(lines) - (block[-1:] not in (b"", b"\r", b"\n"))  # each CRLF, bare CR and bare LF once
    if block.count(b"\r") != breaks or block.count(b"\n") != breaks:  # so no bare CR or LF
        return DataOutcome.BARE_NEWLINE, b""
    if b"\x00" in block:
        return DataOutcome.NUL, b""
    if len(block) > MAX_TEXT_LINE - 2 and max(map(len, lines)) > MAX_TEXT_LINE - 2:
        for line in lines:  # the exact rule (a stuffed dot does not count) only when it may apply
            if len(line) - (line[:1] == b".") > MAX_TEXT_LINE - 2:
                return DataOutcome.LINE_TOO_LONG, b""
    content = wire.unstuff(block)
    if len(content) > max_size:
        return DataOutcome.TOO_BIG, b""
    return DataOutcome.QUEUED, content


def scan_data(lines: Sequence[bytes], max_size: int) -> DataScan:
    """Feed whole lines to a fresh DataScan until it is done (a helper for tests and tools)."""
    scan = DataScan(max_size)
    for line in lines:
        scan.feed(line)
        if scan.done:
            break
    return scan
