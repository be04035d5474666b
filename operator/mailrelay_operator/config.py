"""The operator's settings: the flag table and the pure parsing of its raw strings into `Options`.

What it is for: `FLAGS` is the single source of the command line (cli.py builds argparse from it), of the
environment variables (`MAILRELAY_OPERATOR_<FLAG>`, upper case, `-` as `_`) and of the flags table in
docs/operator-runtime.md (tests/operator/test_config.py holds them together). `from_values` turns the
raw strings (a flag's, else its variable's, gathered by `mailrelay_common.flags.gather`) into a frozen,
validated `Options`, or raises `ConfigError` naming the flag.

What it must not do: any I/O (no reading the environment, no files, no network): cli.py does that.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from mailrelay_common import flags

PREFIX = "MAILRELAY_OPERATOR_"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
DEFAULT_OPERATOR_LABELS = "app.kubernetes.io/name=mailrelay-operator"


class ConfigError(ValueError):
    """A flag or its variable has an invalid value: `flag` names it, `reason` says what is wrong."""

    def __init__(self, flag: str, reason: str) -> None:
        super().__init__(f"{flag}: {reason}")
        self.flag = flag
        self.reason = reason


def _flag(name: str, default: str | None, help_: str, *, repeatable: bool = False,
          metavar: str | None = None, switch: bool = False) -> flags.Flag:
    return flags.Flag(name, default, help_, repeatable=repeatable, metavar=metavar, switch=switch,
                      prefix=PREFIX)


FLAGS: tuple[flags.Flag, ...] = (
    _flag("--namespace", None, "watch only this namespace (repeatable; unset: all namespaces)",
          repeatable=True, metavar="NS"),
    _flag("--standalone", "false", "no peering with other operator instances", switch=True),
    _flag("--peering", None, "Kopf peering object name (when not standalone)", metavar="NAME"),
    _flag("--kubeconfig", None, "kubeconfig file (unset: $KUBECONFIG, else in-cluster, else ~/.kube/config)",
          metavar="FILE"),
    _flag("--context", None, "kubeconfig context", metavar="NAME"),
    _flag("--relay-image", "mailrelay-relay:latest",
          "relay container image, unless a MailRelay sets spec.image", metavar="IMAGE"),
    _flag("--liveness", "http://0.0.0.0:8080/healthz", "liveness endpoint URL served by Kopf ('' disables)",
          metavar="URL"),
    _flag("--metrics-port", "9090", "Prometheus /metrics port (0 disables)", metavar="N"),
    _flag("--metrics-host", "0.0.0.0", "address of the /metrics listener", metavar="HOST"),
    _flag("--relay-timeout", "2", "timeout of one relay admin call", metavar="SECONDS"),
    _flag("--resync-seconds", "60", "how often the owned objects are re-checked for drift",
          metavar="SECONDS"),
    _flag("--status-refresh-seconds", "15",
          "how often status.sessions/queueMessages are written when nothing else in the status changed",
          metavar="SECONDS"),
    _flag("--delete-wait-seconds", None,
          "upper bound of the finalizer's drain wait (unset: spec.drain.timeoutSeconds)", metavar="SECONDS"),
    _flag("--api-retries", "5", "tries for a transient API failure", metavar="N"),
    _flag("--api-timeout", "10", "timeout of one API request", metavar="SECONDS"),
    _flag("--operator-labels", DEFAULT_OPERATOR_LABELS,
          "labels of the operator's pods, allowed to reach the relays' admin port", metavar="K=V,..."),
    _flag("--operator-namespace", None,
          "namespace the operator runs in, allowed to reach the relays' admin port (unset: any namespace)",
          metavar="NS"),
    _flag("--metrics-scraper-labels", None,
          "labels of the metrics scraper's pods (Prometheus), also allowed to reach the relays' admin port",
          metavar="K=V,..."),
    _flag("--metrics-scraper-namespace", None,
          "namespace of the metrics scraper's pods (unset: any, when --metrics-scraper-labels is set; "
          "alone, it admits every pod of that namespace)", metavar="NS"),
    _flag("--log-level", "info", "debug, info, warning or error", metavar="LEVEL"),
    _flag("--log-format", "json", "json (one object per line) or text (for a terminal)", metavar="FORMAT"),
)
FLAG_BY_NAME: dict[str, flags.Flag] = {flag.name: flag for flag in FLAGS}


@dataclasses.dataclass(frozen=True)
class Options:
    namespaces: tuple[str, ...] = ()
    standalone: bool = False
    kubeconfig: str | None = None
    context: str | None = None
    relay_image: str = "mailrelay-relay:latest"
    liveness: str | None = "http://0.0.0.0:8080/healthz"
    metrics_port: int | None = 9090
    metrics_host: str = "0.0.0.0"
    relay_timeout: float = 2.0
    resync_seconds: float = 60.0
    status_refresh_seconds: float = 15.0
    delete_wait_seconds: float | None = None
    api_retries: int = 5
    api_timeout: float = 10.0
    peering: str | None = None
    log_level: str = "info"
    log_format: str = "json"
    operator_namespace: str | None = None
    operator_labels: dict[str, str] = dataclasses.field(
        default_factory=lambda: {"app.kubernetes.io/name": "mailrelay-operator"}
    )
    metrics_scraper_labels: dict[str, str] = dataclasses.field(default_factory=dict)
    metrics_scraper_namespace: str | None = None


def parse_labels(flag: str, text: str) -> dict[str, str]:
    """'k=v,k2=v2' -> {k: v, k2: v2}; empty items are skipped."""
    result: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(flag, f"expected key=value[,key=value], got {text!r}")
        result[key.strip()] = value.strip()
    return result


def parse_number(flag: str, text: str, kind: type[int] | type[float], *, least: float,
                 above: bool = False) -> float:
    """An int or a finite float, at least `least` (strictly above it with `above`)."""
    try:
        number = kind(text.strip())
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ConfigError(flag, f"expected {noun}, got {text!r}") from None
    if not math.isfinite(number) or number < least or (above and number == least):
        bound = f"above {least:g}" if above else f"at least {least:g}"
        raise ConfigError(flag, f"must be a finite number {bound}, got {text!r}")
    return number


def parse_switch(flag: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(flag, f"expected true or false, got {text!r}")


def parse_choice(flag: str, text: str, choices: tuple[str, ...]) -> str:
    lowered = text.strip().lower()
    if lowered not in choices:
        raise ConfigError(flag, f"must be one of {', '.join(choices)}, got {text!r}")
    return lowered


def from_values(values: Mapping[str, flags.RawValue]) -> Options:
    """Options from raw strings keyed by Flag.dest; absent or None keys take the contract default.

    A repeatable flag's value is a sequence of strings, each of which may hold a comma-separated list.
    Raises ConfigError naming the flag."""

    def get(name: str) -> str | None:
        flag = FLAG_BY_NAME[name]
        raw = values.get(flag.dest)
        if raw is None:
            return flag.default
        return raw if isinstance(raw, str) else ",".join(raw)

    def text(name: str) -> str:
        return get(name) or ""

    def seconds(name: str) -> float:
        return parse_number(name, text(name), float, least=0.0, above=True)

    namespaces = tuple(ns.strip() for ns in text("--namespace").split(",") if ns.strip())
    metrics_port = int(parse_number("--metrics-port", text("--metrics-port"), int, least=0))
    if metrics_port > 65535:
        raise ConfigError("--metrics-port", f"must be a port, 0..65535, got {metrics_port}")
    delete_wait = get("--delete-wait-seconds")
    return Options(
        namespaces=namespaces,
        standalone=parse_switch("--standalone", text("--standalone")),
        kubeconfig=get("--kubeconfig") or None,
        context=get("--context") or None,
        relay_image=text("--relay-image"),
        liveness=get("--liveness") or None,
        metrics_port=metrics_port or None,
        metrics_host=text("--metrics-host"),
        relay_timeout=seconds("--relay-timeout"),
        resync_seconds=parse_number("--resync-seconds", text("--resync-seconds"), float, least=0.0),
        status_refresh_seconds=parse_number("--status-refresh-seconds", text("--status-refresh-seconds"),
                                            float, least=0.0),
        delete_wait_seconds=(parse_number("--delete-wait-seconds", delete_wait, float, least=0.0)
                             if delete_wait else None),
        api_retries=int(parse_number("--api-retries", text("--api-retries"), int, least=1)),
        api_timeout=seconds("--api-timeout"),
        peering=get("--peering") or None,
        log_level=parse_choice("--log-level", text("--log-level"), LOG_LEVELS),
        log_format=parse_choice("--log-format", text("--log-format"), LOG_FORMATS),
        operator_namespace=get("--operator-namespace") or None,
        operator_labels=parse_labels("--operator-labels", text("--operator-labels")),
        metrics_scraper_labels=parse_labels("--metrics-scraper-labels", text("--metrics-scraper-labels")),
        metrics_scraper_namespace=get("--metrics-scraper-namespace") or None,
    )
