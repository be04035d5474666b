"""`kube.Kube` reads the proxy environment once, at start (kube.resolve_environment_once).

kubernetes_asyncio's session trusts the environment, so aiohttp would look up the proxy and read ~/.netrc
on a worker thread for every API call. These tests run the real client against the emulated API server,
once through a real forwarding HTTP proxy (a small aiohttp server on loopback that relays what it is sent
and counts it), and check that the proxy from the environment is still honoured, that NO_PROXY still
bypasses it, and that a ~/.netrc entry for the API server is ignored (it would clash with the bearer token).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import aiohttp.web
import pytest
from mailrelay_operator import kube
from mailrelay_sandbox import kubeemu

NAMESPACE = "mail"


@contextlib.asynccontextmanager
async def forwarding_proxy() -> AsyncIterator[tuple[str, list[str]]]:
    """A plain HTTP forward proxy: it gets absolute-form request targets and relays them."""
    seen: list[str] = []
    upstream = aiohttp.ClientSession()

    async def relay(request: aiohttp.web.Request) -> aiohttp.web.Response:
        seen.append(f"{request.method} {request.url}")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "proxy-connection")}
        async with upstream.request(request.method, str(request.url), headers=headers,
                                    data=await request.read()) as answer:
            body = await answer.read()
            return aiohttp.web.Response(status=answer.status, body=body,
                                        content_type=answer.content_type)

    app = aiohttp.web.Application()
    app.router.add_route("*", "/{tail:.*}", relay)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()
        await upstream.close()


@pytest.fixture
async def api() -> AsyncIterator[kubeemu.Running]:
    async with kubeemu.serve(namespaces=[NAMESPACE]) as running:
        yield running


def _clear_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


async def test_proxy_from_environment_is_resolved_once_and_honoured(
        api: kubeemu.Running, monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_proxy_env(monkeypatch)
    async with forwarding_proxy() as (proxy_url, seen):
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        client = await kube.Kube.connect(str(api.kubeconfig))
        try:
            assert client._client.rest_client.pool_manager.trust_env is False
            assert client._client.rest_client.proxy == proxy_url
            pods = await client.list_(kube.PODS, NAMESPACE)
            await client.create(kube.SECRETS, NAMESPACE, {
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": {}})
            assert (await client.get(kube.SECRETS, NAMESPACE, "s") or {})["metadata"]["name"] == "s"
        finally:
            await client.close()
    assert pods == []
    assert [line.split("?")[0] for line in seen] == [
        f"GET {api.url}/api/v1/namespaces/{NAMESPACE}/pods",
        f"POST {api.url}/api/v1/namespaces/{NAMESPACE}/secrets",
        f"GET {api.url}/api/v1/namespaces/{NAMESPACE}/secrets/s",
    ]


async def test_no_proxy_bypasses_the_proxy(api: kubeemu.Running, monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_proxy_env(monkeypatch)
    async with forwarding_proxy() as (proxy_url, seen):
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        client = await kube.Kube.connect(str(api.kubeconfig))
        try:
            assert not client._client.rest_client.proxy
            assert await client.list_(kube.PODS, NAMESPACE) == []
        finally:
            await client.close()
    assert seen == []


async def test_netrc_entry_for_the_api_server_is_ignored(
        api: kubeemu.Running, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # With the environment trusted per request, aiohttp would read this entry, build Basic auth, and refuse
    # to combine it with the bearer token's Authorization header (ValueError on every call).
    _clear_proxy_env(monkeypatch)
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login someone password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    client = await kube.Kube.connect(str(api.kubeconfig))
    try:
        assert await client.list_(kube.PODS, NAMESPACE) == []
    finally:
        await client.close()
