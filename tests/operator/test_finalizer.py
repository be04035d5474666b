"""The finalizer's rounds: how long it waits (`finalizer.bound`), how it asks Kopf to call again
(`finalizer.Pending`), and that such a waiting round is kept out of the logs and Events (the handlers'
Kopf settings) while every other temporary failure still shows."""

from __future__ import annotations

import logging
from typing import Any

import kopf
import pytest
from mailrelay_operator import finalizer, handlers, spec


def test_waiting_rounds_are_quiet_and_failures_are_not(caplog: pytest.LogCaptureFixture) -> None:
    handlers.configure(kopf.OperatorSettings())
    handlers.configure(kopf.OperatorSettings())  # idempotent: one filter
    objects = logging.getLogger("kopf.objects")
    assert sum(isinstance(f, handlers.QuietPending) for f in objects.filters) == 1
    with caplog.at_level(logging.DEBUG, logger="kopf.objects"):
        objects.error("Handler 'deleted' failed temporarily: %s", str(finalizer.Pending()))
        objects.error("Handler 'deleted' failed temporarily: GET /pods: 503 ServiceUnavailable")
    assert [r.getMessage() for r in caplog.records] == [
        "Handler 'deleted' failed temporarily: GET /pods: 503 ServiceUnavailable"]


def test_a_pending_round_asks_kopf_to_call_again_soon() -> None:
    pending = finalizer.Pending(delay=0.4)
    assert isinstance(pending, kopf.TemporaryError) and pending.delay == 0.4
    assert finalizer.Pending().delay == finalizer.POLL_SECONDS


@pytest.mark.parametrize(
    ("spec_drain", "delete_wait", "expected"),
    [
        ({"timeoutSeconds": 120}, None, 120.0),
        ({"timeoutSeconds": 120}, 30.0, 30.0),
        ({"timeoutSeconds": 20}, 30.0, 20.0),
        ("not an object", None, float(spec.DEFAULT_DRAIN_TIMEOUT_SECONDS)),  # an invalid spec: the default
    ],
)
def test_the_finalizers_bound(spec_drain: Any, delete_wait: float | None, expected: float) -> None:
    body = {"spec": {"upstream": {"host": "smarthost.test", "port": 25}, "acceptFrom": ["10.0.0.0/8"],
                     "drain": spec_drain}}
    assert finalizer.bound(body, delete_wait) == expected
