"""Helpers for the delivery tests that run `delivery.Delivery` in-process against a real upstream (no
tests here): the counters they read, the message content they queue, and their deadline.

What it must not do: decide what delivery should do; the tests assert that.
"""

from __future__ import annotations

from prometheus_client import REGISTRY

WAIT = 60.0  # generous: other engineers load this 2-core machine at the same time


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Counters:
    """Deltas of the delivery counters since creation (the registry is process-wide)."""

    NAMES = {
        "delivered": ("mailrelay_relay_messages_delivered_total", {}),
        "dl_permanent": ("mailrelay_relay_messages_dead_lettered_total", {"reason": "permanent"}),
        "dl_expired": ("mailrelay_relay_messages_dead_lettered_total", {"reason": "expired"}),
        "success": ("mailrelay_relay_delivery_attempts_total", {"result": "success"}),
        "temporary": ("mailrelay_relay_delivery_attempts_total", {"result": "temporary"}),
        "permanent": ("mailrelay_relay_delivery_attempts_total", {"result": "permanent"}),
        "connection_error": ("mailrelay_relay_delivery_attempts_total", {"result": "connection_error"}),
        "duration_count": ("mailrelay_relay_delivery_duration_seconds_count", {}),
    }

    def __init__(self) -> None:
        self.base = {k: sample(n, **labels) for k, (n, labels) in self.NAMES.items()}

    def __getitem__(self, key: str) -> float:
        name, labels = self.NAMES[key]
        return sample(name, **labels) - self.base[key]


def content(n: int) -> bytes:
    return (f"From: a@example.org\r\nTo: b@example.org\r\nSubject: test {n}\r\n\r\n"
            f"line one of {n}\r\n.leading dot\r\n").encode()
