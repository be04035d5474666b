"""Fixtures for the operator's API-level tests on the real control plane: this test's namespace (`kube`,
from tests/conftest.py), an upstream SMTP sink, the test's node (a process kubelet running real
`mailrelay-relay` processes), and the real operator run in-process by Kopf (`cli.run`) with the chart's
ServiceAccount token, which a test can stop and start again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mailrelay_operator import cli, config
from mailrelay_sandbox import apiclient, kubelet

from tests import kubeenv
from tests.conftest import eventually as eventually  # re-exported for the tests here


@pytest.fixture
def node_options() -> dict[str, Any]:
    """A long drain grace: the tests' idle SMTP sessions stand for clients mid-transaction, which a
    draining relay must let finish (by default it sends idle sessions a 421 after 2 s)."""
    return {"extra_env": {"MAILRELAY_LOG_LEVEL": "warning", "MAILRELAY_DRAIN_GRACE": "600"},
            "max_grace_seconds": 15}


class ForbiddenLog(logging.Handler):
    """Collects every log record that mentions Forbidden (an RBAC refusal): the operator must get none."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return
        if "Forbidden" in text or "forbidden" in text:
            self.records.append(f"{record.name}: {text[:500]}")


class OperatorHarness:
    """The real operator (cli.run: Kopf + handlers) in this process, on its own thread and event loop,
    with the chart's ServiceAccount token (RBAC enforced) and this test's namespace.

    Kopf cancels every task of its loop that it did not find at start when it stops, so sharing the
    test's loop would cancel the test's own teardown; a thread (as kopf.testing.KopfRunner does) avoids
    that and lets a test stop and start the operator again.
    """

    def __init__(self, kube: kubeenv.KubeEnv, *, serve_metrics: bool = False,
                 kubeconfig: Path | None = None, **overrides: Any) -> None:
        settings: dict[str, Any] = dict(
            namespaces=(kube.namespace,), standalone=True,
            kubeconfig=str(kubeconfig or kube.operator_kubeconfig), liveness=None,
            metrics_port=None, relay_timeout=1.0, resync_seconds=1.0, delete_wait_seconds=30.0,
            api_retries=6, api_timeout=5.0, relay_image="mailrelay-relay:test",
        )
        settings.update(overrides)
        self.options = config.Options(**settings)
        self.thread: threading.Thread | None = None
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None
        self.starts = 0
        self.serve_metrics = serve_metrics
        self.forbidden = ForbiddenLog()

    def _main(self, ready: threading.Event) -> None:
        logging.getLogger().addHandler(self.forbidden)
        try:
            asyncio.run(cli.run(self.options, stop_flag=self.stop_flag, ready_flag=ready,
                                serve_metrics=self.serve_metrics))
        except BaseException as exc:  # reported by start()/stop()
            self.error = exc
        finally:
            logging.getLogger().removeHandler(self.forbidden)

    def assert_never_forbidden(self) -> None:
        assert not self.forbidden.records, "RBAC refused the operator:\n" + "\n".join(self.forbidden.records)

    async def start(self) -> None:
        assert self.thread is None or not self.thread.is_alive()
        self.stop_flag = threading.Event()
        self.error = None
        ready = threading.Event()
        self.thread = threading.Thread(target=self._main, args=(ready,), name="operator", daemon=True)
        self.thread.start()
        await asyncio.to_thread(ready.wait, 30)  # returns early too if the thread dies: see self.error
        if self.error is not None:
            raise self.error
        assert ready.is_set(), "the operator did not get ready within 30s"
        self.starts += 1

    async def stop(self) -> None:
        if self.thread is None:
            return
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 30)
        assert not self.thread.is_alive(), "the operator did not stop within 30s"
        self.thread = None
        if self.error is not None:
            raise self.error


@pytest.fixture
async def operator(kube: kubeenv.KubeEnv) -> AsyncIterator[OperatorHarness]:
    logging.getLogger("kopf").setLevel(logging.WARNING)
    harness = OperatorHarness(kube)
    await harness.start()
    try:
        yield harness
    finally:
        await harness.stop()
    harness.assert_never_forbidden()


@pytest.fixture
async def client(kube: kubeenv.KubeEnv) -> AsyncIterator[apiclient.Api]:
    """An admin client of the API server, for the test's own reads and writes."""
    async with kube.api() as http:
        yield http


class Sessions:
    """Real SMTP sessions held open on relays (each counts in the relay's /status `sessions`)."""

    def __init__(self) -> None:
        self.open: dict[str, list[asyncio.StreamWriter]] = {}

    async def hold(self, node: kubelet.ProcessKubelet, pod: str, count: int) -> None:
        runtime = node.runtimes[pod]
        for _ in range(count):
            reader, writer = await asyncio.open_connection(runtime.ip, runtime.smtp_port)
            greeting = await asyncio.wait_for(reader.readline(), timeout=10)
            assert greeting.startswith(b"220"), greeting
            writer.write(b"EHLO loadtest.example\r\n")
            await writer.drain()
            while True:
                line = await asyncio.wait_for(reader.readline(), timeout=10)
                assert line.startswith(b"250"), line
                if line[3:4] == b" ":
                    break
            self.open.setdefault(pod, []).append(writer)

    async def release(self, pod: str | None = None) -> None:
        pods = [pod] if pod else list(self.open)
        for name in pods:
            for writer in self.open.pop(name, []):
                with contextlib.suppress(OSError):
                    writer.write(b"QUIT\r\n")
                    await writer.drain()
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()


@pytest.fixture
async def sessions() -> AsyncIterator[Sessions]:
    held = Sessions()
    try:
        yield held
    finally:
        await held.release()
