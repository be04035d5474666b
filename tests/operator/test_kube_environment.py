"""`kube.Kube` reads the proxy environment once, at start (kube.resolve_environment_once).

kubernetes_asyncio's session trusts the environment, so aiohttp would look up the proxy and read ~/.netrc
on a worker thread for every API call. These tests run the real client against the real API server
(HTTPS, the chart's ServiceAccount token), once through a real HTTPS forward proxy (a small CONNECT proxy
on loopback that tunnels what it is asked for and notes each tunnel), and check that the proxy from the
environment is still honoured, that NO_PROXY still bypasses it, and that a ~/.netrc entry for the API
server is ignored (it would clash with the bearer token).

Behind the proxy the kubeconfig names the API server `kubernetes.default.svc` (a name of its serving
certificate), which does not resolve here and which only the proxy maps to the server: every call that
succeeds went through the proxy, not only the first one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mailrelay_operator import kube as k
from mailrelay_sandbox import kubecluster

from tests import kubeenv

HIDDEN_NAME = "kubernetes.default.svc"  # in the API server's certificate; resolvable only by the proxy


@contextlib.asynccontextmanager
async def connect_proxy(hosts: dict[str, str]) -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTPS forward proxy: it answers CONNECT host:port with a tunnel, resolving `hosts` itself."""
    seen: list[str] = []
    writers: set[asyncio.StreamWriter] = set()
    handlers: set[asyncio.Task[None]] = set()

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            seen.append(f"{method} {target}")
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            host, port = target.rsplit(":", 1)
            upstream_reader, upstream_writer = await asyncio.open_connection(hosts.get(host, host), int(port))
            writers.add(upstream_writer)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()
        for writer in writers:
            writer.close()
        if handlers:
            await asyncio.wait(handlers, timeout=10)
        await server.wait_closed()


def _clear_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def secret(name: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": {}}


async def test_proxy_from_environment_is_resolved_once_and_honoured(
        kube: kubeenv.KubeEnv, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clear_proxy_env(monkeypatch)
    port = int(kube.url.rsplit(":", 1)[1])
    with pytest.raises(OSError):  # only the proxy can reach the server under this name
        await asyncio.get_running_loop().getaddrinfo(HIDDEN_NAME, port)
    kubeconfig = kubecluster.write_kubeconfig(
        tmp_path / "behind-proxy.kubeconfig", f"https://{HIDDEN_NAME}:{port}", kube.ca_file,
        kube.session.operator_token)
    async with connect_proxy({HIDDEN_NAME: "127.0.0.1"}) as (proxy_url, seen):
        monkeypatch.setenv("HTTPS_PROXY", proxy_url)
        client = await k.Kube.connect(str(kubeconfig))
        try:
            assert client._client.rest_client.pool_manager.trust_env is False
            assert client._client.rest_client.proxy == proxy_url
            pods = await client.list_(k.PODS, kube.namespace)
            await client.create(k.SECRETS, kube.namespace, secret("s"))
            assert (await client.get(k.SECRETS, kube.namespace, "s") or {})["metadata"]["name"] == "s"
        finally:
            await client.close()
    assert pods == []
    assert seen and set(seen) == {f"CONNECT {HIDDEN_NAME}:{port}"}, seen
    _clear_proxy_env(monkeypatch)  # the test's own look goes to the server directly
    created = kube.get(k.SECRETS, "s")
    assert created is not None, "the create through the proxy reached the API server"


async def test_no_proxy_bypasses_the_proxy(kube: kubeenv.KubeEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_proxy_env(monkeypatch)
    async with connect_proxy({}) as (proxy_url, seen):
        monkeypatch.setenv("HTTPS_PROXY", proxy_url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        client = await k.Kube.connect(str(kube.operator_kubeconfig))
        try:
            assert not client._client.rest_client.proxy
            assert await client.list_(k.PODS, kube.namespace) == []
        finally:
            await client.close()
    assert seen == []


async def test_netrc_entry_for_the_api_server_is_ignored(
        kube: kubeenv.KubeEnv, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # With the environment trusted per request, aiohttp would read this entry, build Basic auth, and refuse
    # to combine it with the bearer token's Authorization header (ValueError on every call).
    _clear_proxy_env(monkeypatch)
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login someone password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    client = await k.Kube.connect(str(kube.operator_kubeconfig))
    try:
        assert await client.list_(k.PODS, kube.namespace) == []
    finally:
        await client.close()
