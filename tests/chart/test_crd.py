"""The MailRelay CRD: valid for Kubernetes 1.37, structural and documented, CEL rules that accept and
reject what they should, defaults that match the operator's parser, and the scale subresource wiring.

CEL rules run in cel-python (celpy) after applying the schema defaults the way the API server does, and
after checking the OpenAPI schema with jsonschema, so a sample meets the whole admission path short of
a real API server.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import celpy
import celpy.adapter
import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from mailrelay_operator import spec as specmod

from tests.conftest import require_tool, with_field

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "mailrelay.yaml"


def load_crd() -> dict[str, Any]:
    with CRD_PATH.open() as f:
        data: dict[str, Any] = yaml.safe_load(f)
    return data


CRD = load_crd()
VERSION = CRD["spec"]["versions"][0]
SCHEMA: dict[str, Any] = VERSION["schema"]["openAPIV3Schema"]
CEL_ENV = celpy.Environment()


# ---------------------------------------------------------------------------------------------------
# A small admission path: defaulting, OpenAPI schema, CEL
# ---------------------------------------------------------------------------------------------------


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting as the API server does it: top-down, into defaulted objects as well."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        for key, item in value.items():
            if key in props:
                value[key] = apply_defaults(item, props[key])
            elif isinstance(schema.get("additionalProperties"), dict):
                value[key] = apply_defaults(item, schema["additionalProperties"])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def list_type_errors(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """What the API server adds to the OpenAPI checks: unique items of a `set`, unique keys of a `map`."""
    errors: list[str] = []
    if isinstance(value, list):
        kind = schema.get("x-kubernetes-list-type")
        if kind == "set":
            seen = [repr(v) for v in value]
            if len(set(seen)) != len(seen):
                errors.append(f"{path}: non-unique items in a set")
        elif kind == "map":
            keys = [tuple(repr(v.get(k)) for k in schema["x-kubernetes-list-map-keys"]) for v in value]
            if len(set(keys)) != len(keys):
                errors.append(f"{path}: non-unique map keys")
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                errors += list_type_errors(item, schema["items"], f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if key in schema.get("properties", {}):
                errors += list_type_errors(item, schema["properties"][key], f"{path}.{key}")
    return errors


def cel_errors(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    errors: list[str] = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = CEL_ENV.program(CEL_ENV.compile(rule["rule"]))
        result = program.evaluate({"self": celpy.adapter.json_to_cel(value)})
        if not isinstance(result, celpy.celtypes.BoolType):
            errors.append(f"{path or '.'}: rule {rule['rule']!r} failed to evaluate: {result!r}")
        elif not bool(result):
            errors.append(f"{path or '.'}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                errors += cel_errors(item, props[key], f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += cel_errors(item, schema["items"], f"{path}[{i}]")
    return errors


def admit(obj: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Default, then validate `obj` against the CRD. Returns (defaulted object, errors)."""
    defaulted = apply_defaults(copy.deepcopy(obj), SCHEMA)
    validator = jsonschema.Draft7Validator(SCHEMA)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(defaulted)]
    errors += list_type_errors(defaulted, SCHEMA)
    if not errors:
        errors = cel_errors(defaulted, SCHEMA)
    return defaulted, errors


def mailrelay(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "mailrelay.dev/v1alpha1",
        "kind": "MailRelay",
        "metadata": {"name": "outbound", "namespace": "mail"},
        "spec": spec,
    }


MINIMAL = {"upstream": {"host": "smtp.example.net"}, "acceptFrom": ["10.0.0.0/8"]}
FULL = {
    "upstream": {
        "host": "smtp.example.net",
        "port": 587,
        "tls": "starttls",
        "credentialsSecret": "upstream-auth",
    },
    "acceptFrom": ["10.0.0.0/8", "fd00::/8"],
    "replicas": {"min": 2, "max": 20},
    "limits": {"maxSessionsPerPod": 200, "maxMessageSize": "25Mi", "maxRecipients": 100},
    "scaling": {
        "intervalSeconds": 5,
        "targets": {"sessionsPerPod": 100, "queuePerPod": 500},
        "scaleUp": {"stabilizationSeconds": 0, "maxPodsPerStep": 4},
        "scaleDown": {"stabilizationSeconds": 300, "maxPodsPerStep": 1},
    },
    "drain": {"timeoutSeconds": 600, "onTimeout": "Remove"},
    "maintenance": False,
}




# ---------------------------------------------------------------------------------------------------
# The CRD object itself
# ---------------------------------------------------------------------------------------------------


def test_crd_is_valid_for_kubernetes_1_37_strict() -> None:
    kubernetes_validate.validate(CRD, "1.37", strict=True)


