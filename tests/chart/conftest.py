"""Fixtures of the chart/observability tests: the live stack, run once per session and shared."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chart import livestack
from tests.conftest import require_tool


@pytest.fixture(scope="session")
def live() -> Iterator[livestack.Stack]:
    prometheus = require_tool("prometheus")
    require_tool("helm")
    with livestack.running(prometheus) as stack:
        if stack.error is not None:
            log = ""
            if stack.workdir is not None and (stack.workdir / "operator.log").exists():
                log = (stack.workdir / "operator.log").read_text(errors="replace")[-4000:]
            pytest.fail(f"live stack failed: {stack.error!r}\n" + "\n".join(stack.events) + "\n" + log)
        yield stack
