"""Fixtures shared by the relay-core tests: a fresh `spool.Spool` in the test's own folder.

What it must not do: start processes or servers (the harness modules next to it do that, per test).
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest
from mailrelay_relay import spool


@pytest.fixture
async def store(tmp_path: pathlib.Path) -> AsyncIterator[spool.Spool]:
    sp = spool.Spool(tmp_path / "spool")
    yield sp
    sp.close()
