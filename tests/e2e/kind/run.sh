#!/usr/bin/env bash
# End-to-end test of mailrelay-operator on a real kind cluster (see README.md in this folder).
#
# Builds both images, loads them into kind, installs the CRD and the chart, deploys an in-cluster SMTP
# sink, creates a MailRelay, then checks: owned objects and Ready; load (SMTP sessions held open) scales
# up; load gone drains one relay before the count is lowered; maintenance drains and resumes; delete goes
# through the finalizer and garbage collection. Exits non-zero on the first failed check.
#
# Environment: KIND_CLUSTER (default mailrelay-e2e; created when absent), KEEP_CLUSTER=1 keeps it,
# NAMESPACE (default mailrelay-e2e), TAG (default e2e), HELM (default .tools/bin/helm, else helm on PATH).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
CLUSTER="${KIND_CLUSTER:-mailrelay-e2e}"
NS="${NAMESPACE:-mailrelay-e2e}"
TAG="${TAG:-e2e}"
HELM="${HELM:-$ROOT/.tools/bin/helm}"
[ -x "$HELM" ] || HELM="$(command -v helm)"
NAME=e2e
CTX="kind-$CLUSTER"
K=(kubectl --context "$CTX")
CREATED=0

log() { printf '\n== %s: %s\n' "$(date -u +%H:%M:%S)" "$*"; }
fail() { printf '\nFAIL: %s\n' "$*" >&2; dump; exit 1; }
dump() {
  "${K[@]}" -n "$NS" get mailrelays,deploy,pods,events -o wide 2>/dev/null | tail -60 || true
  "${K[@]}" -n mailrelay-system logs deploy/mailrelay-operator --tail=80 2>/dev/null || true
}
cleanup() {
  if [ "${KEEP_CLUSTER:-0}" != 1 ] && [ "$CREATED" = 1 ]; then kind delete cluster --name "$CLUSTER"; fi
}
trap cleanup EXIT

