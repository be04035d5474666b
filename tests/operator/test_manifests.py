"""The owned objects (mailrelay_operator.manifests): objects the real API server admits (a server-side dry-
run with strict field validation, on the session's control plane), the contract labels, a relay container
the real relay's configuration parser accepts, a config hash that rolls out relay changes only, and a
NetworkPolicy that keeps the admin port closed.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
from typing import Any

import pytest
from mailrelay_operator import kubetypes, manifests
from mailrelay_operator import spec as specmod
from mailrelay_relay import cli as relay_cli
from mailrelay_relay import config as relay_config

from tests import kubeenv

MINIMAL = specmod.parse({"upstream": {"host": "smtp.example.net"}, "acceptFrom": ["10.0.0.0/8"]})
FULL = specmod.parse(
    {
        "upstream": {
            "host": "smtp.example.net",
            "port": 587,
            "tls": "starttls",
            "credentialsSecret": "upstream-auth",
        },
        "acceptFrom": ["10.0.0.0/8", "fd00::/8"],
        "replicas": {"min": 2, "max": 20},
        "limits": {"maxSessionsPerPod": 300, "maxMessageSize": "10Mi", "maxRecipients": 50},
        "drain": {"timeoutSeconds": 120},
        "image": "registry.example/mailrelay-relay:9.9",
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "spool": {"sizeLimit": "2Gi"},
    }
)
IPV6 = specmod.parse({"upstream": {"host": "2001:db8::25", "port": 2525}, "acceptFrom": ["::/0"]})
# AUTH without TLS: only with the explicit opt-in, which the relay must then see as well (it refuses
# --upstream-user with --upstream-tls none otherwise), checked through the relay's own parser below.
PLAINTEXT_AUTH = specmod.parse(
    {
        "upstream": {"host": "smtp.internal", "credentialsSecret": "auth", "allowPlaintextAuth": True},
        "acceptFrom": ["10.0.0.0/8"],
    }
)
PERSISTENT = specmod.parse(
    {
        "upstream": {"host": "smtp.example.net"},
        "acceptFrom": ["10.0.0.0/8"],
        "spool": {"persistent": {"size": "2Gi", "storageClassName": "fast-ssd"}},
    }
)
SPECS = {
    "minimal": MINIMAL,
    "full": FULL,
    "ipv6-upstream": IPV6,
    "plaintext-auth": PLAINTEXT_AUTH,
    "persistent": PERSISTENT,
}
OPERATOR_LABELS = {"app.kubernetes.io/name": "mailrelay-operator"}


def build_all(spec: specmod.MailRelaySpec) -> list[dict[str, Any]]:
    build = manifests.deployment if spec.spool_persistent is None else manifests.stateful_set
    objects: list[Any] = [
        build("outbound", "mail", spec, image="mailrelay-relay:0.1.0", replicas=3, token_secret="x"),
        manifests.service("outbound", "mail"),
        manifests.admin_secret("outbound", "mail", "s3cr3t-token"),
        manifests.pod_disruption_budget("outbound", "mail"),
        manifests.network_policy("outbound", "mail", OPERATOR_LABELS, "mailrelay-system"),
        manifests.network_policy("outbound", "mail", OPERATOR_LABELS),
    ]
    return objects


def container(dep: kubetypes.Deployment | kubetypes.StatefulSet) -> kubetypes.Container:
    return dep["spec"]["template"]["spec"]["containers"][0]


def env_of(
    dep: kubetypes.Deployment | kubetypes.StatefulSet, pod_name: str = "outbound-7d9f-abcde"
) -> dict[str, str]:
    """The container's environment as the kubelet would resolve it."""
    out: dict[str, str] = {}
    for var in container(dep)["env"]:
        if "value" in var:
            out[var["name"]] = var["value"]
        elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
            out[var["name"]] = pod_name
        elif "secretKeyRef" in var["valueFrom"]:
            out[var["name"]] = f"<{var['valueFrom']['secretKeyRef']['key']}>"
        else:
            raise AssertionError(f"unexpected env source {var}")
    return out


@pytest.mark.parametrize("spec_name", SPECS)
def test_the_api_server_admits_every_object(kube_session: kubeenv.SessionCluster, spec_name: str) -> None:
    result = kubeenv.server_dry_run(kube_session, build_all(SPECS[spec_name]), "mail")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(server dry run)") == len(build_all(SPECS[spec_name])), result.stdout


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("containers.0.ports.0.containerPort", "2525", "containerPort"),   # a string for a number
        ("containers.0.readinessProbe.periodSecond", 2, 'unknown field "spec.template.spec.containers[0]'
                                                        '.readinessProbe.periodSecond"'),
        ("containers.0.ports.0.name", "smtp-listener-port", "must be no more than 15 characters"),
    ],
)
def test_the_server_check_is_strict_enough_to_fail(
    kube_session: kubeenv.SessionCluster, path: str, value: Any, expected: str
) -> None:
    dep: Any = copy.deepcopy(build_all(MINIMAL)[0])
    node = dep["spec"]["template"]["spec"]
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    node[keys[-1]] = value
    result = kubeenv.server_dry_run(kube_session, [dep], "mail")
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr


