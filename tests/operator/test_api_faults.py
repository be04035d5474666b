"""API-level fault tests of the operator (issue 6 §2): one relay's admin endpoint unreachable, and a relay
that never finishes draining so the timeout path runs. The real operator (Kopf, in-process) runs against
the emulated API server, with real relays on 127.A.B.x (simulated ReplicaSet + kubelet) and mail counted
at the upstream sink by Message-ID.

It must not edit the harness or the operator; helpers for these tests only live here.
"""

from __future__ import annotations

import asyncio
import smtplib
import time
import uuid
from email.message import EmailMessage

from mailrelay_operator import drain, metrics
from mailrelay_sandbox import controlplane, kubeemu, scenario

from tests.operator.conftest import NAMESPACE, OperatorHarness, Sessions, eventually
from tests.operator.test_api_scaling import (
    MR_PATH,
    NAME,
    condition,
    events,
    ever_annotated,
    live_pods,
    replicas,
    start,
)

# -- helpers -----------------------------------------------------------------------------------------


def _send_one(ip: str, port: int, msgid: str) -> None:
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = "rcpt@example.net"
    msg["Subject"] = "fault test"
    msg["Message-ID"] = msgid
    msg.set_content("fault matrix\n")
    with smtplib.SMTP(ip, port, timeout=20) as smtp:
        smtp.ehlo("faults.example")
        # send_message raises unless the end of DATA got a 2xx: returning means the relay said 250.
        refused = smtp.send_message(msg)
        assert not refused, refused


async def send(cluster: controlplane.ControlPlane, pod: str, count: int) -> set[str]:
    """Send `count` messages to one relay; return the Message-IDs that got a 250 (all, or it raises)."""
    runtime = cluster.runtimes[pod]
    accepted: set[str] = set()
    for _ in range(count):
        msgid = f"<{uuid.uuid4().hex}@faults.test>"
        await asyncio.to_thread(_send_one, runtime.ip, runtime.smtp_port, msgid)
        accepted.add(msgid)
    return accepted


def sample(name: str, labels: dict[str, str]) -> float:
    """A sample of the in-process operator's registry (0 when the series does not exist yet)."""
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def scrape_errors() -> float:
    return sample("mailrelay_operator_scrape_errors_total", {"namespace": NAMESPACE, "mailrelay": NAME})


def timed_out_drains() -> float:
    return sample("mailrelay_operator_drain_duration_seconds_count", {"outcome": drain.OUTCOME_TIMEOUT})


def reasons(api: kubeemu.Running) -> list[str]:
    return [reason for reason, _ in events(api)]


def pod_status_path(pod: str) -> str:
    return f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}/status"


async def delivered_all(sink: scenario.Upstream, ids: set[str], within: float = 30.0) -> None:
    await eventually(
        lambda: ids <= sink.delivered_ids(), within=within, what=f"{len(ids)} messages delivered"
    )


# -- tests -------------------------------------------------------------------------------------------


