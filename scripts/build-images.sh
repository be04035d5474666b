#!/usr/bin/env bash
# Builds the two images from the one Dockerfile: mailrelay-relay:<version> and mailrelay-operator:<version>.
#
#   bash scripts/build-images.sh            (make images)
#
# The engine: `docker` when a Docker engine answers (`docker info`), else buildah (Debian's package;
# installed by scripts/install-system-deps.sh). The base: $PYTHON_IMAGE when given; else the
# official python:3.11-slim-bookworm when it is already in local storage; else a local stand-in built
# once with `debootstrap --variant=minbase` from the machine's own Debian mirror (python3, venv, pip,
# ca-certificates), cached as localhost/mailrelay-python-base:bookworm: nothing is pulled from an image
# registry, so the build works offline and air-gapped as long as Debian's packages and the Python
# package index (or their mirrors, as configured on the machine) answer.
#
# Every setting that belongs to this machine rather than to the images lives in this one block: the
# Dockerfile knows nothing of it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

# ---- machine-specific settings ------------------------------------------------------------------
# crun fails here ("cgroups in hybrid mode not supported"): builds use chroot isolation, runs use runc.
BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"
# pip inside a build needs the host's CA bundle and pip configuration (a private index or proxy).
BUILD_MOUNTS=()
for f in /etc/ssl/certs/ca-certificates.crt /etc/pip.conf; do
  [ -r "$f" ] && BUILD_MOUNTS+=(-v "$f:$f:ro")
done
# ------------------------------------------------------------------------------------------------------

version="$(python3 -c 'import tomllib,sys; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')"
base_tag="localhost/mailrelay-python-base:bookworm"
official="docker.io/library/python:3.11-slim-bookworm"

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  engine=docker
elif command -v buildah >/dev/null 2>&1; then
  engine=buildah
else
  echo "build-images: neither a running Docker engine nor buildah (run: make tools)" >&2
  exit 1
fi

have_image() {
  if [ "$engine" = docker ]; then docker image inspect "$1" >/dev/null 2>&1
  else buildah inspect --type image "$1" >/dev/null 2>&1; fi
}

debian_mirror() {
  # The machine's own Debian mirror for its release (deb822 or one-line sources); DEBIAN_MIRROR wins.
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local codename; codename="$(. /etc/os-release && echo "$VERSION_CODENAME")"
  local found
  found="$(awk -v c="$codename" '
      /^URIs:/ {uris=$2} /^Suites:/ {s=$0}
      /^$/ { if (s ~ (" " c "( |$)") && uris ~ /\/debian\/?$/) {print uris; exit} uris=""; s="" }
      END { if (s ~ (" " c "( |$)") && uris ~ /\/debian\/?$/) print uris }' \
      /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)"
  if [ -z "$found" ]; then
    found="$(awk -v c="$codename" '$1=="deb" && $3==c && $2 ~ /\/debian\/?$/ {print $2; exit}' \
             /etc/apt/sources.list 2>/dev/null || true)"
  fi
  [ -n "$found" ] || { echo "build-images: no Debian mirror found in the apt sources; set DEBIAN_MIRROR" >&2; exit 1; }
  echo "$found"
}

build_base() {
  local dir; dir="$(mktemp -d)"
  trap 'rm -rf "$dir"' RETURN
  local mirror; mirror="$(debian_mirror)"
  echo "build-images: building the stand-in base $base_tag with debootstrap"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    bookworm "$dir/rootfs" "$mirror" >"$dir/debootstrap.log" 2>&1 \
    || { tail -20 "$dir/debootstrap.log" >&2; exit 1; }
  rm -rf "$dir/rootfs/var/cache/apt/archives/"*.deb "$dir/rootfs/var/lib/apt/lists/"*
  if [ "$engine" = docker ]; then
    tar -C "$dir/rootfs" -c . | docker import - "$base_tag" >/dev/null
  else
    local ctr; ctr="$(buildah from scratch)"
    local mnt; mnt="$(buildah mount "$ctr")"
    cp -a "$dir/rootfs/." "$mnt/"
    buildah umount "$ctr" >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
    buildah commit --quiet "$ctr" "$base_tag" >/dev/null
    buildah rm "$ctr" >/dev/null
  fi
}

if [ -n "${PYTHON_IMAGE:-}" ]; then
  base="$PYTHON_IMAGE"
elif have_image "$official"; then
  base="$official"
else
  have_image "$base_tag" || build_base
  base="$base_tag"
fi

for target in relay operator; do
  tag="mailrelay-$target:$version"
  echo "build-images: $tag (engine $engine, base $base)"
  if [ "$engine" = docker ]; then
    docker build --target "$target" --build-arg "PYTHON_IMAGE=$base" -t "$tag" .
  else
    buildah bud --quiet --isolation "$BUILDAH_ISOLATION" --layers "${BUILD_MOUNTS[@]}" \
      --target "$target" --build-arg "PYTHON_IMAGE=$base" -t "localhost/$tag" . >/dev/null
  fi
done
echo "build-images: done: mailrelay-relay:$version, mailrelay-operator:$version"
