"""Builders for the objects a MailRelay owns: the relays' workload (a Deployment with an emptyDir spool,
or a StatefulSet with a claim per relay when spec.spool.persistent is set), Service, admin Secret,
PodDisruptionBudget and NetworkPolicy, each as a complete object dict (labels per docs/contracts.md).

The relay container is configured only through `MAILRELAY_*` environment variables (docs/contracts.md,
"Relay CLI"). The pod template carries a hash of the relay's configuration, so a spec change that
alters a relay rolls the Deployment out, while changes that only steer the operator (scaling, replicas,
maintenance) do not restart relays.

Pure: no I/O, no clock, no randomness (the admin token is passed in). No ownerReferences either: the
shell adopts the objects with kopf.adopt.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence

from mailrelay_operator import kubetypes
from mailrelay_operator import spec as specmod

NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
APP_NAME = "mailrelay"
MANAGER = "mailrelay-operator"
CONFIG_HASH_ANNOTATION = "mailrelay.dev/config-hash"

CONTAINER_NAME = "relay"
SMTP_PORT = 2525
ADMIN_PORT = 8025
SERVICE_SMTP_PORT = 25
SPOOL_PATH = "/var/spool/mailrelay"
SPOOL_VOLUME = "spool"  # the volume (and, with a persistent spool, volumeClaimTemplate) name
ADMIN_TOKEN_DIR = "/etc/mailrelay/admin"
ADMIN_TOKEN_KEY = "token"
UPSTREAM_CREDENTIALS_DIR = "/etc/mailrelay/upstream"
RUN_AS = 10001  # the image's non-root user and group (Dockerfile)
# The relay's --spool-max-bytes is this share of spec.spool.sizeLimit: the relay answers 452 4.3.1 before
# the kubelet would evict the pod for outgrowing its emptyDir (the margin covers files the relay does
# not count, such as directories, and its block rounding being an estimate).
SPOOL_MAX_BYTES_PERCENT = 90
# The pod outlives the relay's own SIGTERM drain (which lasts at most the drain timeout) by this much.
TERMINATION_GRACE_MARGIN_SECONDS = 30


def labels(name: str) -> dict[str, str]:
    """Labels on every object owned by MailRelay `name`."""
    return {NAME_LABEL: APP_NAME, INSTANCE_LABEL: name, MANAGED_BY_LABEL: MANAGER}


def selector_labels(name: str) -> dict[str, str]:
    """The pod selector of MailRelay `name` (immutable in a Deployment, so kept minimal)."""
    return {NAME_LABEL: APP_NAME, INSTANCE_LABEL: name}


def selector(name: str) -> str:
    """The selector as a string, for status.selector (the scale subresource's labelSelectorPath)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(name).items()))


def admin_secret_name(name: str) -> str:
    return f"{name}-admin"


def _meta(name: str, namespace: str, owner: str) -> kubetypes.ObjectMeta:
    return {"name": name, "namespace": namespace, "labels": labels(owner)}


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def relay_env(spec: specmod.MailRelaySpec) -> list[kubetypes.EnvVar]:
    """The relay's configuration as MAILRELAY_* variables, built from the spec."""
    env: list[kubetypes.EnvVar] = [
        {"name": "MAILRELAY_LISTEN", "value": f"0.0.0.0:{SMTP_PORT}"},
        {"name": "MAILRELAY_ADMIN_LISTEN", "value": f"0.0.0.0:{ADMIN_PORT}"},
        {"name": "MAILRELAY_ADMIN_TOKEN_FILE", "value": f"{ADMIN_TOKEN_DIR}/{ADMIN_TOKEN_KEY}"},
        {"name": "MAILRELAY_SPOOL", "value": SPOOL_PATH},
        {"name": "MAILRELAY_UPSTREAM", "value": _hostport(spec.upstream.host, spec.upstream.port)},
        {"name": "MAILRELAY_UPSTREAM_TLS", "value": spec.upstream.tls},
        {"name": "MAILRELAY_ACCEPT_FROM", "value": ",".join(spec.accept_from)},
        {"name": "MAILRELAY_MAX_SESSIONS", "value": str(spec.limits.max_sessions_per_pod)},
        {"name": "MAILRELAY_MAX_MESSAGE_SIZE", "value": str(spec.limits.max_message_size)},
        {"name": "MAILRELAY_MAX_RECIPIENTS", "value": str(spec.limits.max_recipients)},
        {"name": "MAILRELAY_DRAIN_TIMEOUT", "value": str(spec.drain_timeout_seconds)},
        {"name": "MAILRELAY_HOSTNAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    size_limit = specmod.spool_limit_bytes(spec)
    if size_limit is not None:
        env.append({"name": "MAILRELAY_SPOOL_MAX_BYTES", "value": str(spool_max_bytes(size_limit))})
    if spec.upstream.credentials_secret is not None:
        env.append(
            {
                "name": "MAILRELAY_UPSTREAM_USER",
                "valueFrom": {"secretKeyRef": {"name": spec.upstream.credentials_secret, "key": "username"}},
            }
        )
        env.append(
            {"name": "MAILRELAY_UPSTREAM_PASSWORD_FILE", "value": f"{UPSTREAM_CREDENTIALS_DIR}/password"}
        )
        if spec.upstream.allow_plaintext_auth:
            env.append({"name": "MAILRELAY_UPSTREAM_ALLOW_PLAINTEXT_AUTH", "value": "true"})
    return env


def spool_max_bytes(size_limit: int) -> int:
    """The relay's --spool-max-bytes for a spool volume of `size_limit` bytes (at least 1)."""
    return max(1, size_limit * SPOOL_MAX_BYTES_PERCENT // 100)


def config_hash(spec: specmod.MailRelaySpec, image: str, extra: Mapping[str, str] | None = None) -> str:
    """A short hash of everything that shapes a relay pod. `extra` lets the shell add inputs the spec
    cannot show, such as the resourceVersion of the upstream credentials Secret, to roll on rotation."""
    inputs = {
        "image": image,
        "env": relay_env(spec),
        "resources": [[kind, list(map(list, pairs))] for kind, pairs in spec.resources],
        "spool": spec.spool_size_limit,
        "grace": spec.drain_timeout_seconds,
        "extra": dict(sorted((extra or {}).items())),
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return digest[:16]


def _resources(spec: specmod.MailRelaySpec) -> kubetypes.ResourceRequirements:
    out: kubetypes.ResourceRequirements = {}
    for kind, pairs in spec.resources:
        values: dict[str, str | int] = dict(pairs)
        if kind == "requests":
            out["requests"] = values
        elif kind == "limits":
            out["limits"] = values
    return out


def _pod_template(
    name: str,
    spec: specmod.MailRelaySpec,
    *,
    image: str,
    token_secret: str,
    config_extra: Mapping[str, str] | None,
) -> kubetypes.PodTemplateSpec:
    """The relay pod template, the same for both spool modes. With a persistent spool the `spool` volume
    is not in it: the StatefulSet's volumeClaimTemplate of that name provides it."""
    relay_image = spec.image or image
    volumes: list[kubetypes.Volume] = []
    if spec.spool_persistent is None:
        empty_dir: kubetypes.EmptyDirVolumeSource = {}
        if spec.spool_size_limit:
            empty_dir["sizeLimit"] = spec.spool_size_limit
        volumes.append({"name": SPOOL_VOLUME, "emptyDir": empty_dir})
    volumes += [
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
        {
            "name": "admin-token",
            "secret": {
                "secretName": token_secret,
                "items": [{"key": ADMIN_TOKEN_KEY, "path": ADMIN_TOKEN_KEY}],
                "defaultMode": 0o440,
            },
        },
    ]
    mounts: list[kubetypes.VolumeMount] = [
        {"name": SPOOL_VOLUME, "mountPath": SPOOL_PATH},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "admin-token", "mountPath": ADMIN_TOKEN_DIR, "readOnly": True},
    ]
    if spec.upstream.credentials_secret is not None:
        volumes.append(
            {
                "name": "upstream-credentials",
                "secret": {
                    "secretName": spec.upstream.credentials_secret,
                    "items": [{"key": "password", "path": "password"}],
                    "defaultMode": 0o440,
                },
            }
        )
        mounts.append(
            {"name": "upstream-credentials", "mountPath": UPSTREAM_CREDENTIALS_DIR, "readOnly": True}
        )

    container: kubetypes.Container = {
        "name": CONTAINER_NAME,
        "image": relay_image,
        "ports": [
            {"name": "smtp", "containerPort": SMTP_PORT, "protocol": "TCP"},
            {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        "env": relay_env(spec),
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "admin"},
            "periodSeconds": 2,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
            "successThreshold": 1,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "admin"},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": "admin"},
            "periodSeconds": 2,
            "timeoutSeconds": 2,
            "failureThreshold": 60,
        },
        "volumeMounts": mounts,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    resources = _resources(spec)
    if resources:
        container["resources"] = resources

    return {
        "metadata": {
            "labels": labels(name),
            "annotations": {CONFIG_HASH_ANNOTATION: config_hash(spec, relay_image, config_extra)},
        },
        "spec": {
            "containers": [container],
            "volumes": volumes,
            "terminationGracePeriodSeconds": spec.drain_timeout_seconds
            + TERMINATION_GRACE_MARGIN_SECONDS,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": RUN_AS,
                "runAsGroup": RUN_AS,
                "fsGroup": RUN_AS,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            # Spread relays over nodes and zones where possible, so one node loss takes few.
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": key,
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": {"matchLabels": selector_labels(name)},
                }
                for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")
            ],
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
        },
    }


def deployment(
    name: str,
    namespace: str,
    spec: specmod.MailRelaySpec,
    *,
    image: str,
    replicas: int,
    token_secret: str,
    config_extra: Mapping[str, str] | None = None,
) -> kubetypes.Deployment:
    """The relay Deployment (emptyDir spool). `image` is the operator's --relay-image unless spec.image
    overrides it; `token_secret` names the Secret whose key `token` holds the admin token."""
    if replicas < 0:
        raise ValueError("replicas must not be negative")
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, namespace, name),
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(name)},
            # One new relay at a time and never fewer ready relays; old relays drain on SIGTERM.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": _pod_template(
                name, spec, image=image, token_secret=token_secret, config_extra=config_extra
            ),
        },
    }