def test_strict_validation_catches_a_broken_crd() -> None:
    broken = copy.deepcopy(CRD)
    broken["spec"]["versions"][0]["subresources"]["scale"]["specReplicaPath"] = ".spec.x"  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.37", strict=True)


def test_names_and_subresources() -> None:
    assert CRD["spec"]["group"] == "mailrelay.dev"
    assert CRD["metadata"]["name"] == "mailrelays.mailrelay.dev"
    names = CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("MailRelay", "mailrelays", ["mr"])
    assert [v["name"] for v in CRD["spec"]["versions"]] == ["v1alpha1"]
    subresources = VERSION["subresources"]
    assert subresources["status"] == {}
    assert subresources["scale"] == {
        "specReplicasPath": ".spec.replicas.fixed",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }


def _resolve(path: str) -> dict[str, Any]:
    node = SCHEMA
    for key in path.strip(".").split("."):
        node = node["properties"][key]
    return node


def test_scale_paths_point_at_integer_and_string_fields() -> None:
    scale = VERSION["subresources"]["scale"]
    assert _resolve(scale["specReplicasPath"])["type"] == "integer"
    assert "default" not in _resolve(scale["specReplicasPath"]), "a default would turn autoscaling off"
    assert _resolve(scale["statusReplicasPath"])["type"] == "integer"
    assert _resolve(scale["labelSelectorPath"])["type"] == "string"


def test_printer_columns() -> None:
    columns = {c["name"]: c for c in VERSION["additionalPrinterColumns"]}
    default_columns = [c["name"] for c in VERSION["additionalPrinterColumns"] if c.get("priority", 0) == 0]
    assert default_columns == ["Min", "Max", "Desired", "Ready", "Draining", "Sessions", "Queue", "Age"]
    for column in columns.values():
        path = column["jsonPath"]
        if path.startswith(".metadata"):
            continue
        assert _resolve(path)["type"] == column["type"], column


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path or ".", schema)]
    for key, sub in schema.get("properties", {}).items():
        out += _walk(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        out += _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += _walk(schema["additionalProperties"], f"{path}{{}}")
    return out


def test_every_field_has_a_description_and_a_type() -> None:
    for path, node in _walk(SCHEMA):
        if path == ".metadata":
            continue
        assert node.get("description"), f"{path} has no description (kubectl explain would be empty)"
        assert node.get("type") or node.get("x-kubernetes-int-or-string"), f"{path} has no type"


def test_cel_rules_compile_and_have_messages() -> None:
    rules = [
        (path, rule) for path, node in _walk(SCHEMA) for rule in node.get("x-kubernetes-validations", [])
    ]
    assert len(rules) >= 6
    for path, rule in rules:
        CEL_ENV.compile(rule["rule"])
        assert rule.get("message"), f"rule at {path} has no message"


# ---------------------------------------------------------------------------------------------------
# Samples through the admission path
# ---------------------------------------------------------------------------------------------------


PLAINTEXT_AUTH = {
    "upstream": {"host": "smtp.internal", "credentialsSecret": "auth", "allowPlaintextAuth": True},
    "acceptFrom": ["10.0.0.0/8"],
}


@pytest.mark.parametrize(
    "spec", [MINIMAL, FULL, PLAINTEXT_AUTH], ids=["minimal", "design-sample", "plaintext-auth-opt-in"]
)
def test_valid_samples_are_admitted(spec: dict[str, Any]) -> None:
    _, errors = admit(mailrelay(spec))
    assert errors == []


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("replicas", {"min": 5, "max": 3}, "replicas.min must not exceed replicas.max"),
        ("replicas", {"min": 11}, "replicas.min must not exceed replicas.max"),  # max defaults to 10
        ("replicas.min", 0, "minimum"),
        ("replicas.fixed", -1, "minimum"),
        ("scaling.targets.sessionsPerPod", 0, "minimum"),
        ("scaling.targets.queuePerPod", -5, "minimum"),
        ("scaling.scaleUp.maxPodsPerStep", 0, "minimum"),
        ("scaling.scaleDown.maxPodsPerStep", 0, "minimum"),
        ("scaling.targets.sessionsPerPod", 300, "must not exceed limits.maxSessionsPerPod"),
        ("limits.maxMessageSize", "25 megabytes", "maxMessageSize must be"),
        ("limits.maxMessageSize", 0, "maxMessageSize must be"),
        ("acceptFrom", ["10.0.0.0"], "every acceptFrom entry must be a CIDR"),
        ("acceptFrom", ["everyone/8"], "every acceptFrom entry must be a CIDR"),
        ("acceptFrom", [], "should be non-empty"),
        ("upstream.tls", "ssl", "is not one of"),
        ("upstream.port", 70000, "maximum"),
        ("upstream.credentialsSecret", "Upstream_Auth", "does not match"),
        ("upstream.tls", "none", "would send the password in clear"),
        ("drain.timeoutSeconds", 0, "minimum"),
        ("drain.onTimeout", "Wait", "is not one of"),
        ("spool.sizeLimit", "lots", "does not match"),
        ("acceptFrom", ["10.0.0.0/8", "10.0.0.0/8"], "non-unique"),
        ("acceptFrom", [f"10.0.{i}.0/24" for i in range(65)], "is too long"),
        ("upstream.host", "h" * 254, "is too long"),
        ("image", "i" * 513, "is too long"),
    ],
)
def test_invalid_samples_are_rejected(path: str, value: Any, expected: str) -> None:
    _, errors = admit(mailrelay(with_field(FULL if path != "replicas" else MINIMAL, path, value)))
    assert errors, f"{path}={value!r} was admitted"
    assert any(expected in e for e in errors), errors


