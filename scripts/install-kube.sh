#!/usr/bin/env bash
# Builds the real Kubernetes control plane the tests, the demo and the benchmarks run against:
# kube-apiserver, kube-controller-manager, kube-scheduler and kubectl from the k8s.io/kubernetes Go
# module, and etcd from go.etcd.io/etcd, each at one pinned version, through the Go module proxy.
#
# The result goes to .tools/kube/<version>/bin; a second run finds it there and does nothing.
# Existing binaries are used instead when KUBE_BIN or KUBEBUILDER_ASSETS (envtest's convention)
# names a folder holding all five. .tools/bin/kube-bin then points at the folder in use, and
# .tools/bin/kubectl at its kubectl.
#
# A cold build takes about 10 minutes on 2 cores (kube-apiserver alone about 7, 2 GB of RAM) and fills
# about 6 GB of Go build cache; the script prints each step as it goes.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
KUBE_VERSION="${KUBE_VERSION:-v1.36.3}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
tools="$root/.tools"
dest="$tools/kube/$KUBE_VERSION"
bins=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)

say() { printf '[install-kube] %s\n' "$*" >&2; }

has_all() {
  local dir="$1" b
  for b in "${bins[@]}"; do [ -x "$dir/$b" ] || return 1; done
}

link() {
  mkdir -p "$tools/bin"
  ln -sfn "$1" "$tools/bin/kube-bin"
  ln -sf "$1/kubectl" "$tools/bin/kubectl"
}

for given in "${KUBE_BIN:-}" "${KUBEBUILDER_ASSETS:-}"; do
  if [ -n "$given" ]; then
    if has_all "$given"; then link "$given"; exit 0; fi
    say "$given does not hold all of: ${bins[*]}; building instead"
  fi
done

if has_all "$dest/bin"; then link "$dest/bin"; exit 0; fi

command -v go >/dev/null 2>&1 || { say "go is not on PATH: install Go 1.26 or later"; exit 1; }
say "building Kubernetes $KUBE_VERSION and etcd $ETCD_VERSION into $dest (once; about 10 minutes cold)"
mkdir -p "$dest/src/kube" "$dest/src/etcd" "$dest/bin.partial"
export GOFLAGS="${GOFLAGS:-} -mod=mod"
export CGO_ENABLED=0
# kube-openapi's jsonv2 switch produced a malformed /openapi/v2 when built with a newer Go's jsonv2;
# keep the encoding/json Kubernetes was written against. tests/e2e check /openapi/v2 parses.
export GOEXPERIMENT="${GOEXPERIMENT:-nojsonv2}"

# --- Kubernetes: a go.mod that pins every k8s.io staging module to the matching v0.x.y -----------
staging="v0.${KUBE_VERSION#v1.}"
kmod="$(cd "$dest/src/kube" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" \
  | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
{
  echo "module mailrelay.dev/kubebuild"
  echo
  sed -n 's/^go \(.*\)$/go \1/p; s/^godebug \(.*\)$/godebug \1/p' "$kmod"
  echo
  echo "require k8s.io/kubernetes $KUBE_VERSION"
  echo
  echo "replace ("
  sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/src/.*$#\t\1 => \1 '"$staging"'#p' "$kmod"
  echo ")"
} >"$dest/src/kube/go.mod"
cat >"$dest/src/kube/tools.go" <<'EOF'
//go:build tools

package kubebuild

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
EOF
say "resolving Kubernetes modules"
(cd "$dest/src/kube" && go mod tidy -e >/dev/null 2>&1 || true)
(cd "$dest/src/kube" && go mod download k8s.io/kubernetes)
major="${KUBE_VERSION#v}"; major="${major%%.*}"
minor="${KUBE_VERSION#v*.}"; minor="${minor%%.*}"
now="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$now -X $pkg.gitCommit=$KUBE_VERSION"
done
for cmd in kubectl kube-scheduler kube-controller-manager kube-apiserver; do
  start=$SECONDS
  say "go build $cmd ..."
  (cd "$dest/src/kube" && go build -trimpath -ldflags "$ldflags" -o "$dest/bin.partial/$cmd" \
    "k8s.io/kubernetes/cmd/$cmd")
  say "built $cmd in $((SECONDS - start)) s"
done

# --- etcd: its own module, so its dependencies never meet Kubernetes' ------------------------------
cat >"$dest/src/etcd/go.mod" <<EOF
module mailrelay.dev/etcdbuild

go 1.26.0

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
cat >"$dest/src/etcd/main.go" <<'EOF'
// etcd's own entry point, built from its module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
say "go build etcd ..."
start=$SECONDS
(cd "$dest/src/etcd" && go mod tidy >/dev/null && go build -trimpath -ldflags "-s -w" \
  -o "$dest/bin.partial/etcd" .)
say "built etcd in $((SECONDS - start)) s"

rm -rf "$dest/bin"
mv "$dest/bin.partial" "$dest/bin"
link "$dest/bin"
# First lines only, read whole: under pipefail, `| head -1` would kill the writer with SIGPIPE (exit 141).
for v in "$("$dest/bin/kubectl" version --client 2>/dev/null)" "$("$dest/bin/etcd" --version 2>/dev/null)"; do
  say "${v%%$'\n'*}"
done
say "done: $dest/bin"
