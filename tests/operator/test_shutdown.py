"""Shutdown with many MailRelays: each scaling daemon stops when Kopf sets its `stopped` flag, and a tick
still in flight is cancelled by Kopf after the daemon's `cancellation_backoff`, so the operator stops
promptly and no daemon is left behind ("did not exit in time").

On the real control plane: the operator's Deployments become pods (real ReplicaSet controller and
scheduler) that the test's process kubelet runs as a stand-in relay which passes its probes but accepts
the operator's GET /status and never answers it. The relay timeout is long, so at stop time every daemon
is inside a tick that would last a minute; the harness's stop bound (30 s) is well under it."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mailrelay_operator import kube as k
from mailrelay_sandbox import apiclient, kubelet, scenario

from tests import kubeenv
from tests.operator.conftest import OperatorHarness, eventually

MAILRELAYS = 6
RELAY_TIMEOUT = 60.0  # a tick waits this long for the relays' /status (longer than the harness's stop bound)

# A relay whose admin API answers the kubelet's probes (so the pod is Running and Ready) and accepts the
# operator's GET /status but never answers it. It notes each /status as it opens and closes.
HUNG_RELAY = r'''
import asyncio, os, pathlib

LOG = pathlib.Path(os.environ["HUNG_RELAY_LOG"]) / (os.environ["MAILRELAY_HOSTNAME"] + ".log")


def note(word):
    with LOG.open("a") as log:
        log.write(word + "\n")


async def admin(reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            path = line.split()[1].decode()
            if path.startswith("/status"):
                note("open")
                try:
                    await reader.read()  # until the operator gives up or goes away
                finally:
                    note("closed")
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n")
            await writer.drain()
    except (OSError, IndexError):
        pass
    finally:
        writer.close()


async def smtp(reader, writer):
    writer.write(b"220 hung relay\r\n")
    await reader.read()
    writer.close()


async def main():
    servers = []
    for handler, variable in ((admin, "MAILRELAY_ADMIN_LISTEN"), (smtp, "MAILRELAY_LISTEN")):
        host, port = os.environ[variable].rsplit(":", 1)
        servers.append(await asyncio.start_server(handler, host, int(port)))
    await asyncio.Event().wait()


asyncio.run(main())
'''


class HungRelays:
    """What the stand-in relays noted: per pod, how many /status calls are open now and were ever made."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _words(self) -> dict[str, list[str]]:
        return {log.stem: log.read_text().split() for log in self.folder.glob("*.log")}

    def open_now(self) -> dict[str, int]:
        return {pod: words.count("open") - words.count("closed") for pod, words in self._words().items()}

    def asked(self) -> dict[str, int]:
        return {pod: words.count("open") for pod, words in self._words().items()}


@pytest.fixture
async def hung_node(kube: kubeenv.KubeEnv, tmp_path: Path) -> AsyncIterator[HungRelays]:
    script = tmp_path / "hung_relay.py"
    script.write_text(HUNG_RELAY)
    notes = tmp_path / "notes"
    notes.mkdir()
    async with kubelet.ProcessKubelet(
        kube.url, kube.cluster.kubelet_token, kube.ca_file, kube.node, tmp_path / "pods", "127.0.0.1:9",
        relay_command=[sys.executable, str(script)], extra_env={"HUNG_RELAY_LOG": str(notes)},
        observe_status=False,  # only the operator calls /status
        max_grace_seconds=3,
    ):
        yield HungRelays(notes)


async def test_operator_with_several_mailrelays_stops_promptly(
    kube: kubeenv.KubeEnv, client: apiclient.Api, hung_node: HungRelays, caplog: pytest.LogCaptureFixture
) -> None:
    harness = OperatorHarness(kube, relay_timeout=RELAY_TIMEOUT, resync_seconds=3600.0)
    names = [f"busy-{i}" for i in range(MAILRELAYS)]
    for name in names:
        await client.request("POST", kube.path(k.MAILRELAYS), scenario.mailrelay(name, kube.namespace))
    await harness.start()
    stopped = False
    try:
        def every_daemon_waits() -> bool:
            waiting = [pod for pod, count in hung_node.open_now().items() if count > 0]
            return len(waiting) >= MAILRELAYS

        await eventually(every_daemon_waits, within=120,
                         what="a /status call of every daemon's tick, unanswered, at the same time")
        await eventually(lambda: all(kubelet.is_ready(p) for p in kube.list(k.PODS)), within=60,
                         what="the stand-in relays Ready (they pass their probes)")
        pods = kube.list(k.PODS)
        assert len(pods) == MAILRELAYS, "each MailRelay has one relay"
        assert every_daemon_waits(), "a tick's /status call ended before the stop"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kopf"):
            await harness.stop()  # within the harness's 30 s bound, or it fails
            stopped = True
    finally:
        if not stopped:
            await harness.stop()
    harness.assert_never_forbidden()
    orphaned = [r.getMessage() for r in caplog.records if "did not exit in time" in r.getMessage()]
    assert orphaned == [], "daemons were left running instead of being stopped or cancelled"
    # The stopped ticks gave up their calls: no /status is left open on any relay.
    await eventually(lambda: not any(hung_node.open_now().values()), within=30,
                     what="every /status call closed by the stopped operator")
    assert set(hung_node.asked()) == {p["metadata"]["name"] for p in pods}