def test_missing_required_fields_are_rejected() -> None:
    _, errors = admit(mailrelay({"acceptFrom": ["10.0.0.0/8"]}))
    assert any("'upstream' is a required property" in e for e in errors)
    _, errors = admit(mailrelay({"upstream": {"host": "x"}}))
    assert any("'acceptFrom' is a required property" in e for e in errors)


@pytest.mark.parametrize(
    ("path", "value", "ok"),
    [
        ("limits.maxMessageSize", 1048576, True),
        ("limits.maxMessageSize", "10M", True),
        ("limits.maxMessageSize", "1Gi", True),
        ("replicas.fixed", 0, True),
        ("replicas", {"min": 3, "max": 3}, True),
        ("acceptFrom", ["192.168.0.0/16", "2001:db8::/32", "::1/128"], True),
        ("scaling.targets.sessionsPerPod", 200, True),  # equal to maxSessionsPerPod
    ],
)
def test_edge_values(path: str, value: Any, ok: bool) -> None:
    _, errors = admit(mailrelay(with_field(FULL, path, value)))
    assert (errors == []) is ok, errors


# ---------------------------------------------------------------------------------------------------
# Defaults: the API server and spec.py must agree
# ---------------------------------------------------------------------------------------------------


def test_defaults_fill_the_whole_spec() -> None:
    defaulted, errors = admit(mailrelay(MINIMAL))
    assert errors == []
    assert defaulted["spec"] == {
        "upstream": {
            "host": "smtp.example.net",
            "port": specmod.DEFAULT_UPSTREAM_PORT,
            "tls": "none",
            "allowPlaintextAuth": False,
        },
        "acceptFrom": ["10.0.0.0/8"],
        "replicas": {"min": specmod.DEFAULT_MIN_REPLICAS, "max": specmod.DEFAULT_MAX_REPLICAS},
        "limits": {
            "maxSessionsPerPod": specmod.DEFAULT_MAX_SESSIONS_PER_POD,
            "maxMessageSize": specmod.DEFAULT_MAX_MESSAGE_SIZE,
            "maxRecipients": specmod.DEFAULT_MAX_RECIPIENTS,
        },
        "scaling": {
            "intervalSeconds": specmod.DEFAULT_INTERVAL_SECONDS,
            "targets": {
                "sessionsPerPod": specmod.DEFAULT_SESSIONS_PER_POD,
                "queuePerPod": specmod.DEFAULT_QUEUE_PER_POD,
            },
            "scaleUp": {
                "stabilizationSeconds": specmod.DEFAULT_SCALE_UP_STABILIZATION,
                "maxPodsPerStep": specmod.DEFAULT_SCALE_UP_STEP,
            },
            "scaleDown": {
                "stabilizationSeconds": specmod.DEFAULT_SCALE_DOWN_STABILIZATION,
                "maxPodsPerStep": specmod.DEFAULT_SCALE_DOWN_STEP,
            },
        },
        "drain": {"timeoutSeconds": specmod.DEFAULT_DRAIN_TIMEOUT_SECONDS,
                  "onTimeout": specmod.DEFAULT_ON_TIMEOUT},
        "maintenance": False,
    }
    assert "fixed" not in defaulted["spec"]["replicas"], "defaulting must leave autoscaling on"


def test_parser_defaults_equal_api_server_defaults() -> None:
    defaulted, _ = admit(mailrelay(MINIMAL))
    assert specmod.parse(MINIMAL) == specmod.parse(defaulted["spec"])


