"""Structured logs: one JSON object per line, in the same fields for the relay and the operator.

What it is for: `JsonFormatter` turns a log record into `{"ts", "level", "logger", "event", "pid", ...}`,
plus the fields a caller attached under `FIELDS` (`extra={FIELDS: {...}}`), the formatter's own constant
fields (the relay's worker), the Kubernetes object a Kopf record is about (`object`), and the traceback
(`exception`).

What it must not do: decide what is logged, or where to (the programs install their handlers).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

FIELDS = "mailrelay_fields"  # the record attribute holding a line's structured fields
KOPF_OBJECT = "k8s_ref"  # the record attribute where Kopf names the object a line is about


class JsonFormatter(logging.Formatter):
    """`constant` is read at each line (the caller may update it, e.g. the relay's worker number)."""

    def __init__(self, constant: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.constant: Mapping[str, Any] = constant if constant is not None else {}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            "pid": record.process,
        }
        entry.update(self.constant)
        obj = getattr(record, KOPF_OBJECT, None)
        if isinstance(obj, dict):
            entry["object"] = {key: obj[key] for key in ("kind", "namespace", "name") if obj.get(key)}
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=True)
