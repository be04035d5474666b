"""The distribution: the wheel both images install ships the two programs and never the dev sandbox, and
each program's extra brings its own dependencies and not the other program's.

The wheel is built with pip from a copy of the repository (sandbox/ included, so leaving it out is the
build's doing). Each extra is then installed from that wheel into a private folder, and a Python that
sees only the standard library and that folder imports every module of its program, while the other
program's libraries stay absent: what each image's virtualenv holds, without a Docker engine.
"""

from __future__ import annotations

import email.parser
import pathlib
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator

import pytest
from packaging import requirements, utils

from tests.chart import promql
from tests.conftest import missing

_SKIP = {".git", ".venv", ".tools", "out", "build", "__pycache__", ".mypy_cache", ".ruff_cache",
         ".pytest_cache", ".hypothesis"}


def _copy_repository(dest: pathlib.Path) -> pathlib.Path:
    def ignore(folder: str, names: list[str]) -> set[str]:
        return {name for name in names if name in _SKIP or name.endswith(".egg-info")}

    return pathlib.Path(shutil.copytree(promql.ROOT, dest, ignore=ignore, symlinks=True))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    work = tmp_path_factory.mktemp("package")
    source = _copy_repository(work / "src")
    assert (source / "sandbox" / "mailrelay_sandbox" / "__init__.py").is_file()
    out = work / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(source)],
        capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        missing(f"pip could not build the wheel (its build backend comes from the package index):\n"
                f"{result.stderr[-2000:]}")
    (built,) = out.glob("mailrelay_operator-*.whl")
    yield built


def _top_level(wheel: pathlib.Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/", 1)[0] for name in archive.namelist()}
        return {top for top in tops if not top.endswith(".dist-info")}


def _metadata(wheel: pathlib.Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(name).decode())


def test_the_wheel_ships_the_programs_and_not_the_sandbox(wheel: pathlib.Path) -> None:
    shipped = _top_level(wheel)
    assert "mailrelay_sandbox" not in shipped
    programs = {"mailrelay_relay", "mailrelay_operator"}
    if (promql.ROOT / "common" / "mailrelay_common" / "__init__.py").is_file():
        programs.add("mailrelay_common")  # the small library both programs share
    assert shipped == programs  # nothing else: no tests, no bench, no top-level module


def test_the_wheel_declares_one_extra_per_program(wheel: pathlib.Path) -> None:
    metadata = _metadata(wheel)
    assert {"relay", "operator"} <= set(metadata.get_all("Provides-Extra") or [])
    requires = [requirements.Requirement(line) for line in metadata.get_all("Requires-Dist") or []]

    def extras_of(project: str) -> set[str]:
        """The extras ("" for the base list) whose install brings `project` in."""
        return {extra for req in requires if utils.canonicalize_name(req.name) == project
                for extra in ("", "relay", "operator", "test")
                if (req.marker.evaluate({"extra": extra}) if req.marker else extra == "")}

    assert extras_of("kopf") == {"operator"}
    assert extras_of("kubernetes-asyncio") == {"operator"}
    assert extras_of("aiosmtplib") == {"relay"}
    assert extras_of("aiosmtpd") == {"test"}  # the sandbox's sink; the relay's SMTP server is its own
    assert extras_of("aiohttp") == {""}  # both programs
    assert extras_of("cryptography") == {"test"} and extras_of("matplotlib") == {"test"}


# program: (its package, libraries only the other program or the sandbox use, absent from its install).
# Both packages are in the one wheel, so both images hold both; only the libraries differ.
_PROGRAMS = {
    "relay": ("mailrelay_relay",
              ("kopf", "kubernetes_asyncio", "aiosmtpd", "cryptography", "mailrelay_sandbox")),
    "operator": ("mailrelay_operator",
                 ("aiosmtpd", "aiosmtplib", "cryptography", "mailrelay_sandbox")),
}

_IMPORT_ALL = """
import importlib, importlib.util, pkgutil, sys
package, absent = sys.argv[1], sys.argv[2:]
root = importlib.import_module(package)
names = [info.name for info in pkgutil.walk_packages(root.__path__, package + ".")]
for name in names:
    importlib.import_module(name)
present = [name for name in absent if importlib.util.find_spec(name) is not None]
print(len(names), "modules;", "present:", present)
sys.exit(1 if present or not names else 0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("extra", sorted(_PROGRAMS))
def test_each_extra_runs_its_program_without_the_other_programs_libraries(
        wheel: pathlib.Path, tmp_path: pathlib.Path, extra: str) -> None:
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--target", str(target),
         f"{wheel}[{extra}]"],
        capture_output=True, text=True, timeout=900, check=False)
    if result.returncode != 0:
        missing(f"pip could not install {wheel.name}[{extra}]:\n{result.stderr[-2000:]}")
    package, absent = _PROGRAMS[extra]
    # -S: no site-packages (so not this virtualenv), only the standard library and the install.
    run = subprocess.run(
        [sys.executable, "-S", "-c", _IMPORT_ALL, package, *absent],
        capture_output=True, text=True, timeout=300, check=False,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
