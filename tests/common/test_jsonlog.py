"""One JSON object per log line, in the same fields for the relay and the operator (Kopf's lines too)."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from mailrelay_common import jsonlog


def record(message: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("kopf.objects", logging.WARNING, __file__, 1, message, None, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_a_line_carries_the_common_fields() -> None:
    line = json.loads(jsonlog.JsonFormatter().format(record("tick failed: %s")))
    assert {"ts", "level", "logger", "event", "pid"} <= set(line)
    assert (line["level"], line["logger"], line["event"]) == ("warning", "kopf.objects", "tick failed: %s")
    assert line["ts"].endswith("Z")


def test_kopf_object_structured_fields_and_constant_fields() -> None:
    constant = {"worker": 1}
    formatter = jsonlog.JsonFormatter(constant)
    ref = {"kind": "MailRelay", "namespace": "mail", "name": "r1", "uid": "u"}
    rec = record("handler failed", k8s_ref=ref, **{jsonlog.FIELDS: {"pods": 3}})
    line = json.loads(formatter.format(rec))
    assert line["object"] == {"kind": "MailRelay", "namespace": "mail", "name": "r1"}
    assert line["pods"] == 3 and line["worker"] == 1
    constant["worker"] = 2  # read at each line
    assert json.loads(formatter.format(rec))["worker"] == 2


def test_a_traceback_stays_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("crashed")
        rec.exc_info = sys.exc_info()
    text = jsonlog.JsonFormatter().format(rec)
    assert "\n" not in text and "ValueError: boom" in json.loads(text)["exception"]


@pytest.mark.parametrize("message", ["plain", "quote \" and newline \n", "ünïcode"])
def test_any_message_is_one_valid_line(message: str) -> None:
    text = jsonlog.JsonFormatter().format(record(message))
    assert "\n" not in text and json.loads(text)["event"] == message
