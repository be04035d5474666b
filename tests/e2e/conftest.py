"""Helpers and fixtures for the end-to-end tests: the real operator for this test's namespace
(`operator`, tests/e2e/operator_harness.py) and an admin client (`api`). The others are tests/conftest.py's:
this test's namespace on the real control plane (`kube`), the upstream sink (`sink`) and the test's node,
a process kubelet running the relays (`node`)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mailrelay_sandbox import apiclient

from tests import kubeenv
from tests.conftest import eventually as eventually  # re-exported for the tests here
from tests.e2e.operator_harness import Operator


def secret(name: str, token: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "data": {"token": base64.b64encode(token.encode()).decode()}}


@pytest.fixture
async def operator(kube: kubeenv.KubeEnv, tmp_path: Path) -> AsyncIterator[Operator]:
    running = Operator(kube, tmp_path / "operator.log")
    await running.process.start()
    running.ticks.start()
    try:
        yield running
    finally:
        await running.ticks.stop()
        await running.process.stop()
    running.assert_never_forbidden()


@pytest.fixture
async def api(kube: kubeenv.KubeEnv) -> AsyncIterator[apiclient.Api]:
    """An admin client, for the test's own edits of the MailRelay and its reads."""
    async with kube.api() as client:
        yield client