async def test_unreachable_admin_endpoint_blocks_scale_down_until_it_answers(
    api: kubeemu.Running,
    operator: OperatorHarness,
    cluster: controlplane.ControlPlane,
    client: controlplane.Api,
    sink: scenario.Upstream,
) -> None:
    """One relay's admin endpoint cannot be reached while the load is gone.

    Fault: the pod's `status.podIP` is pointed at 127.A.B.1, where nothing listens (no pod ever gets .1),
    so the operator's `GET /status` fails at once (connection refused) while the kubelet, which probes the
    relay from the node, keeps it Ready and Running — as with a NetworkPolicy that shuts the operator out
    of `admin`, or a stale pod IP. (A SIGSTOPped relay would not test this rule: its readiness fails too,
    and a NotReady relay is left out of the scale-down arithmetic by design, docs/operator.md §3.)

    Expected: both relays idle and `replicas.min` lowered to 1, so a healthy pool would drain one; but the
    missing metric blocks every scale-down (DESIGN §6, docs/operator.md §3: `PartialMetrics`): no drain
    annotation, no Event, the Deployment stays at 2, and `scrape_errors_total` counts the failures. Once
    the endpoint answers again the normal drain-first scale-in runs (DrainStarted, DrainCompleted,
    ScaledDown; the removed relay was drained, its spool empty). Nothing that got a 250 is lost: every
    accepted Message-ID reaches the upstream sink.
    """
    await start(api, client, cluster, min_replicas=2, max_replicas=3, scale_down_stabilization=1)
    a, b = sorted(live_pods(api))
    accepted = await send(cluster, a, 3) | await send(cluster, b, 3)

    good_ip = cluster.runtimes[b].ip
    bad_ip = good_ip.rsplit(".", 1)[0] + ".1"
    before = scrape_errors()
    await client.patch(pod_status_path(b), {"status": {"podIP": bad_ip, "podIPs": [{"ip": bad_ip}]}})
    await client.patch(MR_PATH, {"spec": {"replicas": {"min": 1}}})

    await eventually(
        lambda: condition(api, "Scaling").get("reason") == "PartialMetrics", within=30, what="PartialMetrics"
    )
    # Several ticks (intervalSeconds 1) with the metric missing: scrape errors counted, nothing drained.
    await eventually(lambda: scrape_errors() >= before + 3, within=30, what="3 scrape errors counted")
    assert cluster.runtimes[b].ready, "the kubelet still sees the relay as Ready"
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        pod_ip = (live_pods(api)[b].get("status") or {}).get("podIP")
        assert pod_ip == bad_ip, "the simulated kubelet rewrote the pod's status (readiness flickered)"
        assert not ever_annotated(api, a) and not ever_annotated(api, b), "drained on partial metrics"
        assert replicas(api) == 2 and set(live_pods(api)) == {a, b}
        await asyncio.sleep(0.2)
    assert not {"DrainStarted", "ScaledDown"} & set(reasons(api))

    # The endpoint answers again: the normal drain-first scale-in proceeds.
    await client.patch(pod_status_path(b), {"status": {"podIP": good_ip, "podIPs": [{"ip": good_ip}]}})
    await eventually(lambda: replicas(api) == 1, within=60, what="scale-in to 1")
    await eventually(lambda: "ScaledDown" in reasons(api), within=10, what="ScaledDown event")
    seen = reasons(api)
    assert seen.index("DrainStarted") < seen.index("DrainCompleted") < seen.index("ScaledDown")
    await eventually(lambda: len(live_pods(api)) == 1, within=30, what="one relay left")
    (victim,) = {a, b} - set(live_pods(api))
    assert ever_annotated(api, victim), "the removed relay was drained first"
    await eventually(
        lambda: any(t.pod == victim for t in cluster.terminations), within=30, what="termination"
    )
    ended = next(t for t in cluster.terminations if t.pod == victim)
    assert ended.was_drained and not ended.killed and ended.spool_left == 0
    await delivered_all(sink, accepted)


async def test_drain_past_its_timeout_is_held_while_mail_is_queued_and_loses_nothing(
    api: kubeemu.Running,
    operator: OperatorHarness,
    cluster: controlplane.ControlPlane,
    client: controlplane.Api,
    sink: scenario.Upstream,
    sessions: Sessions,
) -> None:
    """The default `drain.onTimeout: KeepWhileQueued`: a relay whose queue cannot flush (the upstream
    answers 421) passes its 2 s drain timeout and is held, not removed: a `DrainHeld` Warning Event, the
    Draining condition says HeldByQueuedMail, the count stays at 2. When the upstream is back the queue
    flushes, the relay reports drained, the drain completes as drained, and then it is removed: every
    message answered 250 reaches the upstream (the next test is the same story with `Remove`)."""
    await start(
        api, client, cluster, min_replicas=2, max_replicas=3, scale_down_stabilization=1, drain_timeout=2
    )
    a, b = sorted(live_pods(api))
    sink.defer(421)  # the upstream is down: no queue can flush
    try:
        queued = await send(cluster, a, 3) | await send(cluster, b, 1)
        await sessions.hold(cluster, b, 2)  # a is the idlest relay: the victim
        before = timed_out_drains()
        await client.patch(MR_PATH, {"spec": {"replicas": {"min": 1}}})
        await eventually(lambda: "DrainHeld" in reasons(api), within=40, what="DrainHeld event")
        # The Event is posted before the same tick writes the status: wait for the condition too.
        await eventually(lambda: condition(api, "Draining").get("reason") == "HeldByQueuedMail", within=20,
                         what="the Draining condition HeldByQueuedMail")
        assert a in condition(api, "Draining").get("message", "")
        await asyncio.sleep(3)  # several ticks past the timeout
        assert a in live_pods(api) and replicas(api) == 2, "a relay holding mail was removed"
        assert "DrainTimedOut" not in reasons(api) and "DrainCompleted" not in reasons(api)
        assert reasons(api).count("DrainHeld") == 1, "the held drain is announced once"
        assert timed_out_drains() == before
    finally:
        sink.defer(None)  # the upstream is back
    await eventually(lambda: "DrainCompleted" in reasons(api), within=90, what="DrainCompleted event")
    await eventually(lambda: replicas(api) == 1 and set(live_pods(api)) == {b}, within=30,
                     what="only b left")
    await eventually(lambda: any(t.pod == a for t in cluster.terminations), within=40, what="a ended")
    ended = next(t for t in cluster.terminations if t.pod == a)
    assert ended.spool_left == 0, f"mail left in a's spool: {ended}"
    await delivered_all(sink, queued, within=60)


