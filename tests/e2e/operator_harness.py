"""The real operator as the end-to-end tests run it (no tests here): a `mailrelay-operator` process with
the chart's ServiceAccount token, watching the test's namespace, and its scaling ticks read from its
/metrics, the barrier the tests wait on instead of sleeping.

What it must not do: decide what the operator should do; the tests assert that.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
from mailrelay_sandbox import netutil, scenario

from tests import kubeenv
from tests.conftest import eventually

DRAIN_STARTED = "mailrelay.dev/drain-started"
TICK_METRIC = "mailrelay_operator_last_reconcile_timestamp_seconds{"


class Ticks:
    """The operator's scaling ticks, read from its /metrics: each tick sets
    mailrelay_operator_last_reconcile_timestamp_seconds to the time it ran (one per intervalSeconds)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: set[float] = set()
        self._task: asyncio.Task[None] | None = None

    async def _record(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    async with http.get(self.url) as response:
                        for line in (await response.text()).splitlines():
                            if line.startswith(TICK_METRIC):
                                self.seen.add(float(line.rsplit(" ", 1)[1]))
                await asyncio.sleep(0.1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._record())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def since(self, moment: float) -> list[float]:
        return sorted(t for t in self.seen if t > moment)

    async def wait(self, count: int, since: float, what: str) -> None:
        """A barrier: the operator has run `count` ticks after `since` (a time.time() of this host)."""
        await eventually(lambda: len(self.since(since)) >= count, within=60,
                         what=f"{count} operator ticks while {what}")


class Operator:
    """The real `mailrelay-operator` process, watching this test's namespace with the chart's
    ServiceAccount token, and its ticks."""

    def __init__(self, kube: kubeenv.KubeEnv, log_path: Path) -> None:
        port = netutil.free_port()
        self.process = scenario.OperatorProcess(
            kube.operator_kubeconfig, kube.namespace, log_path,
            "--liveness", "", "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
        self.ticks = Ticks(f"http://127.0.0.1:{port}/metrics")

    def check_running(self) -> None:
        if not self.process.running:
            raise AssertionError(f"the operator exited:\n{self.process.log_tail()}")

    def assert_never_forbidden(self) -> None:
        """RBAC is enforced by the real API server: a refused call shows as Forbidden in the log."""
        text = self.process.log_path.read_text(errors="replace")
        refused = [line for line in text.splitlines() if "forbidden" in line.lower()]
        assert not refused, "RBAC refused the operator:\n" + "\n".join(refused[:20])
