"""Structured JSON logging for the relay: one JSON object per line on stderr.

What it is for: `setup()` once per process, then `event(log, "name", key=value, ...)` for every log line,
so each line carries an event name, the worker and, for SMTP, the session id. Field values are
envelope metadata at most (addresses, sizes, queue ids, reply codes).

What it must not do: log message content, tokens or passwords; callers never pass them, and nothing
here reads them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

_FIELDS = "mailrelay_fields"
WORKER: dict[str, Any] = {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            "pid": record.process,
        }
        entry.update(WORKER)
        fields = getattr(record, _FIELDS, None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=True)


def setup(level: str = "info", *, worker: int | None = None) -> None:
    """Route every logger to stderr as JSON lines at `level`; `worker` is added to every line."""
    WORKER.clear()
    if worker is not None:
        WORKER["worker"] = worker
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log and asyncio's debug chatter stay quiet unless asked for.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if level != "debug":
        logging.getLogger("asyncio").setLevel(logging.WARNING)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


def event(log: logging.Logger, name: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log event `name` with structured `fields` (never message content)."""
    if log.isEnabledFor(level):
        log.log(level, name, extra={_FIELDS: fields})
