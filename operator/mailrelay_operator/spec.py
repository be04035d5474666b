"""Parse a MailRelay `.spec` (raw JSON) into frozen dataclasses, applying the CRD's defaults.

The API server applies the CRD's defaults and rules before the operator sees an object, on write and on
read. This module still applies the same defaults and checks, for one case the server cannot cover: a
CRD older than the operator. `helm upgrade` never updates a chart's `crds/`, so after an upgrade the
operator can meet MailRelays served by the CRD of an earlier release, without a newer field's default
(`drain.onTimeout` was added after the first release) or rule. A missing field then reads as its default,
and an invalid spec is reported (InvalidSpec) instead of acted on. tests/chart/test_crd.py has the real
API server and this module judge the same specs and checks that they agree. A bad spec raises `SpecError`
with the path of the offending field. Pure: no I/O, no clock, no Kubernetes client.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from mailrelay_operator import kubetypes

TlsMode = Literal["none", "starttls", "tls"]
TLS_MODES: tuple[TlsMode, ...] = ("none", "starttls", "tls")
OnTimeout = Literal["KeepWhileQueued", "Remove"]
ON_TIMEOUT_MODES: tuple[OnTimeout, ...] = ("KeepWhileQueued", "Remove")
DEFAULT_ON_TIMEOUT: OnTimeout = "KeepWhileQueued"

# Defaults; crds/mailrelay.yaml carries the same values (tests/chart/test_crd.py checks this).
DEFAULT_UPSTREAM_PORT = 25
DEFAULT_UPSTREAM_TLS: TlsMode = "none"
DEFAULT_MIN_REPLICAS = 2
DEFAULT_MAX_REPLICAS = 10
DEFAULT_MAX_SESSIONS_PER_POD = 200
DEFAULT_MAX_MESSAGE_SIZE = "25Mi"
DEFAULT_MAX_RECIPIENTS = 100
DEFAULT_INTERVAL_SECONDS = 5
DEFAULT_SESSIONS_PER_POD = 100
DEFAULT_QUEUE_PER_POD = 500
DEFAULT_SCALE_UP_STABILIZATION = 0
DEFAULT_SCALE_UP_STEP = 4
DEFAULT_SCALE_DOWN_STABILIZATION = 300
DEFAULT_SCALE_DOWN_STEP = 1
DEFAULT_DRAIN_TIMEOUT_SECONDS = 600

MAX_REPLICAS_LIMIT = 1000
MAX_DRAIN_TIMEOUT_SECONDS = 86400
MAX_STABILIZATION_SECONDS = 3600
MAX_INTERVAL_SECONDS = 300
MAX_ACCEPT_FROM = 64

_QUANTITY = re.compile(r"^([0-9]+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_QUANTITY_FACTORS = {
    None: 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class SpecError(ValueError):
    """The MailRelay spec is invalid; the message names the field."""


@dataclass(frozen=True)
class UpstreamSpec:
    host: str
    port: int = DEFAULT_UPSTREAM_PORT
    tls: TlsMode = DEFAULT_UPSTREAM_TLS
    credentials_secret: str | None = None  # Secret with keys `username` and `password`
    allow_plaintext_auth: bool = False  # AUTH without TLS: an explicit opt-in (else the relay refuses it)


@dataclass(frozen=True)
class ReplicaBounds:
    min: int = DEFAULT_MIN_REPLICAS
    max: int = DEFAULT_MAX_REPLICAS
    # Set through the scale subresource (`kubectl scale`, an HPA, KEDA): a fixed target that turns off
    # the built-in autoscaling. None: autoscale between min and max.
    fixed: int | None = None


@dataclass(frozen=True)
class Limits:
    max_sessions_per_pod: int = DEFAULT_MAX_SESSIONS_PER_POD
    max_message_size: int = 25 * 2**20  # bytes
    max_recipients: int = DEFAULT_MAX_RECIPIENTS


@dataclass(frozen=True)
class Targets:
    sessions_per_pod: int = DEFAULT_SESSIONS_PER_POD
    queue_per_pod: int = DEFAULT_QUEUE_PER_POD


@dataclass(frozen=True)
class Step:
    stabilization_seconds: int
    max_pods_per_step: int


@dataclass(frozen=True)
class Scaling:
    interval_seconds: int = DEFAULT_INTERVAL_SECONDS
    targets: Targets = Targets()
    scale_up: Step = Step(DEFAULT_SCALE_UP_STABILIZATION, DEFAULT_SCALE_UP_STEP)
    scale_down: Step = Step(DEFAULT_SCALE_DOWN_STABILIZATION, DEFAULT_SCALE_DOWN_STEP)


@dataclass(frozen=True)
class PersistentSpool:
    """spec.spool.persistent: a PersistentVolumeClaim per relay (the relays run as a StatefulSet)."""

    size: str  # the claim's requested storage, a quantity such as 1Gi
    storage_class_name: str | None = None  # None: the cluster's default StorageClass


@dataclass(frozen=True)
class MailRelaySpec:
    upstream: UpstreamSpec
    accept_from: tuple[str, ...]
    replicas: ReplicaBounds = ReplicaBounds()
    limits: Limits = Limits()
    scaling: Scaling = Scaling()
    drain_timeout_seconds: int = DEFAULT_DRAIN_TIMEOUT_SECONDS
    # What a drain past its timeout does while its relay still holds mail: wait for the queue
    # (KeepWhileQueued), or remove the relay and its spool anyway (Remove, DESIGN §7 as first written).
    drain_on_timeout: OnTimeout = DEFAULT_ON_TIMEOUT
    maintenance: bool = False
    image: str | None = None  # overrides the operator's --relay-image
    # container resources as given (Kubernetes quantities), sorted for a stable config hash
    resources: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    spool_size_limit: str | None = None  # emptyDir sizeLimit of the spool volume
    # None: the spool is an emptyDir (a Deployment); set: a claim per relay (a StatefulSet)
    spool_persistent: PersistentSpool | None = None

    @property
    def autoscaling(self) -> bool:
        """True when the operator picks the replica count; False when /scale fixed it."""
        return self.replicas.fixed is None


def parse_quantity(value: object, path: str) -> int:
    """A byte count given as an integer or a Kubernetes-style quantity string ("25Mi", "10M")."""
    if isinstance(value, bool):
        raise SpecError(f"{path}: expected a byte count, got {value!r}")
    if isinstance(value, int):
        result = value
    elif isinstance(value, str):
        match = _QUANTITY.match(value.strip())
        if match is None:
            raise SpecError(f"{path}: {value!r} is not a byte count such as 26214400 or 25Mi")
        result = int(match.group(1)) * _QUANTITY_FACTORS[match.group(2)]
    else:
        raise SpecError(f"{path}: expected a byte count, got {type(value).__name__}")
    if result < 1:
        raise SpecError(f"{path}: must be at least 1 byte, got {value!r}")
    return result


def _obj(raw: Mapping[str, Any], key: str, path: str, allowed: set[str]) -> Mapping[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{path}.{key}: expected an object, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise SpecError(f"{path}.{key}: unknown field(s) {', '.join(unknown)}")
    return value


def _int(raw: Mapping[str, Any], key: str, path: str, default: int | None, lo: int, hi: int) -> int:
    value = raw.get(key, default)
    if value is None:
        raise SpecError(f"{path}.{key}: required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{path}.{key}: expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise SpecError(f"{path}.{key}: must be between {lo} and {hi}, got {value}")
    return value


def _str(raw: Mapping[str, Any], key: str, path: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise SpecError(f"{path}.{key}: expected a non-empty string, got {value!r}")
    return value


def _step(raw: Mapping[str, Any], key: str, default: Step) -> Step:
    obj = _obj(raw, key, "spec.scaling", {"stabilizationSeconds", "maxPodsPerStep"})
    path = f"spec.scaling.{key}"
    return Step(
        stabilization_seconds=_int(
            obj, "stabilizationSeconds", path, default.stabilization_seconds, 0, MAX_STABILIZATION_SECONDS
        ),
        max_pods_per_step=_int(obj, "maxPodsPerStep", path, default.max_pods_per_step, 1, MAX_REPLICAS_LIMIT),
    )


def _resources(raw: Mapping[str, Any]) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    obj = _obj(raw, "resources", "spec", {"requests", "limits"})
    out: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    for kind in ("limits", "requests"):
        entries = obj.get(kind)
        if entries is None:
            continue
        if not isinstance(entries, Mapping):
            raise SpecError(f"spec.resources.{kind}: expected an object")
        pairs: list[tuple[str, str]] = []
        for name, value in sorted(entries.items()):
            if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
                raise SpecError(f"spec.resources.{kind}.{name}: expected a quantity, got {value!r}")
            pairs.append((str(name), str(value)))
        out.append((kind, tuple(pairs)))
    return tuple(out)


_TOP_LEVEL = {
    "upstream",
    "acceptFrom",
    "replicas",
    "limits",
    "scaling",
    "drain",
    "maintenance",
    "image",
    "resources",
    "spool",
}


def parse(raw_spec: kubetypes.MailRelaySpec | Mapping[str, Any]) -> MailRelaySpec:
    """Parse and validate a MailRelay `.spec`, applying defaults. Raises SpecError."""
    if not isinstance(raw_spec, Mapping):
        raise SpecError("spec: expected an object")
    raw = cast(Mapping[str, Any], raw_spec)
    unknown = sorted(set(raw) - _TOP_LEVEL)
    if unknown:
        raise SpecError(f"spec: unknown field(s) {', '.join(unknown)}")

    up = _obj(raw, "upstream", "spec", {"host", "port", "tls", "credentialsSecret", "allowPlaintextAuth"})
    host = _str(up, "host", "spec.upstream")
    if host is None:
        raise SpecError("spec.upstream.host: required")
    if len(host) > 253:
        raise SpecError("spec.upstream.host: longer than 253 characters")
    tls = up.get("tls", DEFAULT_UPSTREAM_TLS)
    if tls not in TLS_MODES:
        raise SpecError(f"spec.upstream.tls: must be one of {', '.join(TLS_MODES)}, got {tls!r}")
    credentials = _str(up, "credentialsSecret", "spec.upstream")
    if credentials is not None and (len(credentials) > 253 or not _DNS_SUBDOMAIN.match(credentials)):
        raise SpecError(f"spec.upstream.credentialsSecret: {credentials!r} is not a valid Secret name")
    plaintext_auth = up.get("allowPlaintextAuth", False)
    if not isinstance(plaintext_auth, bool):
        raise SpecError(f"spec.upstream.allowPlaintextAuth: expected true or false, got {plaintext_auth!r}")
    if credentials is not None and tls == "none" and not plaintext_auth:
        raise SpecError(
            "spec.upstream: credentialsSecret with tls none would send the password in clear: "
            "use tls starttls or tls, or set allowPlaintextAuth"
        )
    upstream = UpstreamSpec(
        host=host,
        port=_int(up, "port", "spec.upstream", DEFAULT_UPSTREAM_PORT, 1, 65535),
        tls=cast(TlsMode, tls),
        credentials_secret=credentials,
        allow_plaintext_auth=plaintext_auth,
    )

    accept_raw = raw.get("acceptFrom")
    if not isinstance(accept_raw, list) or not accept_raw:
        raise SpecError("spec.acceptFrom: required, a non-empty list of CIDRs allowed to relay")
    if len(accept_raw) > MAX_ACCEPT_FROM:
        raise SpecError(f"spec.acceptFrom: at most {MAX_ACCEPT_FROM} networks")
    if len({repr(c) for c in accept_raw}) != len(accept_raw):
        raise SpecError("spec.acceptFrom: duplicate entries")
    accept: list[str] = []
    for i, cidr in enumerate(accept_raw):
        if not isinstance(cidr, str) or "/" not in cidr or len(cidr) > 49:
            raise SpecError(f"spec.acceptFrom[{i}]: expected a CIDR string, got {cidr!r}")
        try:
            accept.append(str(ipaddress.ip_network(cidr, strict=False)))
        except ValueError as exc:
            raise SpecError(f"spec.acceptFrom[{i}]: {cidr!r} is not a CIDR ({exc})") from None

    rep = _obj(raw, "replicas", "spec", {"min", "max", "fixed"})
    rmin = _int(rep, "min", "spec.replicas", DEFAULT_MIN_REPLICAS, 1, MAX_REPLICAS_LIMIT)
    rmax = _int(rep, "max", "spec.replicas", DEFAULT_MAX_REPLICAS, 1, MAX_REPLICAS_LIMIT)
    if rmin > rmax:
        raise SpecError(f"spec.replicas: min ({rmin}) must not exceed max ({rmax})")
    fixed = None
    if rep.get("fixed") is not None:
        fixed = _int(rep, "fixed", "spec.replicas", None, 0, MAX_REPLICAS_LIMIT)

    lim = _obj(raw, "limits", "spec", {"maxSessionsPerPod", "maxMessageSize", "maxRecipients"})
    limits = Limits(
        max_sessions_per_pod=_int(
            lim, "maxSessionsPerPod", "spec.limits", DEFAULT_MAX_SESSIONS_PER_POD, 1, 100_000
        ),
        max_message_size=parse_quantity(
            lim.get("maxMessageSize", DEFAULT_MAX_MESSAGE_SIZE), "spec.limits.maxMessageSize"
        ),
        max_recipients=_int(lim, "maxRecipients", "spec.limits", DEFAULT_MAX_RECIPIENTS, 1, 100_000),
    )

    sc = _obj(raw, "scaling", "spec", {"intervalSeconds", "targets", "scaleUp", "scaleDown"})
    tg = _obj(sc, "targets", "spec.scaling", {"sessionsPerPod", "queuePerPod"})
    scaling = Scaling(
        interval_seconds=_int(
            sc, "intervalSeconds", "spec.scaling", DEFAULT_INTERVAL_SECONDS, 1, MAX_INTERVAL_SECONDS
        ),
        targets=Targets(
            sessions_per_pod=_int(
                tg, "sessionsPerPod", "spec.scaling.targets", DEFAULT_SESSIONS_PER_POD, 1, 1_000_000
            ),
            queue_per_pod=_int(
                tg, "queuePerPod", "spec.scaling.targets", DEFAULT_QUEUE_PER_POD, 1, 10_000_000
            ),
        ),
        scale_up=_step(sc, "scaleUp", Step(DEFAULT_SCALE_UP_STABILIZATION, DEFAULT_SCALE_UP_STEP)),
        scale_down=_step(sc, "scaleDown", Step(DEFAULT_SCALE_DOWN_STABILIZATION, DEFAULT_SCALE_DOWN_STEP)),
    )

    if scaling.targets.sessions_per_pod > limits.max_sessions_per_pod:
        raise SpecError(
            "spec.scaling.targets.sessionsPerPod: must not exceed spec.limits.maxSessionsPerPod "
            f"({scaling.targets.sessions_per_pod} > {limits.max_sessions_per_pod}), "
            "or relays refuse sessions before scaling starts"
        )

    dr = _obj(raw, "drain", "spec", {"timeoutSeconds", "onTimeout"})
    drain_timeout = _int(
        dr, "timeoutSeconds", "spec.drain", DEFAULT_DRAIN_TIMEOUT_SECONDS, 1, MAX_DRAIN_TIMEOUT_SECONDS
    )
    on_timeout = dr.get("onTimeout", DEFAULT_ON_TIMEOUT)
    if on_timeout not in ON_TIMEOUT_MODES:
        modes = ", ".join(ON_TIMEOUT_MODES)
        raise SpecError(f"spec.drain.onTimeout: expected one of {modes}, got {on_timeout!r}")

    maintenance = raw.get("maintenance", False)
    if not isinstance(maintenance, bool):
        raise SpecError(f"spec.maintenance: expected true or false, got {maintenance!r}")

    spool = _obj(raw, "spool", "spec", {"sizeLimit", "persistent"})
    size_limit = _str(spool, "sizeLimit", "spec.spool")
    if size_limit is not None:
        parse_quantity(size_limit, "spec.spool.sizeLimit")
    persistent = _persistent(spool)
    if size_limit is not None and persistent is not None:
        raise SpecError(
            "spec.spool: sizeLimit is the emptyDir's limit; a persistent spool's size is "
            "spool.persistent.size"
        )

    image = _str(raw, "image", "spec")
    if image is not None and len(image) > 512:
        raise SpecError("spec.image: longer than 512 characters")

    return MailRelaySpec(
        upstream=upstream,
        accept_from=tuple(accept),
        replicas=ReplicaBounds(min=rmin, max=rmax, fixed=fixed),
        limits=limits,
        scaling=scaling,
        drain_timeout_seconds=drain_timeout,
        drain_on_timeout=cast(OnTimeout, on_timeout),
        maintenance=maintenance,
        image=image,
        resources=_resources(raw),
        spool_size_limit=size_limit,
        spool_persistent=persistent,
    )


def _persistent(spool: Mapping[str, Any]) -> PersistentSpool | None:
    if spool.get("persistent") is None:
        return None
    obj = _obj(spool, "persistent", "spec.spool", {"size", "storageClassName"})
    size = _str(obj, "size", "spec.spool.persistent")
    if size is None:
        raise SpecError("spec.spool.persistent.size: required")
    if not _QUANTITY.match(size) or size.startswith("0"):
        raise SpecError(f"spec.spool.persistent.size: {size!r} is not a size such as 1Gi")
    parse_quantity(size, "spec.spool.persistent.size")
    storage_class = _str(obj, "storageClassName", "spec.spool.persistent")
    if storage_class is not None and (len(storage_class) > 253 or not _DNS_SUBDOMAIN.match(storage_class)):
        raise SpecError(
            f"spec.spool.persistent.storageClassName: {storage_class!r} is not a valid StorageClass name"
        )
    return PersistentSpool(size=size, storage_class_name=storage_class)


def spool_limit_bytes(spec: MailRelaySpec) -> int | None:
    """The spool volume's size in bytes: the persistent claim's size, else the emptyDir's sizeLimit
    (None: no limit)."""
    if spec.spool_persistent is not None:
        return parse_quantity(spec.spool_persistent.size, "spec.spool.persistent.size")
    if spec.spool_size_limit is not None:
        return parse_quantity(spec.spool_size_limit, "spec.spool.sizeLimit")
    return None
