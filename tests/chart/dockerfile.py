"""The repository's Dockerfile read as stages and instructions, for the image tests (no tests here).

What it is for: `stages()` (stage name -> its instructions, continuation lines joined) and
`instruction(stage, keyword)` (the arguments of every KEYWORD line), shared by tests/chart/test_images.py
and tests/chart/test_pid1.py.

What it must not do: run a Docker engine, or decide what the Dockerfile should say (the tests do).
"""

from __future__ import annotations

import re

from tests.chart import promql

DOCKERFILE = promql.ROOT / "Dockerfile"


def stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = match.group(1)
            found[current] = []
        if current is not None:
            found[current].append(line)
    return found


def instruction(stage: list[str], keyword: str) -> list[str]:
    """The arguments of each `keyword` line of `stage`."""
    return [line[len(keyword) :].strip() for line in stage if line.upper().startswith(keyword + " ")]
