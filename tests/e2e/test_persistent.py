"""Persistent spools (`spec.spool.persistent`) on the real control plane: the relays run as a
StatefulSet with a claim per relay.

Real: kube-apiserver, etcd, the StatefulSet controller (which removes the highest ordinals and, with
`whenScaled: Delete`, their claims after their pods), the persistentvolume-binder and protection
controllers, the scheduler's VolumeBinding, the garbage collector, the relays and the operator (its
chart's ServiceAccount token, so RBAC applies). Simulated: the kubelet and its volumes (a claim is a
folder that outlives its pod; the kubelet's `provisioner` binds each claim to a PersistentVolume at that
folder and removes the folder when the volume is reclaimed).

Promises: a relay deleted without a drain (SIGKILL, force-deleted pod: a lost node) comes back with the
same ordinal and claim and delivers everything it had accepted, exactly once; scale-in drains the
highest ordinal (not the idlest relay), a drain held by queued mail keeps its pod and claim, and the
claim goes only once its queue is empty. Waits are barriers (the operator's ticks, the relays' /status).
"""

from __future__ import annotations

import asyncio
import collections
import email.parser
import os
import signal
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from mailrelay_operator import kube as k
from mailrelay_operator import manifests, spec
from mailrelay_relay import spool as relay_spool
from mailrelay_sandbox import apiclient, kubelet, provisioner, scenario

from tests import kubeenv
from tests.e2e.conftest import eventually, secret
from tests.e2e.operator_harness import DRAIN_STARTED, Operator

pytestmark = pytest.mark.slow

NAME = "outbound"


@pytest.fixture
def node_options() -> dict[str, Any]:
    # No pod gets a grace period: a deleted pod's relay is killed at once, as on a lost node (a drained
    # relay has nothing left to lose).
    return {"extra_env": {"MAILRELAY_LOG_LEVEL": "warning"}, "max_grace_seconds": 0}


def delivered_counts(sink: scenario.Upstream) -> collections.Counter[str]:
    """How often each Message-ID reached the sink (a duplicate counts twice)."""
    parser = email.parser.BytesHeaderParser()
    ids = (parser.parsebytes(m.content).get("Message-ID") for m in sink.sink.messages)
    return collections.Counter(str(i).strip() for i in ids if i)


def queued(node: kubelet.ProcessKubelet, pod: str) -> int | None:
    runtime = node.runtimes.get(pod)
    status = runtime.last_status if runtime is not None else None
    return None if status is None else int(status["queue"]["messages"])


def set_replicas(kube: kubeenv.KubeEnv) -> int | None:
    sts = kube.get(k.STATEFULSETS, NAME)
    return None if sts is None else int(sts["spec"]["replicas"])


def pod_uid(kube: kubeenv.KubeEnv, pod: str) -> str | None:
    obj = kube.get(k.PODS, pod)
    return None if obj is None else str(obj["metadata"]["uid"])


def running_uid(node: kubelet.ProcessKubelet, pod: str) -> str | None:
    """The uid of the pod `pod` this kubelet runs, once its relay answers /status."""
    runtime = node.runtimes.get(pod)
    return runtime.uid if runtime is not None and runtime.last_status is not None else None


def is_dir(path: Path) -> bool:
    return path.is_dir()


def claim(kube: kubeenv.KubeEnv, ordinal: int) -> dict[str, Any] | None:
    return kube.get(k.PVCS, manifests.spool_claim_name(NAME, ordinal))


async def create(kube: kubeenv.KubeEnv, api: apiclient.Api, node: kubelet.ProcessKubelet,
                 operator: Operator, relays: int, **knobs: Any) -> None:
    await api.request("POST", kube.path(k.MAILRELAYS), scenario.mailrelay(
        NAME, kube.namespace, min_replicas=relays, max_replicas=relays + 1, spool_persistent="64Mi",
        **knobs))

    def running() -> bool:
        operator.check_running()
        return all(running_uid(node, f"{NAME}-{i}") is not None for i in range(relays))

    await eventually(running, within=120, what=f"{relays} relays of the StatefulSet answering /status")


