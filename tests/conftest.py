"""Shared pytest configuration: how a test asks for an external tool.

A test that needs a real peer (swaks, smtp-sink, promtool, helm, ...) calls `require_tool`. Locally a
missing tool skips the test with a reason; with CI=true it fails, so CI can never hide a missing install.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from mailrelay_sandbox import faultproxy, kubelet, scenario, waiting

from tests import kubeenv

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
        missing(f"required tool {name!r} is not installed (run `make tools`)")
    return path


def missing(message: str) -> None:
    """Something a test needs is not on this machine: skip locally, fail with CI=true (never hidden)."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


eventually = waiting.eventually  # the one async poll (mailrelay_sandbox.waiting), for the tests here


def with_field(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `base` with the dotted `path` set to `value` (sample specs for admission tests)."""
    out = copy.deepcopy(base)
    node = out
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return out


# -- the real Kubernetes control plane (tests/kubeenv.py) -------------------------------------------

@pytest.fixture(scope="session")
def kube_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kubeenv.SessionCluster]:
    """One real control plane for the whole run, with the CRD and the chart's RBAC installed."""
    from mailrelay_sandbox import kubecluster

    if kubecluster.find_binaries() is None:
        missing("the control plane's binaries are not built (run `make tools` or scripts/install-kube.sh)")
    require_tool("helm")
    session = kubeenv.start_session_cluster(tmp_path_factory.mktemp("kube"))
    try:
        yield session
    finally:
        session.cluster.stop()


@pytest.fixture
def kube(kube_session: kubeenv.SessionCluster) -> Iterator[kubeenv.KubeEnv]:
    """This test's namespace (and the node its pods are pinned to) on the session's control plane."""
    env = kubeenv.new_env(kube_session)
    try:
        yield env
    finally:
        kubeenv.end_env(env)


@pytest.fixture
async def sink() -> AsyncIterator[scenario.Upstream]:
    """The upstream smarthost the relays deliver to (the sandbox's recording sink)."""
    async with scenario.upstream_sink() as upstream:
        yield upstream


@pytest.fixture
def node_options() -> dict[str, Any]:
    """Options of the test's process kubelet; a test folder overrides this fixture to change them."""
    return {"extra_env": {"MAILRELAY_LOG_LEVEL": "warning"}}


@pytest.fixture
async def node(kube: kubeenv.KubeEnv, sink: scenario.Upstream, tmp_path: Path,
               node_options: dict[str, Any]) -> AsyncIterator[kubelet.ProcessKubelet]:
    """The test's node: the pods the scheduler binds to it run as real relay processes on their pod IPs,
    delivering to `sink`."""
    async with kubelet.ProcessKubelet.on(kube.cluster, kube.node, tmp_path / "pods", sink.address,
                                         **node_options) as running:
        yield running


@pytest.fixture
def proxy(kube: kubeenv.KubeEnv, tmp_path: Path) -> Iterator[faultproxy.FaultProxy]:
    """A fault-injecting, recording proxy in front of the API server; `proxy.kubeconfig` carries the
    operator's own ServiceAccount token, so RBAC still applies to everything forwarded."""
    with faultproxy.FaultProxy(kube.url, kube.ca_file) as running:
        running.kubeconfig = kubeenv.plain_kubeconfig(tmp_path / "proxy.kubeconfig", running.url,
                                                      kube.session.operator_token)
        yield running
