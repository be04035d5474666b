"""The Dockerfile, checked without a Docker engine: targets, entrypoints, user, and the chart's images.

No engine runs here, so this test reads the Dockerfile and checks what it names: the two targets the
chart refers to, console scripts that pyproject.toml declares and that resolve to a callable, a
numeric non-root USER, tini as PID 1, a spool volume, and build-context paths the .dockerignore keeps.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import re
import tomllib

import yaml

from tests.chart import dockerfile, promql

DOCKERIGNORE = promql.ROOT / ".dockerignore"


def _scripts() -> dict[str, str]:
    with (promql.ROOT / "pyproject.toml").open("rb") as fh:
        return dict(tomllib.load(fh)["project"]["scripts"])


def test_two_targets_with_tini_and_declared_console_scripts() -> None:
    stages = dockerfile.stages()
    scripts = _scripts()
    for target, script in (("relay", "mailrelay-relay"), ("operator", "mailrelay-operator")):
        assert target in stages, f"Dockerfile has no target {target!r}"
        (entrypoint,) = dockerfile.instruction(stages[target], "ENTRYPOINT")
        argv = yaml.safe_load(entrypoint)  # exec form, a JSON list
        assert argv[0] == "/usr/bin/tini", "tini must be PID 1 so SIGTERM reaches the Python process"
        assert argv[-1] == script
        assert script in scripts, f"pyproject.toml declares no console script {script}"


def test_console_scripts_resolve_to_callables() -> None:
    entry_points = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")}
    for script in ("mailrelay-relay", "mailrelay-operator"):
        assert callable(entry_points[script].load()), script


def test_non_root_numeric_user_in_every_runtime_stage() -> None:
    stages = dockerfile.stages()
    for target in ("relay", "operator"):
        users = dockerfile.instruction(stages["base"], "USER")
        users += dockerfile.instruction(stages[target], "USER")
        assert users, target
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) >= 1000, f"{target} must end as a numeric non-root USER"


def test_relay_spool_is_a_volume_with_the_contract_default() -> None:
    relay = dockerfile.stages()["relay"]
    volumes = [yaml.safe_load(v) for v in dockerfile.instruction(relay, "VOLUME")]
    assert ["/var/spool/mailrelay"] in volumes
    exposed = " ".join(dockerfile.instruction(relay, "EXPOSE")).split()
    assert {"2525", "8025"} <= set(exposed)


def test_build_context_keeps_what_copy_needs() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        verdict = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            bare = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, bare) or path.startswith(bare + "/"):
                verdict = not negate
        return verdict

    for line in dockerfile.instruction(dockerfile.stages()["build"], "COPY"):
        *sources, _dest = line.split()
        for source in sources:
            if source.startswith("--"):
                continue
            source = source.rstrip("/")
            assert (promql.ROOT / source).exists(), source
            assert not ignored(source), f".dockerignore drops {source}, which COPY needs"


def test_chart_image_references_match_the_dockerfile_targets() -> None:
    values = yaml.safe_load((promql.CHART / "values.yaml").read_text())
    chart = yaml.safe_load((promql.CHART / "Chart.yaml").read_text())
    with (promql.ROOT / "pyproject.toml").open("rb") as fh:
        version = tomllib.load(fh)["project"]["version"]
    stages = dockerfile.stages()
    titles = {}
    for target in ("relay", "operator"):
        labels = " ".join(dockerfile.instruction(stages[target], "LABEL"))
        titles[target] = re.search(r'org\.opencontainers\.image\.title="([^"]+)"', labels).group(1)  # type: ignore[union-attr]
    assert values["image"]["repository"].rsplit("/", 1)[-1] == titles["operator"]
    assert values["relayImage"]["repository"].rsplit("/", 1)[-1] == titles["relay"]
    assert chart["appVersion"] == version, "image tags default to appVersion: it must be the package version"


def test_operator_built_relay_pods_fit_the_relay_image() -> None:
    """The operator's relay pod template relies on the image: its UID, its spool path, its entrypoint."""
    from mailrelay_operator import manifests

    stages = dockerfile.stages()
    users = dockerfile.instruction(stages["relay"], "USER") or dockerfile.instruction(stages["base"], "USER")
    uid = users[-1].split(":")[0]
    assert int(uid) == manifests.RUN_AS
    volumes = [yaml.safe_load(v) for v in dockerfile.instruction(stages["relay"], "VOLUME")]
    assert [manifests.SPOOL_PATH] in volumes
    envs = " ".join(dockerfile.instruction(stages["relay"], "ENV"))
    assert f"MAILRELAY_SPOOL={manifests.SPOOL_PATH}" in envs


def test_each_image_gets_a_virtualenv_with_its_own_extra_and_no_sandbox() -> None:
    """The relay image's virtualenv comes from a stage that installs '.[relay]', the operator's from one
    that installs '.[operator]' (tests/chart/test_package.py installs each extra and checks what it holds),
    and the build context holds every folder the wheel's packages come from, but never the sandbox."""
    stages = dockerfile.stages()
    for target in ("relay", "operator"):
        copies = dockerfile.instruction(stages[target], "COPY")
        sources = [line.split()[0].removeprefix("--from=") for line in copies if line.startswith("--from=")]
        assert len(sources) == 1, f"{target}: one virtualenv, copied from one build stage"
        installs = " ".join(dockerfile.instruction(stages[sources[0]], "RUN"))
        assert f"'.[{target}]'" in installs, f"{target} image must install the {target} extra"
        other = "operator" if target == "relay" else "relay"
        assert f".[{other}" not in installs and "[test" not in installs
    with (promql.ROOT / "pyproject.toml").open("rb") as fh:
        where = tomllib.load(fh)["tool"]["setuptools"]["packages"]["find"]["where"]
    copied = {line.split()[0].rstrip("/") for line in dockerfile.instruction(stages["build"], "COPY")}
    assert {folder for folder in where if (promql.ROOT / folder).is_dir()} <= copied
    assert not [line for stage in stages.values() for line in stage if "sandbox" in line]
