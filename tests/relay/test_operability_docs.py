"""The relay's flag tables in docs/contracts.md and docs/relay.md match config.FLAGS: the same flags,
the same defaults. A flag added to config.py without its row (or a row without its flag) fails here."""

from __future__ import annotations

import pathlib

import pytest
from mailrelay_common import flags
from mailrelay_relay import config

from tests import flagdocs

REPO = pathlib.Path(__file__).resolve().parents[2]
# What a table writes in the default column for a flag without a default (Flag.default is None).
UNSET_WORDS = {"unset", "required", "the host's FQDN"}


def default_cell(flag: flags.Flag) -> str | None:
    return None if flag.default is None else f"`{flag.default}`"


DOCS = [
    ("contracts.md", "## Relay CLI (`mailrelay-relay`)"),
    ("relay.md", "## Command line"),
]


@pytest.mark.parametrize(("doc", "heading"), DOCS)
def test_every_config_flag_has_a_row_and_every_row_a_flag(doc: str, heading: str) -> None:
    rows = flagdocs.flag_table(REPO / "docs" / doc, heading)
    names = {flag.name for flag in config.FLAGS}
    assert sorted(names - set(rows)) == [], f"flags missing from docs/{doc}"
    assert sorted(set(rows) - names) == [], f"rows in docs/{doc} for flags config.py does not have"


@pytest.mark.parametrize(("doc", "heading"), DOCS)
def test_documented_defaults_are_the_config_defaults(doc: str, heading: str) -> None:
    rows = flagdocs.flag_table(REPO / "docs" / doc, heading)
    for flag in config.FLAGS:
        cell = rows[flag.name]
        expected = default_cell(flag)
        if expected is None:
            assert cell in UNSET_WORDS, f"docs/{doc}: {flag.name} has no default, the table says {cell}"
        else:
            assert cell == expected, f"docs/{doc}: {flag.name} defaults to {expected}, the table says {cell}"


def test_the_table_parser_sees_a_missing_row(tmp_path: pathlib.Path) -> None:
    """The check itself can fail: drop one row and the flag is reported missing."""
    source = (REPO / "docs" / "contracts.md").read_text(encoding="utf-8")
    trimmed = "\n".join(line for line in source.splitlines() if not line.startswith("| `--data-timeout"))
    (tmp_path / "contracts.md").write_text(trimmed, encoding="utf-8")
    rows = flagdocs.flag_table(tmp_path / "contracts.md", DOCS[0][1])
    assert "--data-timeout" not in rows and "--command-timeout" in rows
