"""The relay's settings: one frozen dataclass, the flag table it comes from, and pure parsing.

What it is for: turning raw option strings (from argv or `MAILRELAY_*` variables, gathered by cli.py) into
a validated `Config`, with a clear `ConfigError` message for every bad value. The flag table `FLAGS` is the
single source for cli.py's argparse set-up, the environment variable names and docs/relay.md.

What it must not do: any I/O (no reading token or password files, no DNS, no clock); cli.py does that.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import pathlib
from collections.abc import Mapping, Sequence

from mailrelay_common import flags

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A flag or variable has an invalid value; the message names it."""


DEFAULT_ACCEPT_FROM = "127.0.0.0/8,::1/128"

FLAGS: tuple[flags.Flag, ...] = (
    flags.Flag("--listen", "0.0.0.0:2525", "SMTP listener", metavar="HOST:PORT"),
    flags.Flag("--upstream", None, "smarthost to deliver to (required)", metavar="HOST:PORT"),
    flags.Flag("--upstream-tls", "none", "none, starttls or tls", metavar="MODE"),
    flags.Flag("--upstream-ca-file", None,
               "CA bundle (PEM) to verify the upstream's certificate instead of the system CAs",
               metavar="FILE"),
    flags.Flag("--upstream-user", None, "AUTH user at the upstream", metavar="USER"),
    flags.Flag("--upstream-password-file", None, "file holding the upstream AUTH password", metavar="FILE"),
    flags.Flag("--upstream-allow-plaintext-auth", "false",
               "allow --upstream-user with --upstream-tls none (the password crosses the network in clear)",
               switch=True),
    flags.Flag("--upstream-connections", "4", "pooled upstream connections per worker", metavar="N"),
    flags.Flag("--spool", "/var/spool/mailrelay", "spool directory", metavar="DIR"),
    flags.Flag("--spool-max-bytes", "0", "most bytes the spool may hold (0: only the disk limits it)",
               metavar="BYTES"),
    flags.Flag("--admin-listen", "0.0.0.0:8025", "admin HTTP listener", metavar="HOST:PORT"),
    flags.Flag("--admin-token-file", None, "bearer token for /status, /drain, /resume", metavar="FILE"),
    flags.Flag("--max-sessions", "200", "SMTP sessions per pod, across workers", metavar="N"),
    flags.Flag("--max-message-size", "26214400", "largest message in bytes (advertised in SIZE)",
               metavar="BYTES"),
    flags.Flag("--max-recipients", "100", "recipients per message", metavar="N"),
    flags.Flag("--max-inflight-bytes", "268435456", "sum of declared sizes of open transactions",
               metavar="BYTES"),
    flags.Flag("--accept-from", DEFAULT_ACCEPT_FROM, "client networks allowed to relay (repeatable)",
               repeatable=True, metavar="CIDR"),
    flags.Flag("--hostname", None, "name in the greeting and replies (default: the host's FQDN)",
               metavar="NAME"),
    flags.Flag("--drain-timeout", "600", "longest drain before exit on SIGTERM", metavar="SECONDS"),
    flags.Flag("--drain-grace", "2",
               "while draining, a session whose last reply has been idle this long gets an unprompted 421",
               metavar="SECONDS"),
    flags.Flag("--queue-lifetime", "432000", "undelivered messages older than this go to dead-letter",
               metavar="SECONDS"),
    flags.Flag("--notify-senders", "true",
               "mail the sender a delivery status notification (RFC 3464) for a message that fails for good "
               "or expires, and for NOTIFY=SUCCESS through an upstream without DSN", metavar="BOOL"),
    flags.Flag("--delay-warning-time", "0",
               "warn the sender once when a message has waited this long undelivered (0: never; Postfix's "
               "delay_warning_time)", metavar="SECONDS"),
    flags.Flag("--deferral-log-interval", "60",
               "log a delivery deferral at warning at most once per kind of failure per this long "
               "(per worker)",
               metavar="SECONDS"),
    flags.Flag("--command-timeout", "300", "deadline for each SMTP command line", metavar="SECONDS"),
    flags.Flag("--data-timeout", "600", "deadline for a whole DATA transfer", metavar="SECONDS"),
    flags.Flag("--workers", "1", "SMTP worker processes sharing the port (SO_REUSEPORT)", metavar="N"),
    flags.Flag("--tls-cert", None, "certificate chain (PEM) for inbound STARTTLS", metavar="FILE"),
    flags.Flag("--tls-key", None, "private key (PEM) for inbound STARTTLS", metavar="FILE"),
    flags.Flag("--log-level", "info", "debug, info, warning or error", metavar="LEVEL"),
)