def stateful_set(
    name: str,
    namespace: str,
    spec: specmod.MailRelaySpec,
    *,
    image: str,
    replicas: int,
    token_secret: str,
    config_extra: Mapping[str, str] | None = None,
) -> kubetypes.StatefulSet:
    """The relay StatefulSet (spec.spool.persistent): the same pod as the Deployment's, with the spool
    from a claim `spool-<name>-<ordinal>` per relay. A claim comes back with its ordinal, so a relay
    deleted without a drain (lost node, forced delete) restarts on the mail it had accepted.

    Retention (docs/operator.md, "Spool modes"): whenScaled Delete removes a scaled-away ordinal's claim,
    which the StatefulSet controller does only after the pod is gone, and the operator lowers replicas
    only past a finished drain (or a Remove onTimeout decision). whenDeleted Retain keeps the claims when
    the MailRelay (and so the StatefulSet) is deleted: its deletion drains only until the drain timeout,
    and whatever is left stays recoverable by creating a MailRelay of the same name again."""
    if replicas < 0:
        raise ValueError("replicas must not be negative")
    persistent = spec.spool_persistent
    if persistent is None:
        raise ValueError("a StatefulSet needs spec.spool.persistent")
    claim_spec: kubetypes.PersistentVolumeClaimSpec = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": persistent.size}},
    }
    if persistent.storage_class_name is not None:
        claim_spec["storageClassName"] = persistent.storage_class_name
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(name, namespace, name),
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 3,
            "serviceName": name,
            # Start and stop relays in parallel: the operator orders scale-in itself (drain first).
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": selector_labels(name)},
            "template": _pod_template(
                name, spec, image=image, token_secret=token_secret, config_extra=config_extra
            ),
            "volumeClaimTemplates": [
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {"name": SPOOL_VOLUME, "labels": labels(name)},
                    "spec": claim_spec,
                }
            ],
            "persistentVolumeClaimRetentionPolicy": {"whenScaled": "Delete", "whenDeleted": "Retain"},
        },
    }