# wait_for DESCRIPTION SECONDS COMMAND...: poll until COMMAND succeeds.
wait_for() {
  local what="$1" within="$2"; shift 2
  local deadline=$((SECONDS + within))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${within}s waiting for $what"
    sleep 2
  done
  log "ok: $what"
}
jp() { "${K[@]}" -n "$NS" get "$1" -o "jsonpath=$2"; }
replicas_is() { [ "$(jp "deploy/$NAME" '{.spec.replicas}')" = "$1" ]; }
replicas_at_least() { [ "$(jp "deploy/$NAME" '{.spec.replicas}')" -ge "$1" ]; }
condition_is() { [ "$(jp "mailrelay/$NAME" "{.status.conditions[?(@.type==\"$1\")].status}")" = "$2" ]; }
event_seen() { "${K[@]}" -n "$NS" get events --field-selector "reason=$1" -o name | grep -q .; }
all_pods_draining() {
  local total draining
  total=$("${K[@]}" -n "$NS" get pods -l "app.kubernetes.io/instance=$NAME" -o name | wc -l)
  draining=$("${K[@]}" -n "$NS" get pods -l "app.kubernetes.io/instance=$NAME" \
    -o jsonpath='{range .items[*]}{.metadata.annotations.mailrelay\.dev/drain-started}{"\n"}{end}' | grep -c . || true)
  [ "$total" -gt 0 ] && [ "$total" = "$draining" ]
}
no_pod_draining() {
  ! "${K[@]}" -n "$NS" get pods -l "app.kubernetes.io/instance=$NAME" \
    -o jsonpath='{range .items[*]}{.metadata.annotations.mailrelay\.dev/drain-started}{"\n"}{end}' | grep -q .
}
gone() { ! "${K[@]}" -n "$NS" get "$1" >/dev/null 2>&1; }

for tool in kind kubectl docker; do
  command -v "$tool" >/dev/null || { echo "missing tool: $tool" >&2; exit 2; }
done

log "cluster $CLUSTER"
if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 120s
  CREATED=1
fi

log "images"
docker build --target relay -t "mailrelay-relay:$TAG" "$ROOT"
docker build --target operator -t "mailrelay-operator:$TAG" "$ROOT"
docker build --target e2e-sink -t "mailrelay-e2e-sink:$TAG" "$ROOT"
kind load docker-image --name "$CLUSTER" "mailrelay-relay:$TAG" "mailrelay-operator:$TAG" \
  "mailrelay-e2e-sink:$TAG"

log "CRD and chart"
"${K[@]}" apply -f "$ROOT/crds/"
"${K[@]}" create namespace "$NS" --dry-run=client -o yaml | "${K[@]}" apply -f -
"$HELM" --kube-context "$CTX" upgrade --install mailrelay-operator "$ROOT/charts/mailrelay-operator" \
  --namespace mailrelay-system --create-namespace --wait --timeout 180s \
  --set image.tag="$TAG" --set relayImage.tag="$TAG" --set image.pullPolicy=Never \
  --set operator.logLevel=debug

log "upstream sink"
"${K[@]}" -n "$NS" apply -f - <<YAML
apiVersion: v1
kind: Pod
metadata: {name: sink, labels: {app: sink}}
spec:
  containers:
    - name: sink
      image: mailrelay-e2e-sink:$TAG
      imagePullPolicy: Never
      ports: [{containerPort: 2525}]
---
apiVersion: v1
kind: Service
metadata: {name: sink}
spec: {selector: {app: sink}, ports: [{port: 25, targetPort: 2525}]}
YAML
"${K[@]}" -n "$NS" wait --for=condition=Ready pod/sink --timeout=120s

log "MailRelay"
"${K[@]}" -n "$NS" apply -f - <<YAML
apiVersion: mailrelay.dev/v1alpha1
kind: MailRelay
metadata: {name: $NAME}
spec:
  upstream: {host: sink.$NS.svc.cluster.local, port: 25, tls: none}
  acceptFrom: ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
  replicas: {min: 1, max: 3}
  limits: {maxSessionsPerPod: 20}
  scaling:
    intervalSeconds: 2
    targets: {sessionsPerPod: 5, queuePerPod: 100}
    scaleDown: {stabilizationSeconds: 10, maxPodsPerStep: 1}
  drain: {timeoutSeconds: 60}
YAML
for obj in "deploy/$NAME" "service/$NAME" "secret/$NAME-admin" "pdb/$NAME" "networkpolicy/$NAME"; do
  wait_for "$obj exists" 60 "${K[@]}" -n "$NS" get "$obj"
done
wait_for "Ready condition" 180 condition_is Ready True
"${K[@]}" -n "$NS" get mailrelays

log "load: 14 SMTP sessions held open"
"${K[@]}" -n "$NS" run load --image="mailrelay-relay:$TAG" --image-pull-policy=Never --restart=Never \
  --command -- python -c "
import smtplib, time
sessions = []
for _ in range(14):
    s = smtplib.SMTP('$NAME.$NS.svc.cluster.local', 25, timeout=30); s.ehlo('load.e2e'); sessions.append(s)
time.sleep(600)
"
wait_for "scale-up to at least 2" 120 replicas_at_least 2
wait_for "ScaledUp event" 30 event_seen ScaledUp

log "load gone"
"${K[@]}" -n "$NS" delete pod load --now
wait_for "DrainStarted event" 120 event_seen DrainStarted
wait_for "scale-in to 1" 180 replicas_is 1
wait_for "DrainCompleted event" 30 event_seen DrainCompleted

log "maintenance"
"${K[@]}" -n "$NS" patch mailrelay "$NAME" --type merge -p '{"spec":{"maintenance":true}}'
wait_for "every relay draining" 60 all_pods_draining
wait_for "Draining condition" 60 condition_is Draining True
"${K[@]}" -n "$NS" patch mailrelay "$NAME" --type merge -p '{"spec":{"maintenance":false}}'
wait_for "relays resumed" 60 no_pod_draining
wait_for "Ready again" 120 condition_is Ready True

log "delete through the finalizer"
"${K[@]}" -n "$NS" delete mailrelay "$NAME" --wait=false
wait_for "MailRelay removed" 180 gone "mailrelay/$NAME"
wait_for "Deployment collected" 120 gone "deploy/$NAME"

log "PASS"
