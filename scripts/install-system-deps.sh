#!/usr/bin/env bash
# Installs the Debian packages the tests, the demo and the benchmark drive as real peers:
# Postfix (smtp-source, smtp-sink, and Postfix itself for the benchmark), swaks, Prometheus (promtool),
# tini (the images' PID 1, run by tests/chart/test_pid1.py), and iproute2 (the sandbox routes its pod
# network to the loopback interface).
# Idempotent: it does nothing when every tool is already on PATH.
set -euo pipefail
need=()
command -v smtp-sink >/dev/null 2>&1 || need+=(postfix)
command -v swaks >/dev/null 2>&1 || need+=(swaks)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v unzip >/dev/null 2>&1 || need+=(unzip)
command -v tini >/dev/null 2>&1 || need+=(tini)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages: ${need[*]}"
$SUDO apt-get update -qq
echo 'postfix postfix/main_mailer_type select No configuration' | $SUDO debconf-set-selections
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
