"""Hypothesis-driven fuzzing of the relay's admin HTTP API over real sockets (docs/security.md §3.2).

Random methods, path spellings (trailing slashes, doubled slashes, percent-encoding, dot segments, case,
query strings), Authorization headers (none, wrong schemes, near-miss tokens, junk bytes) and bodies are
sent as raw HTTP/1.1 requests without the valid token. Properties: the server never answers 5xx and
never crashes; nothing but `/healthz`, `/readyz` and `/metrics` ever answers 2xx; and no request can
drain the relay (`/readyz` stays 200). MAILRELAY_FUZZ_EXAMPLES sets the number of examples (default 150).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailrelay_sandbox import relayproc

from tests.relay import faults_harness as h

EXAMPLES = int(os.environ.get("MAILRELAY_FUZZ_EXAMPLES", "150"))
TOKEN = "fuzz-admin-token-0123456789"
OPEN_PATHS = {b"/healthz", b"/readyz", b"/metrics"}

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[relayproc.RelayProcess]:
    tmp = tmp_path_factory.mktemp("fuzz-admin")
    with h.RecordingSink() as sink, h.relay(tmp, sink.address, token=TOKEN) as r:
        yield r


def raw_http(relay: relayproc.RelayProcess, request: bytes) -> bytes:
    with socket.create_connection((relay.host, relay.admin_port), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


METHODS = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"get",
                           b"post", b"TRACE", b"CONNECT", b"BREW"])
PATHS = st.sampled_from([
    b"/status", b"/drain", b"/resume", b"/healthz", b"/readyz", b"/metrics", b"/status/", b"/drain/",
    b"//drain", b"/%64rain", b"/dr%61in", b"/./drain", b"/x/../drain", b"/DRAIN", b"/drain?token=" +
    TOKEN.encode(), b"/drain#x", b"/drain;x", b"/drain%00", b"/resume%2f", b"*", b"/", b"",
    b"http://127.0.0.1/drain", b"/metrics/../drain",
])
AUTHS = st.sampled_from([
    None, b"Bearer", b"Bearer ", b"Bearer wrong", b"Bearer " + TOKEN.encode()[:-1],
    b"Bearer " + TOKEN.encode() + b"x", b"Basic " + TOKEN.encode(), TOKEN.encode(),
    b"Bearer " + TOKEN.upper().encode(), b"Bearer\t" + TOKEN.encode()[1:], b"Bearer \xff\xfe",
    b"Bearer " + b"A" * 5000,
])
BODIES = st.one_of(st.just(b""), st.binary(max_size=200), st.just(b'{"drain": true}'))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=METHODS, path=PATHS, auth=AUTHS, body=BODIES, extra=st.binary(max_size=40),
       version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b""]))
def test_fuzz_admin_api_without_the_token_never_drains_or_fails(
    relay: relayproc.RelayProcess, method: bytes, path: bytes, auth: bytes | None, body: bytes, extra: bytes,
    version: bytes,
) -> None:
    lines = [method + b" " + path + (b" " + version if version else b""), b"Host: relay.test"]
    if auth is not None:
        lines.append(b"Authorization: " + auth)
    if extra:
        lines.append(b"X-Fuzz: " + extra.replace(b"\r", b"").replace(b"\n", b""))
    lines.append(b"Content-Length: " + str(len(body)).encode())
    lines.append(b"Connection: close")
    response = raw_http(relay, b"\r\n".join(lines) + b"\r\n\r\n" + body)
    assert relay.running, f"relay died; log tail:\n{relay.log_text()[-2000:]}"
    if response:
        status_line = response.split(b"\r\n", 1)[0]
        parts = status_line.split(b" ")
        assert len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit(), status_line
        code = int(parts[1])
        assert code < 500, f"{status_line!r} for {lines[0]!r}"
        if 200 <= code < 300:
            assert path.split(b"?")[0] in OPEN_PATHS, f"{lines[0]!r} answered {code} without the token"
    code, _ = relay.get("/readyz")
    assert code == 200, f"the relay was drained by {lines!r}"


def test_fuzz_admin_aftermath_the_token_still_works(relay: relayproc.RelayProcess) -> None:
    """After the fuzzing (file order), the real token still drains and resumes: nothing got stuck."""
    code, _ = relay.request("POST", "/drain")
    assert code == 200
    assert relay.get("/readyz")[0] == 503
    assert relay.request("POST", "/resume")[0] == 200
    assert relay.get("/readyz")[0] == 200
    assert relay.healthy()
