"""Helpers for the end-to-end tests. The fixtures they use are tests/conftest.py's: this test's namespace
on the real control plane (`kube`), the upstream sink (`sink`) and the test's node, a process kubelet
running the relays (`node`)."""

from __future__ import annotations

import base64
from typing import Any

from tests.conftest import eventually as eventually  # re-exported for the tests here


def secret(name: str, token: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "data": {"token": base64.b64encode(token.encode()).decode()}}