# A spec generator around the boundaries of every numeric rule; both the CRD and spec.parse judge it.
_ints = st.integers(min_value=-2, max_value=1200)
_specs = st.fixed_dictionaries(
    {
        "upstream": st.fixed_dictionaries(
            {"host": st.just("smtp.example.net")},
            optional={
                "port": st.integers(-1, 70000),
                "tls": st.sampled_from(["none", "starttls", "tls", "ssl"]),
            },
        ),
        "acceptFrom": st.lists(
            st.sampled_from(["10.0.0.0/8", "fd00::/8", "10.0.0.1", "not-a-cidr/8", "192.168.1.0/24"]),
            min_size=0,
            max_size=3,
            unique=False,
        ),
    },
    optional={
        "replicas": st.fixed_dictionaries({}, optional={"min": _ints, "max": _ints, "fixed": _ints}),
        "limits": st.fixed_dictionaries(
            {},
            optional={
                "maxSessionsPerPod": _ints,
                "maxMessageSize": st.sampled_from([0, 1, 1024, "25Mi", "10M", "1G", "x", "-3"]),
                "maxRecipients": _ints,
            },
        ),
        "scaling": st.fixed_dictionaries(
            {},
            optional={
                "intervalSeconds": st.integers(-1, 400),
                "targets": st.fixed_dictionaries(
                    {}, optional={"sessionsPerPod": _ints, "queuePerPod": _ints}
                ),
                "scaleUp": st.fixed_dictionaries(
                    {}, optional={"stabilizationSeconds": st.integers(-1, 4000), "maxPodsPerStep": _ints}
                ),
                "scaleDown": st.fixed_dictionaries(
                    {}, optional={"stabilizationSeconds": st.integers(-1, 4000), "maxPodsPerStep": _ints}
                ),
            },
        ),
        "drain": st.fixed_dictionaries({}, optional={
            "timeoutSeconds": st.integers(-1, 90000),
            "onTimeout": st.sampled_from(["KeepWhileQueued", "Remove", "Wait", ""]),
        }),
        "maintenance": st.booleans(),
    },
)


@settings(max_examples=150, deadline=None)
@given(_specs)
def test_parser_and_crd_agree_on_validity(raw: dict[str, Any]) -> None:
    defaulted, errors = admit(mailrelay(raw))
    try:
        parsed = specmod.parse(raw)
    except specmod.SpecError as exc:
        assert errors, f"CRD admits what spec.parse rejects: {exc}"
        return
    assert errors == [], f"spec.parse accepts what the CRD rejects: {errors}"
    assert parsed == specmod.parse(defaulted["spec"])


# ---------------------------------------------------------------------------------------------------
# Every MailRelay the project shows users is admitted and parsed
# ---------------------------------------------------------------------------------------------------

REPO = CRD_PATH.parents[1]


def published_mailrelays() -> list[tuple[str, dict[str, Any]]]:
    """MailRelay documents in the chart examples, the README and docs/ (```yaml blocks)."""
    found: list[tuple[str, dict[str, Any]]] = []
    texts: list[tuple[str, str]] = [
        (str(p.relative_to(REPO)), p.read_text()) for p in sorted(REPO.glob("charts/*/examples/*.yaml"))
    ]
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if doc.exists():
            blocks = doc.read_text().split("```yaml")[1:]
            texts += [(f"{doc.relative_to(REPO)}#{i}", b.split("```")[0]) for i, b in enumerate(blocks)]
    for where, text in texts:
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError:
            continue  # a fragment, not a manifest
        found += [(where, d) for d in docs if isinstance(d, dict) and d.get("kind") == "MailRelay"]
    return found


PUBLISHED = published_mailrelays()


def test_the_project_publishes_samples() -> None:
    assert PUBLISHED, "no MailRelay sample found in the chart examples, README or docs"


@pytest.mark.parametrize(("where", "obj"), PUBLISHED, ids=[w for w, _ in PUBLISHED])
def test_published_samples_are_admitted_and_parsed(where: str, obj: dict[str, Any]) -> None:
    assert obj["apiVersion"] == "mailrelay.dev/v1alpha1"
    defaulted, errors = admit(obj)
    assert errors == [], where
    assert specmod.parse(obj["spec"]) == specmod.parse(defaulted["spec"])


def test_kubernetes_validate_command_line_accepts_the_crd_file() -> None:
    """The same check through the tool's command line, as CI or a user would run it."""
    tool = Path(sys.executable).parent / "kubernetes-validate"
    if not tool.exists():
        tool = Path(require_tool("kubernetes-validate"))
    result = subprocess.run(
        [str(tool), "--strict", "-k", "1.37.0", str(CRD_PATH)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout + result.stderr
