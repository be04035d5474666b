"""Reading a flags table out of a Markdown document, for the tests that hold a program's docs to its flag
table (`config.FLAGS` of the relay and of the operator)."""

from __future__ import annotations

import pathlib
import re


def flag_table(path: pathlib.Path, heading: str) -> dict[str, str]:
    """{flag name: default cell} from the first table after `heading` (a row may name several flags)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index(heading)
    rows: dict[str, str] = {}
    in_table = False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            in_table = True
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if len(cells) < 2 or not cells[0].startswith("`--"):
                continue  # the header or the separator row
            for name in re.findall(r"`(--[a-z0-9-]+)", cells[0]):
                assert name not in rows, f"{path.name}: {name} has two rows"
                rows[name] = cells[1]
        elif in_table:
            break
    assert rows, f"no flag table under {heading!r} in {path.name}"
    return rows