async def test_drain_with_on_timeout_remove_ends_by_timeout_and_loses_the_spool(
    api: kubeemu.Running,
    operator: OperatorHarness,
    cluster: controlplane.ControlPlane,
    client: controlplane.Api,
    sink: scenario.Upstream,
    sessions: Sessions,
) -> None:
    """A relay whose queue cannot flush (the upstream answers 421 to every DATA) never finishes draining.

    Expected: with `drain.timeoutSeconds: 2` and `drain.onTimeout: Remove` (the design's first rule; the
    default, KeepWhileQueued, holds such a relay: the test above), the drain ends by the timeout path —
    a `DrainTimedOut` Warning Event, `drain_duration_seconds{outcome="timeout"}` observed, the pod deleted
    and the Deployment lowered (ScaledDown) — instead of waiting forever.

    THE LOSS `Remove` accepts, asserted rather than hidden (docs/operator.md §4): the messages the victim
    accepted with 250 while the upstream was down are still in its spool when it is removed; the emptyDir
    goes with the pod (the control plane records them in `Termination.spool_left`), and they never reach
    the upstream, even after it recovers. Every other 250 — mail delivered before the outage, and mail
    queued on the relay that stays — reaches the sink.
    """
    await start(
        api, client, cluster, min_replicas=2, max_replicas=3, scale_down_stabilization=1, drain_timeout=2,
        drain_on_timeout="Remove",
    )
    a, b = sorted(live_pods(api))
    delivered_first = await send(cluster, a, 2) | await send(cluster, b, 2)
    await delivered_all(sink, delivered_first)

    sink.defer(421)  # the upstream is down: no queue can flush
    try:
        doomed = await send(cluster, a, 3)  # 250 each, then stuck in a's spool
        kept = await send(cluster, b, 1)  # 250, stuck in b's spool until the upstream is back
        # a is the idlest relay (0 sessions against b's 2): the victim of the scale-in.
        await sessions.hold(cluster, b, 2)
        before = timed_out_drains()
        await client.patch(MR_PATH, {"spec": {"replicas": {"min": 1}}})
        await eventually(lambda: "DrainTimedOut" in reasons(api), within=40, what="DrainTimedOut event")
        seen = reasons(api)
        assert "DrainStarted" in seen and "DrainCompleted" not in seen
        await eventually(lambda: replicas(api) == 1, within=30, what="count lowered to 1")
        await eventually(lambda: "ScaledDown" in reasons(api), within=10, what="ScaledDown event")
        assert seen.index("DrainStarted") < seen.index("DrainTimedOut")
        assert timed_out_drains() >= before + 1, "drain_duration_seconds{outcome=timeout} not observed"
        await eventually(lambda: set(live_pods(api)) == {b}, within=30, what="only b left")
        assert ever_annotated(api, a) and not ever_annotated(api, b)
        await eventually(lambda: any(t.pod == a for t in cluster.terminations), within=40, what="a ended")
        ended = next(t for t in cluster.terminations if t.pod == a)
        assert not ended.was_drained
        assert ended.spool_left >= len(doomed), f"the spool went with the pod: {ended}"
        assert ended.last_status is not None and ended.last_status["queue"]["messages"] >= len(doomed)
    finally:
        sink.defer(None)  # the upstream is back

    # b's queued message flushes (its backoff is capped, so allow for a retry or two); a's never comes.
    await delivered_all(sink, delivered_first | kept, within=60)
    assert not doomed & sink.delivered_ids(), "mail from a deleted spool cannot reappear"