# -- the provisioner and the real controllers, without the operator ---------------------------------


async def test_claims_bind_to_folders_that_outlive_pods_and_go_with_their_volume(
    kube: kubeenv.KubeEnv, node: kubelet.ProcessKubelet, api: apiclient.Api, tmp_path: Path,
) -> None:
    """The operator's StatefulSet, created by hand: the provisioner binds each claim to a volume at the
    kubelet's folder for it (pinned to this node), the scheduler places the pods, a replacement pod finds
    its predecessor's files, and scaling in removes the claim (whenScaled: Delete), then the folder."""
    parsed = spec.parse({"upstream": {"host": "upstream.sandbox.test"}, "acceptFrom": ["127.0.0.0/8"],
                         "spool": {"persistent": {"size": "64Mi"}}, "drain": {"timeoutSeconds": 5}})
    await api.request("POST", kube.path(k.SECRETS), secret(manifests.admin_secret_name(NAME), "s3cret"))
    sts = manifests.stateful_set(NAME, kube.namespace, parsed, image="mailrelay-relay:sandbox", replicas=2,
                                 token_secret=manifests.admin_secret_name(NAME))
    await api.request("POST", kube.path(k.STATEFULSETS), dict(sts))
    await eventually(lambda: None not in (running_uid(node, f"{NAME}-0"), running_uid(node, f"{NAME}-1")),
                     within=120,
                     what="both relays running")
    folders = {}
    for ordinal in (0, 1):
        bound = claim(kube, ordinal)
        assert bound is not None and bound["status"]["phase"] == "Bound", bound
        volume = kube.cluster.request("GET", f"/api/v1/persistentvolumes/{bound['spec']['volumeName']}")
        folder = Path(volume["spec"]["hostPath"]["path"])
        assert folder == provisioner.claim_folder(tmp_path / "pods", kube.namespace,
                                                  manifests.spool_claim_name(NAME, ordinal))
        assert is_dir(folder)
        terms = volume["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
        assert terms[0]["matchExpressions"][0]["values"] == [kube.node]
        folders[ordinal] = folder

    # A file on claim 0 survives its pod: the StatefulSet brings ordinal 0 back on the same claim.
    await asyncio.to_thread((folders[0] / "marker").write_text, "still here")
    old = pod_uid(kube, f"{NAME}-0")
    await api.request("DELETE", kube.path(k.PODS, f"{NAME}-0"))
    await eventually(lambda: running_uid(node, f"{NAME}-0") not in (None, old), within=120,
                     what="ordinal 0 replaced")
    assert await asyncio.to_thread((folders[0] / "marker").read_text) == "still here"

    # Scale in: the highest ordinal goes, then its claim, then its volume and folder.
    await api.patch(kube.path(k.STATEFULSETS, NAME), {"spec": {"replicas": 1}})
    await eventually(lambda: claim(kube, 1) is None, within=120, what="claim 1 deleted")
    await eventually(lambda: not is_dir(folders[1]), within=60, what="claim 1's folder removed")
    assert claim(kube, 0) is not None and is_dir(folders[0])


# -- with the operator --------------------------------------------------------------------------------


async def test_a_relay_lost_without_a_drain_comes_back_with_its_claim_and_delivers_everything_once(
    kube: kubeenv.KubeEnv, sink: scenario.Upstream, node: kubelet.ProcessKubelet, api: apiclient.Api,
    operator: Operator,
) -> None:
    await create(kube, api, node, operator, relays=1)
    pod = f"{NAME}-0"
    sink.defer(421)  # the upstream throttles: accepted mail stays in the spool
    try:
        accepted = await kubeenv.send_to_pod(node, pod, 5)
        await eventually(lambda: queued(node, pod) == len(accepted), what="5 messages queued on the relay")
        # The node is lost: the relay dies without a word (SIGKILL to its process group) and its pod is
        # force-deleted (grace 0), so nothing drains and nothing is flushed.
        runtime = node.runtimes[pod]
        old_uid = runtime.uid
        assert runtime.process is not None
        os.killpg(runtime.process.pid, signal.SIGKILL)
        await api.request("DELETE", kube.path(k.PODS, pod),
                          {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0})
        await eventually(lambda: running_uid(node, pod) not in (None, old_uid), within=120,
                         what="the StatefulSet's replacement for ordinal 0 running")
        bound = claim(kube, 0)
        assert bound is not None and bound["status"]["phase"] == "Bound"
        # The replacement recovered the spool from the claim: the same 5 messages, still held back.
        await eventually(lambda: queued(node, pod) == len(accepted), what="the 5 messages recovered")
        assert node.runtimes[pod].spool == provisioner.claim_folder(
            node.workdir, kube.namespace, manifests.spool_claim_name(NAME, 0))
        assert not accepted & sink.delivered_ids()
    finally:
        sink.defer(None)  # the upstream is back
    await eventually(lambda: accepted <= sink.delivered_ids(), within=120, what="all 5 delivered")
    await operator.ticks.wait(2, time.time(), "after the delivery")
    counts = delivered_counts(sink)
    assert {msgid: counts[msgid] for msgid in accepted} == dict.fromkeys(accepted, 1), "not exactly once"


async def test_scale_in_drains_the_highest_ordinal_holds_it_while_queued_then_removes_it_and_its_claim(
    kube: kubeenv.KubeEnv, sink: scenario.Upstream, node: kubelet.ProcessKubelet, api: apiclient.Api,
    operator: Operator,
) -> None:
    await create(kube, api, node, operator, relays=2, scale_down_stabilization=1, drain_timeout=2)
    low, high = f"{NAME}-0", f"{NAME}-1"
    sink.defer(421)
    try:
        # The highest ordinal holds mail and the lowest is idle: a Deployment would drain the idle one,
        # a StatefulSet can only remove the highest.
        accepted = await kubeenv.send_to_pod(node, high, 3)
        await eventually(lambda: queued(node, high) == 3, what="3 messages queued on the highest ordinal")
        await api.patch(kube.path(k.MAILRELAYS, NAME), {"spec": {"replicas": {"min": 1}}})
        await eventually(lambda: DRAIN_STARTED in (((kube.get(k.PODS, high) or {}).get("metadata") or {})
                                                   .get("annotations") or {}), within=60,
                         what="the highest ordinal draining")
        # Past the 2 s drain timeout with mail queued (KeepWhileQueued): held, tick after tick.
        await operator.ticks.wait(4, time.time() + 2, "the drain is held by queued mail")
        assert set_replicas(kube) == 2 and running_uid(node, high) is not None
        assert claim(kube, 1) is not None, "a held drain keeps its claim"
        low_pod = kube.get(k.PODS, low) or {}
        assert DRAIN_STARTED not in (low_pod["metadata"].get("annotations") or {})
    finally:
        sink.defer(None)
    await eventually(lambda: set_replicas(kube) == 1, within=120, what="replicas lowered once drained")
    await eventually(lambda: claim(kube, 1) is None, within=120, what="the drained ordinal's claim deleted")
    await eventually(lambda: accepted <= sink.delivered_ids(), within=60, what="all 3 delivered")
    ended = [t for t in node.terminations if t.pod == high]
    assert ended and ended[-1].spool_left == 0 and ended[-1].was_drained is True, ended
    assert running_uid(node, low) is not None and not any(t.pod == low for t in node.terminations)
    # The claim the StatefulSet condemned with its pod was never taken for an orphan and brought back.
    await operator.ticks.wait(2, time.time(), "after the scale-in")
    assert set_replicas(kube) == 1
    assert not [e for e in kube.events() if str(e.get("reason", "")).startswith("OrphanedSpool")]


def orphaned_spools(kube: kubeenv.KubeEnv) -> list[str] | None:
    body = kube.get(k.MAILRELAYS, NAME)
    return None if body is None else (body.get("status") or {}).get("orphanedSpools")


def operator_metric(operator: Operator, line_start: str) -> float | None:
    """A sample of the operator's /metrics whose line starts with `line_start`."""
    with urllib.request.urlopen(operator.ticks.url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
    return None


async def spool_into(folder: Path, count: int) -> set[str]:
    """`count` messages written into `folder` by the relay's own spool, as a relay that answered 250
    for them would have left them; their Message-IDs."""
    store = relay_spool.Spool(folder)
    ids: set[str] = set()
    for _ in range(count):
        msgid = f"<{uuid.uuid4().hex}@orphan.test>"
        content = (f"From: sender@example.org\r\nTo: rcpt@example.net\r\nSubject: left behind\r\n"
                   f"Message-ID: {msgid}\r\n\r\nkept on a claim nobody runs\r\n").encode()
        await store.store(relay_spool.Envelope("sender@example.org", ("rcpt@example.net",)), content,
                          time.time())
        ids.add(msgid)
    store.close()
    return ids


async def test_a_claim_left_beyond_the_set_is_reported_then_brought_back_and_delivered_once(
    kube: kubeenv.KubeEnv, sink: scenario.Upstream, node: kubelet.ProcessKubelet, api: apiclient.Api,
    operator: Operator,
) -> None:
    """A claim of ordinal 2 holding 3 accepted messages, left behind as a deleted MailRelay leaves its
    claims (whenDeleted: Retain), meets a MailRelay of 1 relay. In maintenance the operator only reports
    it (status, metric, a Warning Event); out of maintenance it brings ordinal 2 back, whose relay
    delivers the 3 messages, then drains it and lowers the set, and the StatefulSet deletes its claim."""
    orphan = manifests.spool_claim_name(NAME, 2)
    await api.request("POST", kube.path(k.PVCS), {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": orphan, "labels": dict(manifests.selector_labels(NAME))},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "64Mi"}}},
    })
    await eventually(lambda: ((claim(kube, 2) or {}).get("status") or {}).get("phase") == "Bound",
                     within=60, what="the left-behind claim bound")
    left = await spool_into(provisioner.claim_folder(node.workdir, kube.namespace, orphan), 3)

    await create(kube, api, node, operator, relays=1, maintenance=True)
    await eventually(lambda: orphaned_spools(kube) == [orphan], within=60, what="status.orphanedSpools")
    await operator.ticks.wait(2, time.time(), "in maintenance, with the orphan")
    assert set_replicas(kube) == 1 and orphaned_spools(kube) == [orphan], "not brought back in maintenance"
    metric = f'mailrelay_operator_orphaned_spools{{mailrelay="{NAME}",namespace="{kube.namespace}"}}'
    assert await asyncio.to_thread(operator_metric, operator, metric) == 1.0
    warned = [e for e in kube.events() if e.get("reason") == "OrphanedSpool"]
    assert warned and orphan in warned[0]["message"] and warned[0]["type"] == "Warning", warned
    assert not left & sink.delivered_ids()

    await api.patch(kube.path(k.MAILRELAYS, NAME), {"spec": {"maintenance": False}})
    await eventually(lambda: left <= sink.delivered_ids(), within=120,
                     what="the 3 messages of the orphaned claim delivered")
    assert any(e.get("reason") == "OrphanedSpoolRecovering" for e in kube.events())
    await eventually(lambda: claim(kube, 2) is None and claim(kube, 1) is None, within=120,
                     what="the brought-back ordinals drained, removed, and their claims deleted")
    await eventually(lambda: orphaned_spools(kube) == [], within=60, what="status.orphanedSpools empty")
    assert set_replicas(kube) == 1
    assert await asyncio.to_thread(operator_metric, operator, metric) == 0.0
    counts = delivered_counts(sink)
    assert {msgid: counts[msgid] for msgid in left} == dict.fromkeys(left, 1), "not exactly once"
    ended = [t for t in node.terminations if t.pod == f"{NAME}-2"]
    assert ended and ended[-1].spool_left == 0 and ended[-1].was_drained is True, ended
