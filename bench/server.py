"""What every server under test offers the benchmark (Postfix and mailrelay-relay alike).

What it must not do: hold any behaviour; it is a Protocol only.
"""

from __future__ import annotations

from typing import Protocol


class Server(Protocol):
    name: str
    port: int

    def pids(self) -> list[int]: ...

    def cpu_seconds(self) -> float: ...

    def log_tail(self, lines: int = 5) -> str: ...
