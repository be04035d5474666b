"""Shutdown with many MailRelays: each scaling daemon stops on its own when Kopf sets its `stopped` flag,
even in the middle of a tick, so Kopf never has to cancel it ("is cancelled. Will escalate") and the
operator stops promptly. Every relay here accepts the operator's /status call and never answers, and the
relay timeout is long, so at stop time every daemon is inside a tick that would last a minute."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest
from mailrelay_operator import manifests
from mailrelay_sandbox import controlplane, kubeemu, scenario

from tests.operator.conftest import NAMESPACE, OperatorHarness, eventually

MAILRELAYS = 6
RELAY_TIMEOUT = 60.0  # a tick waits this long for the silent relays
STOP_BOUND = 20.0  # generous for a loaded machine, and well under RELAY_TIMEOUT


class SilentRelays:
    """An admin port that accepts connections and never answers; counts them."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await reader.read()  # until the operator gives up and closes
        finally:
            writer.close()

    async def __aenter__(self) -> SilentRelays:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()


@pytest.fixture
async def silent() -> AsyncIterator[SilentRelays]:
    async with SilentRelays() as relays:
        yield relays


async def test_operator_with_several_mailrelays_stops_promptly(
    api: kubeemu.Running, silent: SilentRelays, caplog: pytest.LogCaptureFixture
) -> None:
    harness = OperatorHarness(api, relay_timeout=RELAY_TIMEOUT, resync_seconds=3600.0)
    async with controlplane.Api(api.url) as http:
        for i in range(MAILRELAYS):
            name = f"busy-{i}"
            await http.request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{name}-pod", "namespace": NAMESPACE,
                             "labels": manifests.selector_labels(name)},
                "spec": {"containers": [{"name": "relay", "image": "img",
                                         "ports": [{"name": "admin", "containerPort": silent.port}]}]},
            })
            await http.patch(f"/api/v1/namespaces/{NAMESPACE}/pods/{name}-pod/status", {"status": {
                "phase": "Running", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}],
            }})
            relay = scenario.mailrelay(name, NAMESPACE)
            await http.request("POST", scenario.mailrelay_path(NAMESPACE), relay)
    await harness.start()
    stopped = False
    try:
        await eventually(lambda: silent.connections >= MAILRELAYS, within=60, what="a tick of every daemon")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kopf"):
            started = time.monotonic()
            await harness.stop()
            stopped = True
            took = time.monotonic() - started
    finally:
        if not stopped:
            await harness.stop()
    escalated = [r.getMessage() for r in caplog.records if "cancelled" in r.getMessage()
                 or "did not exit in time" in r.getMessage()]
    assert escalated == [], "daemons had to be cancelled instead of stopping on their flag"
    assert took < STOP_BOUND, f"stopping took {took:.1f}s"