def test_contract_labels_everywhere() -> None:
    expected = {
        "app.kubernetes.io/name": "mailrelay",
        "app.kubernetes.io/instance": "outbound",
        "app.kubernetes.io/managed-by": "mailrelay-operator",
    }
    for obj in build_all(FULL):
        assert obj["metadata"]["labels"] == expected, obj["kind"]
        assert obj["metadata"]["namespace"] == "mail"
        assert "ownerReferences" not in obj["metadata"]  # kopf.adopt sets them
    dep = build_all(FULL)[0]
    assert dep["spec"]["template"]["metadata"]["labels"] == expected
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= expected.items()
    assert (
        manifests.selector("outbound")
        == "app.kubernetes.io/instance=outbound,app.kubernetes.io/name=mailrelay"
    )


def test_names() -> None:
    names = [obj["metadata"]["name"] for obj in build_all(MINIMAL)]
    assert names == ["outbound", "outbound", "outbound-admin", "outbound", "outbound", "outbound"]
    assert manifests.admin_secret_name("outbound") == "outbound-admin"


def test_relay_container_shape() -> None:
    dep = manifests.deployment(
        "outbound", "mail", FULL, image="ignored:1", replicas=4, token_secret="outbound-admin"
    )
    pod_spec = dep["spec"]["template"]["spec"]
    c = container(dep)
    assert dep["spec"]["replicas"] == 4
    assert c["image"] == "registry.example/mailrelay-relay:9.9"  # spec.image overrides --relay-image
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"smtp": 2525, "admin": 8025}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert pod_spec["terminationGracePeriodSeconds"] > FULL.drain_timeout_seconds
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["runAsUser"] != 0 and sc["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes["spool"]["emptyDir"] == {"sizeLimit": "2Gi"}
    assert mounts[manifests.SPOOL_PATH] == "spool"
    assert volumes["admin-token"]["secret"]["secretName"] == "outbound-admin"
    assert mounts[manifests.ADMIN_TOKEN_DIR] == "admin-token"
    assert volumes["upstream-credentials"]["secret"]["secretName"] == "upstream-auth"
    assert pod_spec["automountServiceAccountToken"] is False
    spread = {c["topologyKey"]: c for c in pod_spec["topologySpreadConstraints"]}
    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(
        c["labelSelector"]["matchLabels"] == manifests.selector_labels("outbound") for c in spread.values()
    )
    assert all(c["whenUnsatisfiable"] == "ScheduleAnyway" for c in spread.values())  # never blocks scale-up


@pytest.mark.parametrize(("size_limit", "expected"), [("2Gi", 2 * 1024**3 * 9 // 10), ("1000", 900),
                                                     ("100M", 90_000_000), (None, None)])
def test_spool_size_limit_becomes_the_relays_spool_max_bytes(size_limit: str | None,
                                                             expected: int | None) -> None:
    """The relay refuses mail (452 4.3.1) at ~90 % of the emptyDir's sizeLimit, before the kubelet
    would evict the pod for outgrowing it; the relay's own parser reads the value."""
    raw: dict[str, Any] = {"upstream": {"host": "smtp.example.net"}, "acceptFrom": ["10.0.0.0/8"]}
    if size_limit is not None:
        raw["spool"] = {"sizeLimit": size_limit}
    spec = specmod.parse(raw)
    dep = manifests.deployment("r", "ns", spec, image="img", replicas=1, token_secret="r-admin")
    environ = env_of(dep)
    args = relay_cli.build_parser().parse_args([])
    cfg = relay_config.from_values(relay_cli.gather(args, environ), default_hostname="unused")
    if expected is None:
        assert "MAILRELAY_SPOOL_MAX_BYTES" not in environ and cfg.spool_max_bytes == 0
    else:
        assert environ["MAILRELAY_SPOOL_MAX_BYTES"] == str(expected) and cfg.spool_max_bytes == expected


def test_a_persistent_spool_is_a_stateful_set_with_a_claim_per_relay() -> None:
    sts = manifests.stateful_set("outbound", "mail", PERSISTENT, image="img", replicas=3, token_secret="x")
    dep = manifests.deployment("outbound", "mail", MINIMAL, image="img", replicas=3, token_secret="x")
    assert sts["kind"] == "StatefulSet" and sts["spec"]["replicas"] == 3
    assert sts["spec"]["serviceName"] == manifests.service("outbound", "mail")["metadata"]["name"]
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["selector"] == dep["spec"]["selector"]
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenScaled": "Delete",
        "whenDeleted": "Retain",
    }
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "spool"
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "2Gi"}},
        "storageClassName": "fast-ssd",
    }
    pod = sts["spec"]["template"]["spec"]
    assert "spool" not in {v["name"] for v in pod["volumes"]}  # the claim template provides it
    assert {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}["spool"] == (
        manifests.SPOOL_PATH
    )
    assert env_of(sts)["MAILRELAY_SPOOL_MAX_BYTES"] == str(2 * 2**30 * 9 // 10)
    assert manifests.spool_claim_name("outbound", 2) == "spool-outbound-2"
    no_class = specmod.parse(
        {"upstream": {"host": "h"}, "acceptFrom": ["10.0.0.0/8"], "spool": {"persistent": {"size": "1Gi"}}}
    )
    sts = manifests.stateful_set("outbound", "mail", no_class, image="img", replicas=1, token_secret="x")
    assert "storageClassName" not in sts["spec"]["volumeClaimTemplates"][0]["spec"]  # the default class
    with pytest.raises(ValueError):
        manifests.stateful_set("outbound", "mail", MINIMAL, image="img", replicas=1, token_secret="x")


def test_both_spool_modes_share_the_relay_pod_and_the_emptydir_pod_is_unchanged() -> None:
    """Apart from the spool volume, a relay pod is the same in both modes; the Deployment's pod template
    (and so its config hash) is what it was before persistent spools, so no relay rolls on upgrade."""
    dep = manifests.deployment("outbound", "mail", MINIMAL, image="img", replicas=1, token_secret="x")
    persistent = dataclasses.replace(MINIMAL, spool_persistent=specmod.PersistentSpool(size="1Gi"))
    sts = manifests.stateful_set("outbound", "mail", persistent, image="img", replicas=1, token_secret="x")
    dep_pod: Any = copy.deepcopy(dep["spec"]["template"])
    sts_pod: Any = copy.deepcopy(sts["spec"]["template"])
    dep_pod["spec"]["volumes"] = [v for v in dep_pod["spec"]["volumes"] if v["name"] != "spool"]
    for pod in (dep_pod, sts_pod):
        pod["spec"]["containers"][0]["env"] = [
            e for e in pod["spec"]["containers"][0]["env"] if e["name"] != "MAILRELAY_SPOOL_MAX_BYTES"
        ]
        del pod["metadata"]["annotations"]
    assert dep_pod == sts_pod
    # the hash main computed for this spec before the StatefulSet existed (a literal, on purpose)
    assert dep["spec"]["template"]["metadata"]["annotations"][manifests.CONFIG_HASH_ANNOTATION] == (
        "0c67e7f09f33cd07"
    )


def test_default_spool_is_an_unbounded_empty_dir() -> None:
    dep = manifests.deployment("r", "ns", MINIMAL, image="img", replicas=1, token_secret="r-admin")
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["spool"] == {"name": "spool", "emptyDir": {}}
    assert "upstream-credentials" not in volumes


@pytest.mark.parametrize("spec_name", SPECS)
def test_the_relay_accepts_its_environment(spec_name: str) -> None:
    """Feed the built environment to the relay's own parser (mailrelay_relay.cli/config)."""
    spec = SPECS[spec_name]
    dep = manifests.deployment(
        "outbound", "mail", spec, image="img", replicas=1, token_secret="outbound-admin"
    )
    environ = env_of(dep)
    known = {flag.env for flag in relay_config.FLAGS}
    assert set(environ) <= known, set(environ) - known
    args = relay_cli.build_parser().parse_args([])
    cfg = relay_config.from_values(relay_cli.gather(args, environ), default_hostname="unused")
    assert (cfg.upstream_host, cfg.upstream_port, cfg.upstream_tls) == (
        spec.upstream.host,
        spec.upstream.port,
        spec.upstream.tls,
    )
    assert (cfg.listen_port, cfg.admin_port) == (2525, 8025)
    assert cfg.max_sessions == spec.limits.max_sessions_per_pod
    assert cfg.max_message_size == spec.limits.max_message_size
    assert cfg.max_recipients == spec.limits.max_recipients
    assert tuple(str(n) for n in cfg.accept_from) == spec.accept_from
    assert cfg.drain_timeout == spec.drain_timeout_seconds
    assert str(cfg.spool) == manifests.SPOOL_PATH
    assert str(cfg.admin_token_file) == f"{manifests.ADMIN_TOKEN_DIR}/{manifests.ADMIN_TOKEN_KEY}"
    assert cfg.hostname == "outbound-7d9f-abcde"
    if spec.upstream.credentials_secret:
        assert cfg.upstream_user == "<username>"
        assert str(cfg.upstream_password_file) == f"{manifests.UPSTREAM_CREDENTIALS_DIR}/password"
    else:
        assert cfg.upstream_user is None and cfg.upstream_password_file is None


def _hash(spec: specmod.MailRelaySpec, image: str = "img:1", extra: dict[str, str] | None = None) -> str:
    dep = manifests.deployment(
        "r", "ns", spec, image=image, replicas=1, token_secret="r-admin", config_extra=extra
    )
    return dep["spec"]["template"]["metadata"]["annotations"][manifests.CONFIG_HASH_ANNOTATION]


@pytest.mark.parametrize(
    ("change", "rolls"),
    [
        (lambda s: dataclasses.replace(s, upstream=dataclasses.replace(s.upstream, port=2525)), True),
        (lambda s: dataclasses.replace(s, accept_from=("192.168.0.0/16",)), True),
        (lambda s: dataclasses.replace(s, limits=dataclasses.replace(s.limits, max_recipients=7)), True),
        (lambda s: dataclasses.replace(s, drain_timeout_seconds=30), True),
        (lambda s: dataclasses.replace(s, spool_size_limit="1Gi"), True),
        (lambda s: dataclasses.replace(s, replicas=specmod.ReplicaBounds(min=1, max=3, fixed=2)), False),
        (lambda s: dataclasses.replace(s, maintenance=True), False),
        (lambda s: dataclasses.replace(s, scaling=specmod.Scaling(interval_seconds=9)), False),
    ],
)
def test_config_hash_rolls_relay_changes_only(change: Any, rolls: bool) -> None:
    assert (_hash(change(MINIMAL)) != _hash(MINIMAL)) is rolls


def test_config_hash_follows_image_and_extra_inputs() -> None:
    assert _hash(MINIMAL) == _hash(MINIMAL)
    assert _hash(MINIMAL, image="img:2") != _hash(MINIMAL)
    assert _hash(MINIMAL, extra={"credentials": "rv-2"}) != _hash(MINIMAL, extra={"credentials": "rv-1"})


def test_replicas_do_not_change_the_template() -> None:
    a = manifests.deployment("r", "ns", MINIMAL, image="img", replicas=1, token_secret="r-admin")
    b = manifests.deployment("r", "ns", MINIMAL, image="img", replicas=9, token_secret="r-admin")
    assert a["spec"]["template"] == b["spec"]["template"]


def test_service_targets_the_smtp_port() -> None:
    svc = manifests.service("outbound", "mail")
    assert svc["spec"]["ports"] == [{"name": "smtp", "port": 25, "targetPort": "smtp", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == manifests.selector_labels("outbound")


def test_admin_secret_round_trip() -> None:
    secret = manifests.admin_secret("outbound", "mail", "tok-123")
    assert secret["data"] == {"token": base64.b64encode(b"tok-123").decode()}
    assert manifests.secret_token(secret) == "tok-123"
    assert manifests.secret_token({"stringData": {"token": "plain"}}) == "plain"
    assert manifests.secret_token({"data": {"token": "%%%"}}) is None
    assert manifests.secret_token({}) is None


@pytest.mark.parametrize("token", ["", " padded", "two\nlines"])
def test_admin_secret_rejects_bad_tokens(token: str) -> None:
    with pytest.raises(ValueError):
        manifests.admin_secret("outbound", "mail", token)


def test_pdb_allows_one_relay_down() -> None:
    pdb = manifests.pod_disruption_budget("outbound", "mail")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == {"matchLabels": manifests.selector_labels("outbound")}


def test_network_policy_opens_smtp_and_keeps_admin_to_the_operator() -> None:
    prometheus: kubetypes.NetworkPolicyPeer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }
    np = manifests.network_policy("outbound", "mail", OPERATOR_LABELS, "mailrelay-system", [prometheus])
    spec = np["spec"]
    assert spec["podSelector"] == {"matchLabels": manifests.selector_labels("outbound")}
    assert spec["policyTypes"] == ["Ingress"]
    smtp_rule, admin_rule = spec["ingress"]
    assert smtp_rule == {"ports": [{"port": "smtp", "protocol": "TCP"}]}  # no `from`: any client
    assert admin_rule["ports"] == [{"port": "admin", "protocol": "TCP"}]
    assert admin_rule["from"] == [
        {
            "podSelector": {"matchLabels": OPERATOR_LABELS},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mailrelay-system"}},
        },
        prometheus,
    ]
    anywhere = manifests.network_policy("outbound", "mail", OPERATOR_LABELS)
    assert anywhere["spec"]["ingress"][1]["from"][0]["namespaceSelector"] == {}


def test_network_policy_refuses_empty_operator_labels() -> None:
    with pytest.raises(ValueError):
        manifests.network_policy("outbound", "mail", {})
