"""Structured JSON logging for the relay: one JSON object per line on stderr.

What it is for: `setup()` once per process, then `event(log, "name", key=value, ...)` for every log line,
so each line carries an event name, the worker and, for SMTP, the session id. Field values are
envelope metadata at most (addresses, sizes, queue ids, reply codes).

`RateLimiter` decides which repeated lines are written (one per key per interval, with the count of
those left out; time is a parameter), and `redact()` cuts the local part out of every address in a
text from outside (an upstream's reply), so such texts can be logged.

What it must not do: log message content, tokens or passwords; callers never pass them, and nothing
here reads them.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import sys
from typing import Any

from mailrelay_common import jsonlog

WORKER: dict[str, Any] = {}  # added to every line (jsonlog.JsonFormatter reads it per line)


def setup(level: str = "info", *, worker: int | None = None) -> None:
    """Route every logger to stderr as JSON lines at `level`; `worker` is added to every line."""
    WORKER.clear()
    if worker is not None:
        WORKER["worker"] = worker
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(jsonlog.JsonFormatter(WORKER))
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
        log.log(level, name, extra={jsonlog.FIELDS: fields})


# local@domain, <local@domain>, "quoted local"@domain: the local part goes, the domain stays.
_ADDRESS = re.compile(r'(?:"[^"\r\n]*"|[^\s<>"(),;:\[\]@]+)@(?=[A-Za-z0-9\[])')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def redact(text: str, limit: int = 200) -> str:
    """`text` with every address's local part replaced by `*`, control characters by a space, cut to
    `limit` characters. For texts that come from outside (e.g. an upstream's reply) before they are logged.
    """
    cleaned = _ADDRESS.sub("*@", _CONTROL.sub(" ", text))
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


class RateLimiter:
    """At most one line per key per `interval` seconds; the ones left out are counted.

    `allow(key, now)` returns None when the line is to be left out, else the number left out for that
    key since the last line written (0 the first time). `now` is any monotonic clock, in seconds. At most
    `max_keys` keys are remembered (the least recently written is forgotten first), so memory stays
    bounded whatever the keys are.
    """

    def __init__(self, interval: float, *, max_keys: int = 256) -> None:
        if interval < 0 or max_keys < 1:
            raise ValueError("interval must be >= 0 and max_keys >= 1")
        self.interval = interval
        self.max_keys = max_keys
        self._last: collections.OrderedDict[str, tuple[float, int]] = collections.OrderedDict()

    def allow(self, key: str, now: float) -> int | None:
        entry = self._last.get(key)
        if entry is not None and now - entry[0] < self.interval:
            self._last[key] = (entry[0], entry[1] + 1)
            return None
        suppressed = entry[1] if entry is not None else 0
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        return suppressed