UPSTREAM_TLS_MODES = ("none", "starttls", "tls")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclasses.dataclass(frozen=True)
class Config:
    listen_host: str
    listen_port: int
    upstream_host: str
    upstream_port: int
    upstream_tls: str = "none"
    upstream_ca_file: pathlib.Path | None = None
    upstream_user: str | None = None
    upstream_password_file: pathlib.Path | None = None
    upstream_allow_plaintext_auth: bool = False
    upstream_connections: int = 4
    spool: pathlib.Path = pathlib.Path("/var/spool/mailrelay")
    spool_max_bytes: int = 0
    admin_host: str = "0.0.0.0"
    admin_port: int = 8025
    admin_token_file: pathlib.Path | None = None
    max_sessions: int = 200
    max_message_size: int = 26214400
    max_recipients: int = 100
    max_inflight_bytes: int = 268435456
    accept_from: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    hostname: str = "localhost"
    drain_timeout: float = 600.0
    drain_grace: float = 2.0
    queue_lifetime: float = 432000.0
    notify_senders: bool = True
    delay_warning_time: float = 0.0
    deferral_log_interval: float = 60.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    workers: int = 1
    tls_cert: pathlib.Path | None = None
    tls_key: pathlib.Path | None = None
    log_level: str = "info"


def parse_hostport(flag: str, value: str) -> tuple[str, int]:
    """'HOST:PORT', '[v6]:PORT' or 'v6addr:PORT' -> (host, port); port 0..65535."""
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"{flag}: expected [IPv6]:PORT, got {value!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"{flag}: expected HOST:PORT, got {value!r}")
    if not host:
        raise ConfigError(f"{flag}: missing host in {value!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{flag}: port must be 0..65535, got {port_text!r}")
    return host, int(port_text)


def parse_int(flag: str, value: str, *, minimum: int) -> int:
    text = value.strip().replace("_", "")
    try:
        number = int(text, 10)
    except ValueError:
        raise ConfigError(f"{flag}: expected an integer, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{flag}: must be at least {minimum}, got {number}")
    return number


def parse_seconds(flag: str, value: str, *, minimum: float = 0.0) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise ConfigError(f"{flag}: expected a number of seconds, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")) or number < minimum:
        raise ConfigError(f"{flag}: must be a finite number >= {minimum}, got {value!r}")
    return number


