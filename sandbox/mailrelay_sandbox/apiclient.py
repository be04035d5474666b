"""A small asyncio client of the Kubernetes API for the sandbox's own parts (kubelet, load generator,
demo, tests): JSON in and out, merge patches, bearer tokens, the control plane's CA.

It holds no policy and retries only what the server asks it to (429 with Retry-After, as client-go does);
any other failed call raises `ApiError` with the status. The operator
has its own client (`mailrelay_operator.kube`); this one is never imported by `relay/` or `operator/`.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

MERGE_PATCH = "application/merge-patch+json"
Obj = dict[str, Any]


class ApiError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"{status}: {text[:300]}")
        self.status = status
        self.text = text


class Api:
    """`async with Api(url, token, ca_file) as api`: requests to one API server as one identity."""

    def __init__(self, base_url: str, token: str, ca_file: Path | None = None, *,
                 timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._ssl: ssl.SSLContext | bool = (ssl.create_default_context(cafile=str(ca_file))
                                            if ca_file is not None else False)
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        self._session = aiohttp.ClientSession(
            headers=self._headers, timeout=aiohttp.ClientTimeout(total=self._timeout),
            connector=aiohttp.TCPConnector(ssl=self._ssl))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, body: Any = None, *,
                      content_type: str = "application/json") -> Obj:
        assert self._session is not None, "use `async with Api(...)`"
        data = None if body is None else json.dumps(body)
        for attempt in range(1, 6):
            async with self._session.request(method, self.base_url + path, data=data,
                                             headers={"Content-Type": content_type}) as response:
                text = await response.text()
                retry_after = response.headers.get("Retry-After", "")
                status = response.status
            if status == 429 and attempt < 5:
                # the server asks to come back (a resource whose cache is still filling): as client-go does
                await asyncio.sleep(float(retry_after) if retry_after.isdigit() else 1.0)
                continue
            if status >= 400:
                raise ApiError(status, text)
            result: Obj = json.loads(text) if text else {}
            return result
        raise AssertionError("unreachable")

    async def items(self, path: str) -> list[Obj]:
        return list((await self.request("GET", path)).get("items") or [])

    async def patch(self, path: str, body: Obj) -> Obj:
        return await self.request("PATCH", path, body, content_type=MERGE_PATCH)

    async def watch(self, path: str, resource_version: str = "") -> AsyncIterator[Obj]:
        """The events of `GET path?watch=true` (from `resource_version` when given), as they come; ends
        when the server ends the stream."""
        assert self._session is not None, "use `async with Api(...)`"
        query = "&" if "?" in path else "?"
        url = f"{self.base_url}{path}{query}watch=true&allowWatchBookmarks=true"
        if resource_version:
            url += f"&resourceVersion={resource_version}"
        forever = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with self._session.get(url, timeout=forever) as response:
            if response.status >= 400:
                raise ApiError(response.status, await response.text())
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)

    async def get_or_none(self, path: str) -> Obj | None:
        try:
            return await self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
