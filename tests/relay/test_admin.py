"""The admin API over real HTTP: open endpoints, bearer token (401 without or with a wrong one), the
status JSON of docs/contracts.md, drain/resume idempotence and /readyz turning 503 while draining.

The relay side is a small in-test Control (the real one lives in app.py and is tested with the relay
process); the HTTP server and client are real."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailrelay_relay import admin

TOKEN = "s3cret-token"


class FakeRelay:
    def __init__(self) -> None:
        self.draining = False
        self.drain_calls = 0
        self.resume_calls = 0

    def status(self) -> admin.Status:
        return {
            "draining": self.draining,
            "drained": self.draining,
            "sessions": 3,
            "max_sessions": 200,
            "inflight_bytes": 4096,
            "queue": {"messages": 12, "bytes": 24576, "oldest_age_seconds": 0.4},
            "dead_letter": {"messages": 0},
            "hostname": "relay-0",
            "version": "0.1.0",
        }

    def ready(self) -> bool:
        return not self.draining

    async def drain(self) -> None:
        self.drain_calls += 1
        self.draining = True

    async def resume(self) -> None:
        self.resume_calls += 1
        self.draining = False


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakeRelay, str]]:
    relay = FakeRelay()
    runner = await admin.serve(admin.build_app(relay, TOKEN + "\n"), "127.0.0.1", 0)
    try:
        yield relay, f"http://127.0.0.1:{admin.bound_port(runner)}"
    finally:
        await runner.cleanup()


async def test_open_endpoints_need_no_token(served: tuple[FakeRelay, str]) -> None:
    _, base = served
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/healthz") as r:
            assert r.status == 200
            assert (await r.text()).strip() == "ok"
        async with http.get(base + "/readyz") as r:
            assert r.status == 200
        async with http.get(base + "/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            assert "mailrelay_relay_build_info" in await r.text()


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/status"), ("POST", "/drain"), ("POST", "/resume")]
)
@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong", "Bearer ", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", TOKEN],
)
async def test_protected_endpoints_refuse_missing_or_wrong_token(
    served: tuple[FakeRelay, str], method: str, path: str, header: str | None
) -> None:
    relay, base = served
    headers = {"Authorization": header} if header is not None else {}
    async with aiohttp.ClientSession() as http, http.request(method, base + path, headers=headers) as r:
        assert r.status == 401
        assert "Bearer" in r.headers["WWW-Authenticate"]
        assert TOKEN not in await r.text()
    assert relay.drain_calls == relay.resume_calls == 0
    assert not relay.draining


async def test_status_drain_resume_with_token(served: tuple[FakeRelay, str]) -> None:
    relay, base = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/status", headers=auth) as r:
            assert r.status == 200
            body = await r.json()
        assert body == relay.status()
        assert set(body) >= {"draining", "drained", "sessions", "max_sessions", "inflight_bytes", "queue",
                             "dead_letter", "hostname", "version"}
        assert set(body["queue"]) == {"messages", "bytes", "oldest_age_seconds"}
        # Drain twice: idempotent, both answer 200 with the status; readiness turns 503.
        for _ in range(2):
            async with http.post(base + "/drain", headers={"authorization": f"bearer {TOKEN}"}) as r:
                assert r.status == 200
                assert (await r.json())["draining"] is True
        async with http.get(base + "/readyz") as r:
            assert r.status == 503
        for _ in range(2):
            async with http.post(base + "/resume", headers=auth) as r:
                assert r.status == 200
                assert (await r.json())["draining"] is False
        async with http.get(base + "/readyz") as r:
            assert r.status == 200
        async with http.get(base + "/drain", headers=auth) as r:
            assert r.status == 405
    assert relay.drain_calls == 2 and relay.resume_calls == 2


async def test_without_token_everything_is_open() -> None:
    relay = FakeRelay()
    runner = await admin.serve(admin.build_app(relay, None), "127.0.0.1", 0)
    base = f"http://127.0.0.1:{admin.bound_port(runner)}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/status") as r:
                assert r.status == 200
            async with http.post(base + "/drain") as r:
                assert r.status == 200
    finally:
        await runner.cleanup()
    assert relay.draining


def test_empty_token_is_refused() -> None:
    with pytest.raises(ValueError):
        admin.build_app(FakeRelay(), " \n")


async def test_plain_urllib_client_in_a_thread(served: tuple[FakeRelay, str]) -> None:
    """A second, independent HTTP client (stdlib) sees the same behaviour."""
    import asyncio

    _, base = served

    def fetch(token: str | None) -> tuple[int, str]:
        req = urllib.request.Request(base + "/status")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, ""

    status, body = await asyncio.to_thread(fetch, TOKEN)
    assert status == 200 and json.loads(body)["hostname"] == "relay-0"
    assert (await asyncio.to_thread(fetch, None))[0] == 401


@given(header=st.one_of(st.none(), st.text(max_size=40)))
def test_authorized_only_for_the_exact_token(header: str | None) -> None:
    token = TOKEN.encode()
    expected = header is not None and header[:7].lower() == "bearer " and header[7:].strip() == TOKEN
    assert admin.authorized(header, token) is expected
    assert admin.authorized(header, None) is True
