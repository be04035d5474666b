"""The operator's relay admin client against real `mailrelay-relay` processes (relayproc), including a
wrong token, a dead address and a relay slower than the timeout."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from mailrelay_operator import kubetypes, relayclient
from mailrelay_sandbox import relayproc, scenario

TOKEN = "t0ken-for-tests"


@pytest.fixture
def host() -> str:
    return f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(2, 250)}"


@pytest.fixture
async def upstream() -> AsyncIterator[scenario.Upstream]:
    async with scenario.upstream_sink() as sink:
        yield sink


@pytest.fixture
def relay(tmp_path: Path, host: str, upstream: scenario.Upstream) -> Iterator[relayproc.RelayProcess]:
    process = relayproc.RelayProcess(
        upstream=upstream.address, spool=tmp_path / "spool", host=host, token=TOKEN
    )
    process.start()
    try:
        yield process
    finally:
        process.close()


def endpoint(
    relay: relayproc.RelayProcess, token: str | None = TOKEN, name: str = "relay-0"
) -> relayclient.Endpoint:
    host, port = relay.admin_address
    return relayclient.Endpoint(pod=name, host=host, port=port, token=token)


async def test_status_drain_resume_against_a_real_relay(relay: relayproc.RelayProcess) -> None:
    client = relayclient.RelayClient(timeout=5)
    try:
        ep = endpoint(relay)
        status = await client.status(ep)
        assert status["draining"] is False and status["sessions"] == 0
        drained = await client.drain(ep)
        assert drained["draining"] is True
        assert (await client.status(ep))["drained"] is True  # idle relay: drained at once
        assert (await asyncio.to_thread(relay.get, "/readyz"))[0] == 503
        resumed = await client.resume(ep)
        assert resumed["draining"] is False
        assert (await asyncio.to_thread(relay.get, "/readyz"))[0] == 200
    finally:
        await client.close()


async def test_failures_become_none_in_concurrent_calls(relay: relayproc.RelayProcess) -> None:
    # A listener that accepts and never answers: slower than the timeout.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    client = relayclient.RelayClient(timeout=0.5)
    try:
        good = endpoint(relay, name="good")
        wrong_token = endpoint(relay, token="not-the-token", name="wrong-token")
        dead_host, _ = relay.admin_address
        dead = relayclient.Endpoint(
            pod="dead", host=dead_host, port=relayproc.free_port(dead_host), token=TOKEN
        )
        slow = relayclient.Endpoint(pod="slow", host="127.0.0.1", port=silent.getsockname()[1], token=TOKEN)
        with pytest.raises(relayclient.RelayError, match="401"):
            await client.status(wrong_token)
        results = await client.status_many(
            {"good": good, "wrong-token": wrong_token, "dead": dead, "slow": slow, "no-ip": None}
        )
        assert results["good"] is not None and results["good"]["sessions"] == 0
        assert results["wrong-token"] is None and results["dead"] is None and results["slow"] is None
        assert results["no-ip"] is None
    finally:
        await client.close()
        silent.close()


def test_endpoint_from_pod_json() -> None:
    pod: kubetypes.Pod = {
        "metadata": {"name": "r-1"},
        "spec": {
            "containers": [
                {
                    "name": "relay",
                    "ports": [
                        {"name": "smtp", "containerPort": 2525},
                        {"name": "admin", "containerPort": 9025},
                    ],
                }
            ]
        },
        "status": {"podIP": "10.1.2.3"},
    }
    assert relayclient.endpoint(pod, "tok") == relayclient.Endpoint("r-1", "10.1.2.3", 9025, "tok")
    assert relayclient.endpoint({"metadata": {"name": "r-2"}, "status": {}}, None) is None
    pending: kubetypes.Pod = {"metadata": {"name": "r-3"}, "status": {"podIP": "fd00::5"}}
    ep = relayclient.endpoint(pending, None)
    assert ep is not None and ep.port == relayclient.DEFAULT_ADMIN_PORT
    assert ep.base_url == f"http://[fd00::5]:{relayclient.DEFAULT_ADMIN_PORT}"
