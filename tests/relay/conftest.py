"""Fixtures shared by the relay tests: a fresh `spool.Spool` in the test's own folder, and, unless a test
module defines its own, the module's upstream sink (`sink`) and the module's relay process (`relay`,
with the module's `RELAY_ARGS`) delivering to it.

What it must not do: decide what the relay should answer (the tests do), or share a relay between
modules (each module's relay has that module's flags).
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Iterator

import pytest
from mailrelay_relay import spool
from mailrelay_sandbox import relayproc
from mailrelay_sandbox import sink as sinkmod

from tests.relay.relay_harness import start_relay


@pytest.fixture
async def store(tmp_path: pathlib.Path) -> AsyncIterator[spool.Spool]:
    sp = spool.Spool(tmp_path / "spool")
    yield sp
    sp.close()


@pytest.fixture(scope="module")
def sink() -> Iterator[sinkmod.Sink]:
    with sinkmod.running() as s:
        yield s


@pytest.fixture(scope="module")
def relay(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          sink: sinkmod.Sink) -> Iterator[relayproc.RelayProcess]:
    """A relay for the test module: its flags are the module's RELAY_ARGS (none when it has none)."""
    args = list(getattr(request.module, "RELAY_ARGS", ()))
    relay = start_relay(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]),
                        sink.address, args=args)
    yield relay
    relay.kill()
