"""The relay's admin HTTP API (aiohttp): health, readiness, metrics, status, drain and resume.

What it is for: translating HTTP requests into calls on a `Control` (implemented by app.py) and the
answers into the JSON of docs/contracts.md. `/healthz`, `/readyz` and `/metrics` are open; `/status`,
`POST /drain` and `POST /resume` need `Authorization: Bearer <token>` when a token is configured
(compared in constant time), else 401.

What it must not do: hold relay state or decide anything about draining itself (app.py's drain
coordinator does), or ever log or echo the token.
"""

from __future__ import annotations

import hmac
import typing
from typing import TypedDict

from aiohttp import web

from mailrelay_relay import metrics


class StatusQueue(TypedDict):
    messages: int
    bytes: int
    oldest_age_seconds: float


class StatusDeadLetter(TypedDict):
    messages: int


class Status(TypedDict):
    draining: bool
    drained: bool
    sessions: int
    max_sessions: int
    inflight_bytes: int
    queue: StatusQueue
    dead_letter: StatusDeadLetter
    hostname: str
    version: str


class Control(typing.Protocol):
    """What the admin API needs from the relay (app.py implements it)."""

    def status(self) -> Status: ...

    def ready(self) -> bool: ...

    async def drain(self) -> None: ...

    async def resume(self) -> None: ...


CONTROL_KEY: web.AppKey[Control] = web.AppKey("control")
TOKEN_KEY: web.AppKey[bytes | None] = web.AppKey("token")

_BEARER = "bearer "


def authorized(header: str | None, token: bytes | None) -> bool:
    """True when no token is configured, or the Authorization header carries exactly that bearer token."""
    if token is None:
        return True
    if header is None or header[: len(_BEARER)].lower() != _BEARER:
        return False
    offered = header[len(_BEARER):].strip().encode("utf-8", "surrogateescape")
    return hmac.compare_digest(offered, token)


def _require_token(request: web.Request) -> None:
    if not authorized(request.headers.get("Authorization"), request.app[TOKEN_KEY]):
        raise web.HTTPUnauthorized(
            text="401 Unauthorized: a valid 'Authorization: Bearer <token>' header is required\n",
            headers={"WWW-Authenticate": 'Bearer realm="mailrelay"'},
        )


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    if request.app[CONTROL_KEY].ready():
        return web.Response(text="ready\n")
    return web.Response(status=503, text="draining\n")


async def metrics_handler(request: web.Request) -> web.Response:
    return web.Response(body=metrics.render(), headers={"Content-Type": metrics.CONTENT_TYPE})


async def status(request: web.Request) -> web.Response:
    _require_token(request)
    return web.json_response(request.app[CONTROL_KEY].status())


async def drain(request: web.Request) -> web.Response:
    _require_token(request)
    control = request.app[CONTROL_KEY]
    await control.drain()
    return web.json_response(control.status())


async def resume(request: web.Request) -> web.Response:
    _require_token(request)
    control = request.app[CONTROL_KEY]
    await control.resume()
    return web.json_response(control.status())


def build_app(control: Control, token: str | None) -> web.Application:
    """The admin application. `token` None (no token file) leaves /status, /drain and /resume open.

    An empty or whitespace-only token is refused (it would authorize `Bearer ` with nothing after it).
    """
    if token is not None:
        token = token.strip()
        if not token:
            raise ValueError("admin token is empty")
    app = web.Application()
    app[CONTROL_KEY] = control
    app[TOKEN_KEY] = token.encode("utf-8") if token is not None else None
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/status", status)
    app.router.add_post("/drain", drain)
    app.router.add_post("/resume", resume)
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving `app` on host:port; stop it with `await runner.cleanup()`.

    Port 0 picks a free port: read it back with `bound_port(runner)`.
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port the runner listens on (useful after `serve(app, host, 0)`)."""
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    raise RuntimeError("admin runner is not listening on TCP")
