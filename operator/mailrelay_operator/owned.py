"""The objects a MailRelay owns: its admin Secret, relay workload (a Deployment, or a StatefulSet with a
persistent spool: `workload`), Service, PodDisruptionBudget and NetworkPolicy, created or repaired by
server-side apply (`kube.ensure`), with owner references.

The scaling loop (`scaling.tick`) is the one caller: at its first tick, after a spec change (a new
generation) and every `--resync-seconds`, so two writers never race over the same objects.

What it must not do: decide replica counts beyond the first one (the scaling loop owns
`spec.replicas` once the Deployment exists), or build manifests (that is `manifests`).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import Any, cast

import kopf

from mailrelay_operator import kube, kubetypes, manifests, policy, runtime, spec

logger = logging.getLogger("mailrelay_operator.owned")


async def ensure(
    rt: runtime.Runtime, body: Mapping[str, Any], parsed: spec.MailRelaySpec, memory: runtime.Memory
) -> dict[str, str]:
    """Create or repair the Secret, Deployment, Service, PDB and NetworkPolicy. Returns kind -> action."""
    namespace, name = runtime.meta(body)
    owner = cast(Any, body)  # kopf.adopt only reads metadata (a Body or a dict)
    secret_name = manifests.admin_secret_name(name)
    secret = manifests.admin_secret(name, namespace, secrets.token_urlsafe(32))
    workload_res = workload(parsed)
    live_deployment = await rt.kube.get(workload_res, namespace, name)
    replicas = initial_replicas(body, parsed)
    build = manifests.deployment if parsed.spool_persistent is None else manifests.stateful_set
    deployment: Any = build(
        name,
        namespace,
        parsed,
        image=parsed.image or rt.config.relay_image,
        replicas=replicas,
        token_secret=secret_name,
    )
    if live_deployment is not None:
        # The scaling loop owns the replica count once the Deployment exists. The count the create
        # applied stays ours until the loop first writes it; until then it is applied unchanged, under
        # the live resourceVersion, so a write of the loop in between is never undone (409, retried).
        if kube.manager_owns(live_deployment, ("spec", "replicas")):
            deployment["spec"]["replicas"] = live_deployment["spec"]["replicas"]
            deployment["metadata"]["resourceVersion"] = live_deployment["metadata"]["resourceVersion"]
        else:
            del deployment["spec"]["replicas"]
    scraper = manifests.scraper_peer(rt.config.metrics_scraper_labels, rt.config.metrics_scraper_namespace)
    objects: list[Any] = [
        secret,
        deployment,
        manifests.service(name, namespace),
        manifests.pod_disruption_budget(name, namespace),
        manifests.network_policy(
            name,
            namespace,
            dict(rt.config.operator_labels),
            operator_namespace=rt.config.operator_namespace,
            admin_peers=[scraper] if scraper is not None else [],
        ),
    ]
    kopf.adopt(objects, owner=owner)
    actions: dict[str, str] = {}
    for obj in objects:
        known: Any = live_deployment if obj["kind"] == workload_res.kind else "unknown"
        live, action = await rt.kube.ensure(obj, create_only=obj["kind"] == "Secret", live=known)
        actions[obj["kind"]] = action
        if obj["kind"] == "Secret":
            memory.token = manifests.secret_token(cast(kubetypes.Secret, live))
    if live_deployment is None:
        logger.info("%s/%s: created the %s with %d replicas", namespace, name, workload_res.kind, replicas)
    return actions


def workload(parsed: spec.MailRelaySpec) -> kube.Resource:
    """The relays' workload: a StatefulSet with a persistent spool, else a Deployment."""
    return kube.DEPLOYMENTS if parsed.spool_persistent is None else kube.STATEFULSETS


def initial_replicas(body: Mapping[str, Any], parsed: spec.MailRelaySpec) -> int:
    """The replica count a new Deployment starts with: the last desired count in the status (a Deployment
    deleted by hand comes back at its size), else the fixed count, else the minimum."""
    status = body.get("status") or {}
    desired = status.get("desiredReplicas")
    if isinstance(desired, int) and desired >= 0:
        return policy.clamp(desired, parsed.replicas) if parsed.replicas.fixed is None else desired
    if parsed.replicas.fixed is not None:
        return parsed.replicas.fixed
    return parsed.replicas.min


async def token(rt: runtime.Runtime, namespace: str, name: str, memory: runtime.Memory) -> str | None:
    """The relays' admin token, from memory or else from the admin Secret (None while it is missing)."""
    if memory.token is None:
        secret_obj = await rt.kube.get(kube.SECRETS, namespace, manifests.admin_secret_name(name))
        if secret_obj is not None:
            memory.token = manifests.secret_token(cast(kubetypes.Secret, secret_obj))
    return memory.token
