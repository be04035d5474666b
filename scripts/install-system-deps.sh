#!/usr/bin/env bash
# Installs the Debian packages the tests, the demo and the benchmark drive as real peers:
# Postfix (smtp-source, smtp-sink, and Postfix itself for the benchmark and as a client MTA), swaks,
# Prometheus (promtool), tini (the images' PID 1, run by tests/chart/test_pid1.py), iproute2 (the
# sandbox routes its pod network to the loopback interface), msmtp (a queueless client), and buildah,
# podman, runc and debootstrap (scripts/build-images.sh builds the images; the container tests run them).
#
# The other client MTAs of tests/relay/test_mta_clients.py (Exim, OpenSMTPD, nullmailer, dma) each
# conflict with Postfix as a system install (they all provide mail-transport-agent), so they are not
# installed: their Debian packages are fetched with `apt-get download` and unpacked with `dpkg -x` into
# .tools/mta/<package>/, with the setuid and setgid bits dropped. Nothing of them is configured or
# started here: mailrelay_sandbox.mtas runs each one with a private configuration. Only the shared
# libraries they link against are installed as ordinary packages.
# Idempotent: it does nothing when every tool is already in place.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
mta_dir="$root/.tools/mta"
# package -> a file it holds that must be there (relative to its unpacked tree)
declare -A unpack=(
  [exim4-daemon-light]=usr/sbin/exim4
  [opensmtpd]=usr/sbin/smtpd
  [nullmailer]=usr/sbin/nullmailer-send
  [dma]=usr/sbin/dma
)

need=()
command -v smtp-sink >/dev/null 2>&1 || need+=(postfix)
command -v swaks >/dev/null 2>&1 || need+=(swaks)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v unzip >/dev/null 2>&1 || need+=(unzip)
command -v tini >/dev/null 2>&1 || need+=(tini)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v msmtp >/dev/null 2>&1 || need+=(msmtp)
# the images: built with buildah (scripts/build-images.sh, from a debootstrap base), run with podman and
# runc (crun fails on this kind of machine); fuse-overlayfs and slirp4netns are podman's storage and network
for tool in buildah podman runc debootstrap fuse-overlayfs slirp4netns; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
command -v unshare >/dev/null 2>&1 && command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
fetch=()
for pkg in "${!unpack[@]}"; do
  [ -e "$mta_dir/$pkg/${unpack[$pkg]}" ] || fetch+=("$pkg")
done
if [ ${#need[@]} -eq 0 ] && [ ${#fetch[@]} -eq 0 ]; then exit 0; fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need[*]}"
  echo 'postfix postfix/main_mailer_type select No configuration' | $SUDO debconf-set-selections
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ ${#fetch[@]} -gt 0 ]; then
  echo "unpacking Debian packages into .tools/mta: ${fetch[*]}"
  # their shared libraries, as ordinary packages (no MTA among them)
  libs=()
  for lib in $(apt-cache depends --no-recommends --no-suggests "${fetch[@]}" \
               | awk '$1 == "Depends:" && $2 ~ /^lib/ {print $2}' | sort -u); do
    dpkg-query -W -f='${Status}' "$lib" 2>/dev/null | grep -q "install ok installed" || libs+=("$lib")
  done
  if [ ${#libs[@]} -gt 0 ]; then
    echo "installing their libraries: ${libs[*]}"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${libs[@]}" >/dev/null
  fi
  download="$(mktemp -d)"
  trap 'rm -rf "$download"' EXIT
  chmod 755 "$download"
  id _apt >/dev/null 2>&1 && $SUDO chown _apt "$download"
  (cd "$download" && $SUDO apt-get download -qq "${fetch[@]}")
  mkdir -p "$mta_dir"
  for pkg in "${fetch[@]}"; do
    rm -rf "$mta_dir/$pkg"
    $SUDO dpkg -x "$download/${pkg}"_*.deb "$mta_dir/$pkg"
    $SUDO find "$mta_dir/$pkg" -type f -perm /6000 -exec chmod ug-s {} +
    [ -e "$mta_dir/$pkg/${unpack[$pkg]}" ] || { echo "unpacked $pkg holds no ${unpack[$pkg]}" >&2; exit 1; }
  done
fi
