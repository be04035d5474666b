"""Shared pytest configuration: how a test asks for an external tool.

A test that needs a real peer (swaks, smtp-sink, promtool, helm, ...) calls `require_tool`. Locally a
missing tool skips the test with a reason; with CI=true it fails, so CI can never hide a missing install.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLS_BIN = REPO_ROOT / ".tools" / "bin"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_tool(name: str) -> str:
    """Return the path of tool `name`, or skip (locally) / fail (CI=true) when it is missing."""
    path = shutil.which(name, path=f"{TOOLS_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        for extra in ("/usr/sbin", "/usr/lib/postfix/sbin"):
            candidate = Path(extra) / name
            if candidate.exists():
                return str(candidate)
        message = f"required tool {name!r} is not installed (run `make tools`)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path
