"""Postfix's `smtp-source` as the client of the throughput runs: one message per connection (no `-d`),
SESSIONS connections in parallel, a payload of BYTES per message.

What it must not do: hide a failure; the exit code and the last lines of stderr are returned.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"


@dataclasses.dataclass(frozen=True)
class SourceResult:
    seconds: float
    returncode: int
    errors: str


def run(port: int, messages: int, sessions: int, size: int, timeout: float) -> SourceResult:
    argv = [
        SMTP_SOURCE,
        "-m", str(messages),
        "-s", str(sessions),
        "-l", str(size),
        "-f", "bench@example.com",
        "-t", "sink@example.org",
        f"127.0.0.1:{port}",
    ]  # fmt: skip
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        code, errors = done.returncode, done.stderr
    except subprocess.TimeoutExpired as error:
        code, errors = -1, f"timed out after {timeout}s {error.stderr!r}"
    seconds = time.monotonic() - started
    tail = "\n".join(errors.strip().splitlines()[-3:])
    return SourceResult(seconds=seconds, returncode=code, errors=tail)