def spool_claim_prefix(name: str) -> str:
    """The claims of MailRelay `name`'s StatefulSet are `<prefix>-<ordinal>`."""
    return f"{SPOOL_VOLUME}-{name}"


def spool_claim_name(name: str, ordinal: int) -> str:
    """The claim the StatefulSet of MailRelay `name` makes for the relay with `ordinal`."""
    return f"{spool_claim_prefix(name)}-{ordinal}"


def service(name: str, namespace: str) -> kubetypes.Service:
    """ClusterIP Service `name` on port 25 to the relays' `smtp` port (only ready relays get traffic)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, namespace, name),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [{"name": "smtp", "port": SERVICE_SMTP_PORT, "targetPort": "smtp", "protocol": "TCP"}],
        },
    }


def admin_secret(name: str, namespace: str, token: str) -> kubetypes.Secret:
    """Secret `<name>-admin` with key `token` (base64 in `data`, as the API returns it)."""
    if not token or token.strip() != token or "\n" in token:
        raise ValueError("the admin token must be a non-empty single line without surrounding spaces")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(admin_secret_name(name), namespace, name),
        "type": "Opaque",
        "data": {ADMIN_TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def secret_token(secret: kubetypes.Secret) -> str | None:
    """The admin token held by a Secret read from the API (None when absent or unreadable)."""
    raw = (secret.get("data") or {}).get(ADMIN_TOKEN_KEY)
    if raw is None:
        string = (secret.get("stringData") or {}).get(ADMIN_TOKEN_KEY)
        return string or None
    try:
        return base64.b64decode(raw, validate=True).decode() or None
    except (ValueError, UnicodeDecodeError):
        return None


def pod_disruption_budget(name: str, namespace: str) -> kubetypes.PodDisruptionBudget:
    """At most one relay evicted at a time (draining relays count as unavailable, so an eviction waits
    for a running drain). Unhealthy relays may always be evicted: they drain on SIGTERM themselves."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(name, namespace, name),
        "spec": {
            "selector": {"matchLabels": selector_labels(name)},
            "maxUnavailable": 1,
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def network_policy(
    name: str,
    namespace: str,
    operator_labels: Mapping[str, str],
    operator_namespace: str | None = None,
    admin_peers: Sequence[kubetypes.NetworkPolicyPeer] = (),
) -> kubetypes.NetworkPolicy:
    """SMTP open to all; the admin port only from operator pods (labels `operator_labels`, in
    `operator_namespace`, or in any namespace when None) and from `admin_peers` (e.g. Prometheus, which
    scrapes /metrics on the admin port)."""
    if not operator_labels:
        raise ValueError("operator_labels must not be empty: it would open the admin port to every pod")
    operator_peer: kubetypes.NetworkPolicyPeer = {"podSelector": {"matchLabels": dict(operator_labels)}}
    if operator_namespace is None:
        operator_peer["namespaceSelector"] = {}
    else:
        operator_peer["namespaceSelector"] = {
            "matchLabels": {"kubernetes.io/metadata.name": operator_namespace}
        }
    smtp_rule: kubetypes.NetworkPolicyIngressRule = {"ports": [{"port": "smtp", "protocol": "TCP"}]}
    admin_rule: kubetypes.NetworkPolicyIngressRule = {
        "from": [operator_peer, *admin_peers],
        "ports": [{"port": "admin", "protocol": "TCP"}],
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(name, namespace, name),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(name)},
            "policyTypes": ["Ingress"],
            "ingress": [smtp_rule, admin_rule],
        },
    }


def scraper_peer(labels: Mapping[str, str], namespace: str | None) -> kubetypes.NetworkPolicyPeer | None:
    """The NetworkPolicy peer of the metrics scraper (Prometheus) that may reach the relays' admin port
    for /metrics: pods with `labels` (any pod when empty) in `namespace` (any namespace when None).
    None when neither is given: no scraper is admitted (both empty would admit every pod)."""
    if not labels and not namespace:
        return None
    peer: kubetypes.NetworkPolicyPeer = {}
    if labels:
        peer["podSelector"] = {"matchLabels": dict(labels)}
    peer["namespaceSelector"] = (
        {"matchLabels": {"kubernetes.io/metadata.name": namespace}} if namespace else {}
    )
    return peer
