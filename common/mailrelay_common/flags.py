"""One table of flags drives a program's command line: its argparse options, its environment variables and
its documentation table.

What it is for: `Flag` describes one option (name, contract default, help, variable); `add_arguments`
builds the argparse options from a table; `gather` collects the raw strings (a flag wins over its
variable, and the variable over nothing), keyed by `Flag.dest`. Each program parses those strings into
its own frozen settings, with an error that names the flag.

What it must not do: parse values, know any program's flags, or read the environment itself (the caller
passes it).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence

RawValue = str | Sequence[str] | None


@dataclasses.dataclass(frozen=True)
class Flag:
    name: str  # "--max-sessions"
    default: str | None  # the contract default, as the user would type it; None = unset
    help: str
    repeatable: bool = False
    metavar: str | None = None
    switch: bool = False  # takes no value on the command line; its variable is true/false
    prefix: str = "MAILRELAY_"  # of its environment variable

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return self.prefix + self.dest.upper()


def add_arguments(parser: argparse.ArgumentParser, table: Sequence[Flag]) -> None:
    """One argparse option per flag of `table`; each defaults to None (unset), so `gather` sees the user's
    choice. The help names the variable and the default."""
    for flag in table:
        default_text = flag.default if flag.default is not None else "unset"
        if flag.switch:
            parser.add_argument(flag.name, dest=flag.dest, action="store_const", const="true", default=None,
                                help=f"{flag.help} [{flag.env}=true; default: {default_text}]")
            continue
        parser.add_argument(
            flag.name,
            dest=flag.dest,
            metavar=flag.metavar,
            action="append" if flag.repeatable else "store",
            default=None,
            help=f"{flag.help} [{flag.env}; default: {default_text}]",
        )


def gather(args: argparse.Namespace, environ: Mapping[str, str],
           table: Sequence[Flag]) -> dict[str, RawValue]:
    """Flag values, else environment values, keyed by Flag.dest (None where neither is set)."""
    values: dict[str, RawValue] = {}
    for flag in table:
        value = getattr(args, flag.dest)
        if value is None:
            value = environ.get(flag.env) or None
        values[flag.dest] = value
    return values


def origin(flag: Flag, args: argparse.Namespace) -> str:
    """Where a flag's value came from, for an error message: the flag, else its variable."""
    return flag.name if getattr(args, flag.dest) is not None else f"{flag.name} ({flag.env})"
