"""Run the real helm binary on the chart and parse what it renders.

What it is for: one place for `helm lint` / `helm template` invocations used by the chart tests.
What it must not do: talk to a cluster (only `lint` and `template`, which are offline).
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Any

import yaml

from tests.chart import promql
from tests.conftest import require_tool

MONITORING_API = "monitoring.coreos.com/v1"


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("helm"), *args], capture_output=True, text=True, timeout=120)


def template(
    *,
    api_versions: Sequence[str] = (),
    sets: Sequence[str] = (),
    namespace: str = "mailrelay-system",
    release: str = "mr",
) -> list[dict[str, Any]]:
    args = ["template", release, str(promql.CHART), "--namespace", namespace]
    for api in api_versions:
        args += ["--api-versions", api]
    for value in sets:
        args += ["--set", value]
    result = helm(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def template_text(*, api_versions: Sequence[str] = (), sets: Sequence[str] = ()) -> str:
    args = ["template", "mr", str(promql.CHART), "--namespace", "mailrelay-system"]
    for api in api_versions:
        args += ["--api-versions", api]
    for value in sets:
        args += ["--set", value]
    result = helm(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]
