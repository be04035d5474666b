"""Fixtures of the chart/observability tests: the live stack (tests/chart/livestack.py), run once per
session on the session's real control plane (`kube_session`, tests/conftest.py) and shared."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import kubeenv
from tests.chart import livestack
from tests.conftest import require_tool


@pytest.fixture(scope="session")
def live(kube_session: kubeenv.SessionCluster) -> Iterator[livestack.Stack]:
    prometheus = require_tool("prometheus")
    require_tool("helm")
    with livestack.running(prometheus, kube_session) as stack:
        if stack.error is not None:
            log = stack.operator_log[-4000:]
            pytest.fail(f"live stack failed: {stack.error!r}\n" + "\n".join(stack.events) + "\n" + log)
        yield stack
