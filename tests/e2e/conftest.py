"""Fixtures for the end-to-end tests: this test's namespace on the real control plane (`kube`, from
tests/conftest.py), an upstream sink, and the test's node: a process kubelet running the relays."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mailrelay_sandbox import kubelet, scenario

from tests import kubeenv
from tests.conftest import eventually as eventually  # re-exported for the tests here


@pytest.fixture
async def sink() -> AsyncIterator[scenario.Upstream]:
    async with scenario.upstream_sink() as upstream:
        yield upstream


@pytest.fixture
async def node(kube: kubeenv.KubeEnv, sink: scenario.Upstream,
               tmp_path: Path) -> AsyncIterator[kubelet.ProcessKubelet]:
    """The test's node: the pods the scheduler binds to it run as real relay processes."""
    async with kubelet.ProcessKubelet.on(
        kube.cluster, kube.node, tmp_path / "pods", sink.address,
        extra_env={"MAILRELAY_LOG_LEVEL": "warning"},
    ) as running:
        yield running


def secret(name: str, token: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "data": {"token": base64.b64encode(token.encode()).decode()}}
