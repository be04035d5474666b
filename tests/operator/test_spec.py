"""Parsing a MailRelay spec (mailrelay_operator.spec): defaults, conversions and precise errors.

The agreement with the CRD (same defaults, same verdicts) is checked in tests/chart/test_crd.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mailrelay_operator import spec as specmod

from tests import conftest

MINIMAL: dict[str, Any] = {"upstream": {"host": "smtp.example.net"}, "acceptFrom": ["10.0.0.0/8"]}


def with_field(path: str, value: Any, base: dict[str, Any] = MINIMAL) -> dict[str, Any]:
    return conftest.with_field(base, path, value)


def test_minimal_spec_gets_the_defaults() -> None:
    parsed = specmod.parse(MINIMAL)
    assert parsed == specmod.MailRelaySpec(
        upstream=specmod.UpstreamSpec(host="smtp.example.net", port=25, tls="none", credentials_secret=None),
        accept_from=("10.0.0.0/8",),
        replicas=specmod.ReplicaBounds(min=2, max=10, fixed=None),
        limits=specmod.Limits(max_sessions_per_pod=200, max_message_size=25 * 2**20, max_recipients=100),
        scaling=specmod.Scaling(
            interval_seconds=5,
            targets=specmod.Targets(sessions_per_pod=100, queue_per_pod=500),
            scale_up=specmod.Step(0, 4),
            scale_down=specmod.Step(300, 1),
        ),
        drain_timeout_seconds=600,
        maintenance=False,
    )
    assert parsed.autoscaling


def test_design_sample() -> None:
    parsed = specmod.parse(
        {
            "upstream": {
                "host": "smtp.example.net",
                "port": 587,
                "tls": "starttls",
                "credentialsSecret": "upstream-auth",
            },
            "acceptFrom": ["10.0.0.0/8"],
            "replicas": {"min": 2, "max": 20},
            "limits": {"maxSessionsPerPod": 200, "maxMessageSize": "25Mi", "maxRecipients": 100},
            "scaling": {
                "intervalSeconds": 5,
                "targets": {"sessionsPerPod": 100, "queuePerPod": 500},
                "scaleUp": {"stabilizationSeconds": 0, "maxPodsPerStep": 4},
                "scaleDown": {"stabilizationSeconds": 300, "maxPodsPerStep": 1},
            },
            "drain": {"timeoutSeconds": 600},
            "maintenance": False,
        }
    )
    assert parsed.upstream == specmod.UpstreamSpec("smtp.example.net", 587, "starttls", "upstream-auth")
    assert parsed.replicas == specmod.ReplicaBounds(2, 20, None)


def test_fixed_count_turns_autoscaling_off() -> None:
    parsed = specmod.parse(with_field("replicas.fixed", 4))
    assert parsed.replicas.fixed == 4 and not parsed.autoscaling


def test_options() -> None:
    parsed = specmod.parse(
        {
            **MINIMAL,
            "acceptFrom": ["10.1.2.3/8", "FD00::/8"],
            "image": "relay:2",
            "resources": {"requests": {"memory": "128Mi", "cpu": "100m"}, "limits": {"cpu": 1}},
            "spool": {"sizeLimit": "1Gi"},
            "maintenance": True,
        }
    )
    assert parsed.accept_from == ("10.0.0.0/8", "fd00::/8")  # normalised
    assert parsed.image == "relay:2"
    assert parsed.resources == (
        ("limits", (("cpu", "1"),)),
        ("requests", (("cpu", "100m"), ("memory", "128Mi"))),
    )
    assert parsed.spool_size_limit == "1Gi"
    assert parsed.maintenance


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        (26214400, 26214400),
        ("25Mi", 25 * 2**20),
        ("10M", 10**7),
        ("1Gi", 2**30),
        ("512", 512),
        ("3k", 3000),
    ],
)
def test_quantities(value: Any, expected: int) -> None:
    assert specmod.parse_quantity(value, "x") == expected


@pytest.mark.parametrize("value", [0, -1, "0", "25 Mi", "25MB", "1.5Gi", True, None, 2.5])
def test_bad_quantities(value: Any) -> None:
    with pytest.raises(specmod.SpecError, match=r"^x: "):
        specmod.parse_quantity(value, "x")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"acceptFrom": ["10.0.0.0/8"]}, "spec.upstream.host"),
        ({"upstream": {"host": "x"}}, "spec.acceptFrom"),
        (with_field("acceptFrom", []), "spec.acceptFrom"),
        (with_field("acceptFrom", ["10.0.0.1"]), r"spec.acceptFrom\[0\]"),
        (with_field("acceptFrom", ["10.0.0.0/33"]), r"spec.acceptFrom\[0\]"),
        (with_field("acceptFrom", [7]), r"spec.acceptFrom\[0\]"),
        (with_field("acceptFrom", ["10.0.0.0/8", "10.0.0.0/8"]), "spec.acceptFrom: duplicate"),
        (with_field("acceptFrom", [f"10.0.{i}.0/24" for i in range(65)]), "spec.acceptFrom: at most 64"),
        (with_field("upstream.host", "h" * 254), "spec.upstream.host"),
        (with_field("image", "i" * 513), "spec.image"),
        (with_field("upstream.port", 0), "spec.upstream.port"),
        (with_field("upstream.port", "25"), "spec.upstream.port"),
        (with_field("upstream.tls", "ssl"), "spec.upstream.tls"),
        (with_field("upstream.credentialsSecret", "Bad_Name"), "spec.upstream.credentialsSecret"),
        (with_field("upstream.credentialsSecret", "auth"), "spec.upstream: credentialsSecret with tls none"),
        (with_field("upstream.allowPlaintextAuth", "yes"), "spec.upstream.allowPlaintextAuth"),
        (with_field("upstream.hots", "typo"), "spec.upstream"),
        (with_field("replicas", {"min": 5, "max": 2}), "spec.replicas"),
        (with_field("replicas.min", 0), "spec.replicas.min"),
        (with_field("replicas.max", True), "spec.replicas.max"),
        (with_field("replicas.fixed", -1), "spec.replicas.fixed"),
        (with_field("limits.maxMessageSize", "big"), "spec.limits.maxMessageSize"),
        (with_field("scaling.targets.sessionsPerPod", 0), "spec.scaling.targets.sessionsPerPod"),
        (
            with_field("scaling.targets.sessionsPerPod", 500),
            "spec.scaling.targets.sessionsPerPod",
        ),  # > max sessions
        (with_field("scaling.targets.queuePerPod", -1), "spec.scaling.targets.queuePerPod"),
        (with_field("scaling.scaleUp.maxPodsPerStep", 0), "spec.scaling.scaleUp.maxPodsPerStep"),
        (
            with_field("scaling.scaleDown.stabilizationSeconds", -1),
            "spec.scaling.scaleDown.stabilizationSeconds",
        ),
        (with_field("scaling.intervalSeconds", 0), "spec.scaling.intervalSeconds"),
        (with_field("drain.timeoutSeconds", 0), "spec.drain.timeoutSeconds"),
        (with_field("maintenance", "yes"), "spec.maintenance"),
        (with_field("spool.sizeLimit", "huge"), "spec.spool.sizeLimit"),
        (with_field("spool.persistent", {}), "spec.spool.persistent.size"),
        (with_field("spool.persistent", {"size": "0"}), "spec.spool.persistent.size"),
        (with_field("spool.persistent", {"size": "1Gi", "storageClass": "x"}), "spec.spool.persistent"),
        (with_field("spool.persistent", {"size": "1Gi", "storageClassName": "Fast_SSD"}),
         "spec.spool.persistent.storageClassName"),
        (with_field("spool", {"sizeLimit": "1Gi", "persistent": {"size": "1Gi"}}), "spec.spool"),
        (with_field("resources.requests", {"cpu": ""}), "spec.resources.requests.cpu"),
        (with_field("scaling", [1]), "spec.scaling"),
        (with_field("replica", {"min": 1}), "spec"),
    ],
)
def test_errors_name_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(specmod.SpecError, match=f"^{field}"):
        specmod.parse(raw)


def test_spool_modes() -> None:
    """emptyDir by default; persistent carries the claim's size and StorageClass (None: the default
    class); spool_limit_bytes reads whichever size the mode has."""
    assert specmod.parse(MINIMAL).spool_persistent is None
    assert specmod.spool_limit_bytes(specmod.parse(MINIMAL)) is None
    assert specmod.spool_limit_bytes(specmod.parse(with_field("spool.sizeLimit", "1Ki"))) == 1024
    plain = specmod.parse(with_field("spool.persistent", {"size": "2Gi"}))
    assert plain.spool_persistent == specmod.PersistentSpool(size="2Gi", storage_class_name=None)
    assert specmod.spool_limit_bytes(plain) == 2 * 2**30
    fast = specmod.parse(with_field("spool.persistent", {"size": "10M", "storageClassName": "fast.ssd"}))
    assert fast.spool_persistent == specmod.PersistentSpool(size="10M", storage_class_name="fast.ssd")


def test_spec_error_is_a_value_error() -> None:
    assert issubclass(specmod.SpecError, ValueError)
    with pytest.raises(ValueError):
        specmod.parse("not a mapping")  # type: ignore[arg-type]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
fields = st.sampled_from(
    [
        "upstream",
        "upstream.host",
        "upstream.port",
        "upstream.tls",
        "acceptFrom",
        "replicas",
        "replicas.min",
        "replicas.max",
        "replicas.fixed",
        "limits.maxMessageSize",
        "scaling",
        "scaling.targets",
        "scaling.scaleUp.maxPodsPerStep",
        "drain",
        "maintenance",
        "resources",
        "spool",
        "spool.persistent",
        "spool.persistent.size",
        "image",
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(fields, json_values), max_size=4))
def test_any_input_parses_or_raises_spec_error(changes: list[tuple[str, Any]]) -> None:
    """Garbage in any field never crashes the parser with anything but SpecError."""
    raw: dict[str, Any] = copy.deepcopy(MINIMAL)
    for path, value in changes:
        try:
            raw = with_field(path, value, raw)
        except (AttributeError, TypeError):
            continue  # the path runs through a non-object: skip this change
    try:
        parsed = specmod.parse(raw)
    except specmod.SpecError:
        return
    assert 1 <= parsed.replicas.min <= parsed.replicas.max
    assert parsed.scaling.targets.sessions_per_pod <= parsed.limits.max_sessions_per_pod
