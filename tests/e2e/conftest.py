"""Fixtures for the end-to-end tests on the sandbox: emulated API, upstream sink, control plane."""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mailrelay_sandbox import controlplane, kubeemu, scenario

from tests.conftest import eventually as eventually  # re-exported for the tests here

NAMESPACE = "mail"


@pytest.fixture
async def emulator() -> AsyncIterator[kubeemu.Running]:
    async with kubeemu.serve(namespaces=[NAMESPACE], graceful_pod_deletion=True) as running:
        trimmer = asyncio.create_task(scenario.trim_request_log(running.emulator))
        try:
            yield running
        finally:
            trimmer.cancel()


@pytest.fixture
async def sink() -> AsyncIterator[scenario.Upstream]:
    async with scenario.upstream_sink() as upstream:
        yield upstream


@pytest.fixture
async def control_plane(
    emulator: kubeemu.Running, sink: scenario.Upstream, tmp_path: Path
) -> AsyncIterator[controlplane.ControlPlane]:
    subnet = (random.randint(100, 250), random.randint(0, 255))
    async with controlplane.ControlPlane(
        emulator.url, NAMESPACE, tmp_path / "pods", sink.address, subnet=subnet,
        extra_env={"MAILRELAY_LOG_LEVEL": "warning"},
    ) as plane:
        yield plane


def secret(name: str, token: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NAMESPACE},
            "data": {"token": base64.b64encode(token.encode()).decode()}}


