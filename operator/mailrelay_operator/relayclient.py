"""HTTP client for the relays' admin API (docs/contracts.md): GET /status, POST /drain, POST /resume.

Each call has a timeout; `status_many` and `call_many` query many relays concurrently, and a relay that
fails to answer yields None (the pure policy treats that as a missing metric) instead of an exception.
Only `RelayError` leaves the single-relay calls. It must not decide anything (what to drain is `drain`'s
job) and must never log the bearer token.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import aiohttp

from mailrelay_operator import kubetypes

logger = logging.getLogger("mailrelay_operator.relayclient")

DEFAULT_ADMIN_PORT = 8025


class RelayError(Exception):
    """A relay's admin API did not answer, or answered something other than 200 with JSON."""


@dataclass(frozen=True)
class Endpoint:
    """Where one relay's admin API listens, and the token it wants."""

    pod: str
    host: str
    port: int
    token: str | None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def admin_port(pod: kubetypes.Pod) -> int:
    """The relay container's port named `admin` (docs/contracts.md), else the default 8025."""
    for container in pod.get("spec", {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "admin" and isinstance(port.get("containerPort"), int):
                return int(port["containerPort"])
    return DEFAULT_ADMIN_PORT


def endpoint(pod: kubetypes.Pod, token: str | None) -> Endpoint | None:
    """The admin endpoint of a pod, or None while it has no IP yet."""
    ip = pod.get("status", {}).get("podIP")
    if not ip:
        return None
    return Endpoint(pod=pod.get("metadata", {}).get("name", ""), host=ip, port=admin_port(pod), token=token)


class RelayClient:
    """One aiohttp session shared by every admin call of the operator."""

    def __init__(self, timeout: float = 2.0, concurrency: int = 64) -> None:
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._limit = asyncio.Semaphore(concurrency)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                # Keep-alive: a scrape every interval per relay would otherwise open a TCP connection
                # each time (the operator footprint benchmark measured that cost). A connection to a relay
                # that went away fails one call, which the caller treats as a missed scrape.
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, ep: Endpoint, path: str) -> kubetypes.RelayStatus:
        headers = {"Authorization": f"Bearer {ep.token}"} if ep.token else {}
        try:
            async with self._limit, self._get_session().request(
                method, f"{ep.base_url}{path}", headers=headers,
            ) as response:
                body = await response.read()
                if response.status != 200:
                    raise RelayError(f"{method} {path} on {ep.pod}: HTTP {response.status}")
                parsed = json.loads(body)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise RelayError(f"{method} {path} on {ep.pod}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(parsed, dict):
            raise RelayError(f"{method} {path} on {ep.pod}: not a JSON object")
        return cast(kubetypes.RelayStatus, parsed)

    async def status(self, ep: Endpoint) -> kubetypes.RelayStatus:
        return await self._call("GET", ep, "/status")

    async def drain(self, ep: Endpoint) -> kubetypes.RelayStatus:
        return await self._call("POST", ep, "/drain")

    async def resume(self, ep: Endpoint) -> kubetypes.RelayStatus:
        return await self._call("POST", ep, "/resume")

    async def call_many(self, action: str, endpoints: Iterable[Endpoint]
                        ) -> dict[str, kubetypes.RelayStatus | None]:
        """Run `status`, `drain` or `resume` on many relays at once; None for each that failed."""
        call = {"status": self.status, "drain": self.drain, "resume": self.resume}[action]
        eps = list(endpoints)

        async def one(ep: Endpoint) -> kubetypes.RelayStatus | None:
            try:
                return await call(ep)
            except RelayError as exc:
                logger.info("%s", exc)
                return None

        results = await asyncio.gather(*(one(ep) for ep in eps))
        return {ep.pod: result for ep, result in zip(eps, results, strict=True)}

    async def status_many(self, endpoints: Mapping[str, Endpoint | None]
                          ) -> dict[str, kubetypes.RelayStatus | None]:
        """GET /status from every pod that has an endpoint; None for the others and for failures."""
        found = await self.call_many("status", [ep for ep in endpoints.values() if ep is not None])
        return {pod: found.get(pod) for pod in endpoints}