def parse_networks(flag: str, values: Sequence[str]) -> tuple[IPNetwork, ...]:
    networks: list[IPNetwork] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ConfigError(f"{flag}: not a CIDR network: {item!r}") from None
    if not networks:
        raise ConfigError(f"{flag}: needs at least one network")
    return tuple(networks)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def parse_bool(flag: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{flag}: expected true or false, got {value!r}")


def _choice(flag: str, value: str, choices: Sequence[str]) -> str:
    lowered = value.strip().lower()
    if lowered not in choices:
        raise ConfigError(f"{flag}: must be one of {', '.join(choices)}, got {value!r}")
    return lowered


def _path(value: str | None) -> pathlib.Path | None:
    return pathlib.Path(value) if value else None


def from_values(values: Mapping[str, flags.RawValue], *, default_hostname: str) -> Config:
    """Build a Config from raw strings keyed by Flag.dest; absent or None keys take the contract default.

    A repeatable flag's value is a sequence of strings, each of which may hold a comma-separated list.
    Raises ConfigError with a message that names the flag.
    """

    def get(flag_name: str) -> str | None:
        flag = _FLAG_BY_NAME[flag_name]
        raw = values.get(flag.dest)
        if raw is None:
            return flag.default
        if isinstance(raw, str):
            return raw
        return ",".join(raw)

    def need(flag_name: str) -> str:
        value = get(flag_name)
        if value is None or not value.strip():
            raise ConfigError(f"{flag_name} is required (or {_FLAG_BY_NAME[flag_name].env})")
        return value

    listen_host, listen_port = parse_hostport("--listen", need("--listen"))
    upstream_host, upstream_port = parse_hostport("--upstream", need("--upstream"))
    if upstream_port == 0:
        raise ConfigError("--upstream: port must not be 0")
    admin_host, admin_port = parse_hostport("--admin-listen", need("--admin-listen"))
    tls_cert, tls_key = _path(get("--tls-cert")), _path(get("--tls-key"))
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key must be given together")
    user = get("--upstream-user") or None
    password_file = _path(get("--upstream-password-file"))
    if password_file is not None and user is None:
        raise ConfigError("--upstream-password-file needs --upstream-user")
    upstream_tls = _choice("--upstream-tls", need("--upstream-tls"), UPSTREAM_TLS_MODES)
    allow_plaintext_auth = parse_bool("--upstream-allow-plaintext-auth",
                                      need("--upstream-allow-plaintext-auth"))
    upstream_ca_file = _path(get("--upstream-ca-file"))
    if upstream_ca_file is not None and upstream_tls == "none":
        raise ConfigError("--upstream-ca-file needs --upstream-tls starttls or tls")
    if user is not None and upstream_tls == "none" and not allow_plaintext_auth:
        raise ConfigError("--upstream-user with --upstream-tls none would send the AUTH password in "
                          "clear: use --upstream-tls starttls or tls, or give "
                          "--upstream-allow-plaintext-auth for a trusted (e.g. loopback) upstream")
    hostname = (get("--hostname") or default_hostname).strip()
    if not hostname or any(ch.isspace() or ord(ch) < 33 or ord(ch) > 126 for ch in hostname):
        raise ConfigError(f"--hostname: not a valid host name: {hostname!r}")
    max_message_size = parse_int("--max-message-size", need("--max-message-size"), minimum=1024)
    return Config(
        listen_host=listen_host,
        listen_port=listen_port,
        upstream_host=upstream_host,
        upstream_port=upstream_port,
        upstream_tls=upstream_tls,
        upstream_ca_file=upstream_ca_file,
        upstream_user=user,
        upstream_password_file=password_file,
        upstream_allow_plaintext_auth=allow_plaintext_auth,
        upstream_connections=parse_int("--upstream-connections", need("--upstream-connections"), minimum=1),
        spool=pathlib.Path(need("--spool")),
        spool_max_bytes=parse_int("--spool-max-bytes", need("--spool-max-bytes"), minimum=0),
        admin_host=admin_host,
        admin_port=admin_port,
        admin_token_file=_path(get("--admin-token-file")),
        max_sessions=parse_int("--max-sessions", need("--max-sessions"), minimum=1),
        max_message_size=max_message_size,
        max_recipients=parse_int("--max-recipients", need("--max-recipients"), minimum=1),
        max_inflight_bytes=parse_int("--max-inflight-bytes", need("--max-inflight-bytes"), minimum=1),
        accept_from=parse_networks("--accept-from", [need("--accept-from")]),
        hostname=hostname,
        drain_timeout=parse_seconds("--drain-timeout", need("--drain-timeout")),
        drain_grace=parse_seconds("--drain-grace", need("--drain-grace")),
        queue_lifetime=parse_seconds("--queue-lifetime", need("--queue-lifetime"), minimum=1.0),
        notify_senders=parse_bool("--notify-senders", need("--notify-senders")),
        delay_warning_time=parse_seconds("--delay-warning-time", need("--delay-warning-time")),
        deferral_log_interval=parse_seconds("--deferral-log-interval", need("--deferral-log-interval")),
        command_timeout=parse_seconds("--command-timeout", need("--command-timeout"), minimum=0.1),
        data_timeout=parse_seconds("--data-timeout", need("--data-timeout"), minimum=0.1),
        workers=parse_int("--workers", need("--workers"), minimum=1),
        tls_cert=tls_cert,
        tls_key=tls_key,
        log_level=_choice("--log-level", need("--log-level"), LOG_LEVELS),
    )


_FLAG_BY_NAME: dict[str, flags.Flag] = {flag.name: flag for flag in FLAGS}
