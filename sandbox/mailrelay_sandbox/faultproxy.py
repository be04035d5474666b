"""A fault-injecting proxy in front of the real kube-apiserver, for the tests of the operator's error
handling: what a real server cannot be made to do on cue.

The proxy listens on plain HTTP on loopback and forwards every request, streams included (watches), to
the API server over HTTPS. Rules, matched in order against method, path, query and User-Agent, can:
- answer a status of their own instead of forwarding (`fail`: a 500, 503, 409 or 410 on cue);
- forward the request and then answer a status anyway (`fail(..., after_forward=True)`: a write that
  happened but whose answer was lost);
- hold the request for a while before forwarding it (`delay`: a slow server);
- hold the request until the test releases it, then forward it (`hold`: a barrier, e.g. a client's
  re-watch that must reach the server only after the test changed something there).
Each rule fires `times` times (None: for ever). Every request is recorded with the status it got
(`records`), so a test can count what a client asked for.

The proxy runs on a thread of its own with its own event loop, so a test that blocks its loop does not
stall the operator's API calls. The server judges everything the proxy forwards; the proxy never
answers 2xx itself. Never imported by `relay/` or `operator/`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import ssl
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web

_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
                "host", "upgrade", "proxy-authorization", "te", "trailer"}


@dataclasses.dataclass
class Rule:
    method: str | None
    path: re.Pattern[str] | None
    query: Mapping[str, str] | None
    agent: str | None
    status: int | None = None
    after_forward: bool = False
    delay: float = 0.0
    times: int | None = 1
    fired: int = 0
    gate: threading.Event | None = None  # `hold`: forward once it is set

    def release(self) -> None:
        """Let the requests a `hold` rule holds (and those it will match) through."""
        if self.gate is not None:
            self.gate.set()

    def matches(self, method: str, path: str, query: Mapping[str, str], agent: str) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        if self.method is not None and self.method != method:
            return False
        if self.path is not None and not self.path.search(path):
            return False
        if self.query is not None and any(query.get(k) != v for k, v in self.query.items()):
            return False
        return self.agent is None or self.agent in agent


@dataclasses.dataclass(frozen=True)
class Record:
    at: float
    method: str
    path: str
    query: dict[str, str]
    agent: str
    status: int
    injected: bool

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")


def _status_body(status: int) -> dict[str, Any]:
    reason = {409: "Conflict", 410: "Expired", 429: "TooManyRequests", 500: "InternalError",
              503: "ServiceUnavailable", 504: "Timeout"}.get(status, "InternalError")
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": f"injected by the sandbox's fault proxy ({status})", "reason": reason,
            "code": status}


class FaultProxy:
    """`with FaultProxy(api_url, ca_file) as proxy:` serves on `proxy.url` until the block ends."""

    def __init__(self, upstream: str, ca_file: Path) -> None:
        self.upstream = upstream.rstrip("/")
        self._ssl = ssl.create_default_context(cafile=str(ca_file))
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self.records: list[Record] = []
        self.url = ""
        self.kubeconfig: Path | None = None   # set by whoever hands the proxy to a client
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._handlers: set[asyncio.Task[object]] = set()

    # -- rules ------------------------------------------------------------------------------------
    def fail(self, method: str | None, path: str | None, status: int, *, times: int | None = 1,
             query: Mapping[str, str] | None = None, agent: str | None = None,
             after_forward: bool = False) -> Rule:
        rule = Rule(method, re.compile(path) if path else None, query, agent, status=status,
                    after_forward=after_forward, times=times)
        with self._lock:
            self._rules.append(rule)
        return rule

    def delay(self, method: str | None, path: str | None, seconds: float, *, times: int | None = 1,
              query: Mapping[str, str] | None = None, agent: str | None = None) -> Rule:
        rule = Rule(method, re.compile(path) if path else None, query, agent, delay=seconds, times=times)
        with self._lock:
            self._rules.append(rule)
        return rule

    def hold(self, method: str | None, path: str | None, *, times: int | None = 1,
             query: Mapping[str, str] | None = None, agent: str | None = None) -> Rule:
        """Hold matching requests until `rule.release()`, then forward them. `rule.fired` counts them."""
        rule = Rule(method, re.compile(path) if path else None, query, agent, times=times,
                    gate=threading.Event())
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def requests(self, *, agent: str | None = None, since: float = 0.0) -> list[Record]:
        with self._lock:
            return [r for r in self.records if r.at >= since and (agent is None or agent in r.agent)]

    def _match(self, method: str, path: str, query: Mapping[str, str], agent: str) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, path, query, agent):
                    rule.fired += 1
                    return rule
        return None

    def _record(self, request: aiohttp.web.Request, status: int, injected: bool) -> None:
        with self._lock:
            self.records.append(Record(time.time(), request.method, request.path, dict(request.query),
                                       request.headers.get("User-Agent", ""), status, injected))

    # -- serving ----------------------------------------------------------------------------------
    async def _handle(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        """Serve one request; a client that went away meanwhile ends it quietly."""
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            return await self._serve_one(request)
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError too: the client left
            return aiohttp.web.Response(status=499)
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _serve_one(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        agent = request.headers.get("User-Agent", "")
        rule = self._match(request.method, request.path, request.query, agent)
        if rule is not None and rule.delay:
            await asyncio.sleep(rule.delay)
        # The test's thread releases the gate: a short poll, which stopping the proxy can cancel.
        while rule is not None and rule.gate is not None and not rule.gate.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if rule is not None and rule.status is not None and not rule.after_forward:
            self._record(request, rule.status, True)
            return aiohttp.web.json_response(_status_body(rule.status), status=rule.status)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        assert self._session is not None
        async with self._session.request(request.method, self.upstream + request.rel_url.path_qs,
                                          data=body or None, headers=headers) as upstream:
            if rule is not None and rule.status is not None:  # after_forward: the answer is lost
                await upstream.read()
                self._record(request, rule.status, True)
                return aiohttp.web.json_response(_status_body(rule.status), status=rule.status)
            response = aiohttp.web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS})
            await response.prepare(request)
            self._record(request, upstream.status, False)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (ConnectionResetError, aiohttp.ClientError):
                pass  # either side went away: end the stream
            return response

    async def _serve(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl, limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10), auto_decompress=False)
        app = aiohttp.web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = aiohttp.web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = int(runner.addresses[0][1])
        self.url = f"http://127.0.0.1:{port}"
        self._stop = asyncio.Event()
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            # end the streams in flight (watches) before the server goes, so nothing is left pending
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await runner.cleanup()
            await self._session.close()

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._started.set()
        finally:
            self._loop.close()

    _session: aiohttp.ClientSession | None = None

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._main, name="faultproxy", daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._error is not None or not self.url:
            raise RuntimeError(f"the fault proxy did not start: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
