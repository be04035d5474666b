"""The project's images, run with podman: what the container tests and the process kubelet need to start
a container of `mailrelay-relay` or `mailrelay-operator` on this machine.

What it is for: the image names (tagged with the project's version, as `make images` builds them),
whether an image is in local storage, and `run_args()`: the podman options that belong to this machine
rather than to the images (the OCI runtime, the ulimits), kept here in one place. Build-time settings
are scripts/build-images.sh's.

What it must not do: build images (scripts/build-images.sh does), pull from a registry, or decide
anything about the programs inside.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# This machine's podman: crun fails here ("cgroups in hybrid mode not supported"), so runc; and the
# default ulimits are too low for podman itself to start a container.
RUNTIME = "runc"
ULIMITS = ("nofile=20000:20000", "nproc=32768:32768")


def version() -> str:
    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def image(program: str) -> str:
    """`relay` or `operator`: the local image `make images` builds for it."""
    return f"localhost/mailrelay-{program}:{version()}"


def podman() -> str | None:
    return shutil.which("podman")


def has_image(name: str) -> bool:
    """True when `name` (as a pod spec or a user writes it: with or without `localhost/`) is in local
    storage."""
    tool = podman()
    if tool is None:
        return False
    return subprocess.run([tool, "image", "exists", name], capture_output=True).returncode == 0


def run_args() -> list[str]:
    """The machine's options for `podman run`."""
    args = ["--runtime", RUNTIME]
    for limit in ULIMITS:
        args += ["--ulimit", limit]
    return args


def run_command(image_name: str, options: Sequence[str] = (), args: Sequence[str] = ()) -> list[str]:
    """`podman run` of `image_name` with this machine's settings, then `options`, then the program's
    `args`."""
    tool = podman() or "podman"
    return [tool, "run", *run_args(), *options, image_name, *args]
