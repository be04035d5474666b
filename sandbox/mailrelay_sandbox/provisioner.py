"""The sandbox's volume provisioner: a PersistentVolume for each PersistentVolumeClaim of a node's pods.

A process kubelet (`kubelet.ProcessKubelet`) mounts a pod's claim as the folder
`<workdir>/claims/<namespace>/<claim>`, which outlives the pod. This provisioner, run by that kubelet
for its node, gives the real control plane what it needs to schedule such a pod:
- a claim that is Pending and names no volume, in a namespace pinned to this node (the namespace's
  PodNodeSelector annotation, as the tests pin theirs), gets a new PersistentVolume `sandbox-<claim
  uid>`, pre-bound to it (`claimRef` with the claim's uid), of the claim's size, access modes and
  StorageClass, with a `hostPath` at that folder and a node affinity for this node. The real
  persistentvolume-binder controller then binds the claim, and the real scheduler's VolumeBinding
  plugin places the pod on this node;
- a volume of ours that is Released with reclaimPolicy Delete (its claim was deleted: a StatefulSet's
  `whenScaled: Delete`, or by hand) has its folder removed and is deleted; so has the folder of a volume
  of ours that is deleted. The volumes carry `pv.kubernetes.io/provisioned-by`, so the binder controller
  leaves their deletion to this provisioner, as it does for any external provisioner.

It provisions nothing else (no StorageClass, no dynamic provisioning by class, no capacity), and it
must not touch claims, pods or volumes that are not its own. Never imported by `relay/` or `operator/`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any

from mailrelay_sandbox import apiclient, kubecluster

log = logging.getLogger("mailrelay_sandbox.provisioner")

Obj = dict[str, Any]
PROVISIONER = "sandbox.mailrelay.dev/process-kubelet"
PROVISIONED_BY_ANNOTATION = "pv.kubernetes.io/provisioned-by"
NODE_LABEL = "sandbox.mailrelay.dev/node"  # on our volumes: the node whose folder holds the data
PV_PREFIX = "sandbox-"


def claim_folder(workdir: Path, namespace: str, claim: str) -> Path:
    """Where the kubelet mounts claim `claim` (the same path `kubelet` uses)."""
    return workdir / "claims" / namespace / claim


def pinned_node(namespace: Obj) -> str | None:
    """The node a namespace's PodNodeSelector annotation pins its pods to, if it names one hostname."""
    selector = ((namespace.get("metadata") or {}).get("annotations") or {}).get(
        kubecluster.NODE_SELECTOR_ANNOTATION, "")
    for term in str(selector).split(","):
        key, _, value = term.strip().partition("=")
        if key == "kubernetes.io/hostname" and value:
            return value
    return None


def volume_for(claim: Obj, node: str, folder: Path) -> Obj:
    """The PersistentVolume for `claim`, pre-bound to it, at `folder` on `node`."""
    meta, spec = claim["metadata"], claim.get("spec") or {}
    size = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
    volume_spec: Obj = {
        "capacity": {"storage": size},
        "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
        "persistentVolumeReclaimPolicy": "Delete",
        "storageClassName": spec.get("storageClassName") or "",
        "volumeMode": spec.get("volumeMode") or "Filesystem",
        "hostPath": {"path": str(folder), "type": "DirectoryOrCreate"},
        "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                     "name": meta["name"], "uid": meta["uid"]},
        "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}},
    }
    return {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": f"{PV_PREFIX}{meta['uid']}", "labels": {NODE_LABEL: node},
                     "annotations": {PROVISIONED_BY_ANNOTATION: PROVISIONER}},
        "spec": volume_spec,
    }


class Provisioner:
    """One node's provisioner; `sync()` is one pass (the kubelet calls it from its loop)."""

    def __init__(self, api: apiclient.Api, node: str, workdir: Path) -> None:
        self.api = api
        self.node = node
        self.workdir = workdir
        self.folders: dict[str, Path] = {}  # our volumes seen so far -> their folders
        self.provisioned = 0
        self.reclaimed = 0

    async def sync(self) -> None:
        await self._provision()
        await self._reclaim()

    async def _provision(self) -> None:
        claims = [c for c in await self.api.items("/api/v1/persistentvolumeclaims")
                  if (c.get("status") or {}).get("phase", "Pending") == "Pending"
                  and not (c.get("spec") or {}).get("volumeName")
                  and not c["metadata"].get("deletionTimestamp")]
        if not claims:
            return
        pinned: dict[str, str | None] = {}
        for claim in claims:
            namespace = claim["metadata"]["namespace"]
            if namespace not in pinned:
                ns = await self.api.get_or_none(f"/api/v1/namespaces/{namespace}")
                pinned[namespace] = pinned_node(ns) if ns is not None else None
            if pinned[namespace] != self.node:
                continue
            folder = claim_folder(self.workdir, namespace, claim["metadata"]["name"])
            folder.mkdir(parents=True, exist_ok=True)
            try:
                volume = volume_for(claim, self.node, folder)
                await self.api.request("POST", "/api/v1/persistentvolumes", volume)
            except apiclient.ApiError as exc:
                if exc.status != 409:  # made at an earlier pass: the binder has not caught up yet
                    raise
                continue
            self.provisioned += 1
            log.info("provisioned a volume for claim %s/%s at %s", namespace, claim["metadata"]["name"],
                     folder)

    async def _reclaim(self) -> None:
        volumes = await self.api.items(f"/api/v1/persistentvolumes?labelSelector={NODE_LABEL}%3D{self.node}")
        present = set()
        for volume in volumes:
            name = volume["metadata"]["name"]
            folder = Path(((volume.get("spec") or {}).get("hostPath") or {}).get("path", ""))
            if not str(folder).startswith(str(self.workdir / "claims")):
                continue  # not a folder of this kubelet's: never removed here
            present.add(name)
            self.folders[name] = folder
            released = (volume.get("status") or {}).get("phase") == "Released"
            if released and volume["spec"].get("persistentVolumeReclaimPolicy") == "Delete":
                shutil.rmtree(folder, ignore_errors=True)
                with contextlib.suppress(apiclient.ApiError):
                    await self.api.request("DELETE", f"/api/v1/persistentvolumes/{name}")
                self.reclaimed += 1
                log.info("reclaimed volume %s (its claim is gone): removed %s", name, folder)
        for name in [n for n in self.folders if n not in present]:
            shutil.rmtree(self.folders.pop(name), ignore_errors=True)  # deleted by someone else
