#!/usr/bin/env bash
# Build a local Kubernetes control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, etcd, kwok) from published Go modules with the plain
# `go` toolchain. No Docker, no binary downloads.
#
# Output: ${KVMESH_CACHE:-$HOME/.cache/kvmesh}/k8s-<v>-etcd-<v>-kwok-<v>/bin/
#   plus bin/kwok-stages.yaml (KWOK's default "fast" stages, read from the
#   module cache at build time).
# Idempotent: when the stamp file exists nothing is built. A build happens in a
# temp dir that is renamed into place only when complete.
#   build.sh           build if needed, print the bin dir
#   build.sh --check   print the bin dir if built, else exit 1 (never builds)
# The bin dir path is the LAST line printed on stdout; progress goes to stderr.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KWOK_VERSION="v0.8.0"

# Versions come from go.mod (single source of truth for k8s and etcd).
modver() { awk -v m="$1" '{for (i = 1; i < NF; i++) if ($i == m && $(i+1) ~ /^v[0-9]/ && $(i+2) != "=>") {print $(i+1); exit}}' "$HERE/go.mod"; }
K8S_VERSION="$(modver k8s.io/kubernetes)"
ETCD_VERSION="$(modver go.etcd.io/etcd/server/v3)"
[[ -n "$K8S_VERSION" && -n "$ETCD_VERSION" ]] || { echo "build.sh: cannot read versions from $HERE/go.mod" >&2; exit 1; }

CACHE="${KVMESH_CACHE:-$HOME/.cache/kvmesh}"
KEY="k8s-${K8S_VERSION}-etcd-${ETCD_VERSION}-kwok-${KWOK_VERSION}"
OUT="$CACHE/$KEY"
STAMP="$OUT/.complete"

if [[ -f "$STAMP" ]]; then
  echo "$OUT/bin"
  exit 0
fi
if [[ "${1:-}" == "--check" ]]; then
  # Report only: exit 1 when the binaries are not built yet.
  echo "build.sh: not built: $OUT" >&2
  exit 1
fi

log() { echo "[build.sh $(date +%H:%M:%S)] $*" >&2; }
command -v go >/dev/null || { echo "build.sh: 'go' not found on PATH (need Go >= 1.26)" >&2; exit 1; }
mkdir -p "$CACHE"

# Serialise concurrent builders of the same key.
if command -v flock >/dev/null; then
  exec 9>"$CACHE/.$KEY.lock"
  flock 9
  if [[ -f "$STAMP" ]]; then echo "$OUT/bin"; exit 0; fi
  rm -rf "$CACHE/.build-$KEY".*  # left by an interrupted (killed) build; we hold the lock
fi

TMP="$(mktemp -d "$CACHE/.build-$KEY.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/bin"

export GOTOOLCHAIN=local CGO_ENABLED=0
# 2 cores: at most 2 compile/link jobs. Keep any GOFLAGS the caller set.
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-p=2"
T0=$(date +%s)

log "k8s $K8S_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION -> $OUT"
log "downloading modules"
(cd "$HERE" && go mod download)

MINOR="${K8S_VERSION#v1.}"; MINOR="${MINOR%%.*}"
K8S_LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  K8S_LDFLAGS+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$MINOR -X $pkg.gitTreeState=clean"
done

log "building kube-apiserver kube-controller-manager kube-scheduler kubectl"
(cd "$HERE" && go build -mod=readonly -trimpath -ldflags "$K8S_LDFLAGS" -o "$TMP/bin/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubectl)

log "building etcd"
(cd "$HERE" && go build -mod=readonly -trimpath -ldflags "-s -w" -o "$TMP/bin/etcd" go.etcd.io/etcd/server/v3)

log "building kwok"
(cd "$TMP" && GOBIN="$TMP/bin" go install -trimpath \
  -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=$K8S_VERSION" \
  "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION")

# KWOK has no built-in stages: join its default "fast" set (what kwokctl uses)
# from the module cache.
KWOK_DIR="$(cd "$TMP" && go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')"
[[ -d "$KWOK_DIR" ]] || { echo "build.sh: kwok module dir not found" >&2; exit 1; }
{
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    echo "---"
    grep -v '^---[[:space:]]*$' "$KWOK_DIR/kustomize/stage/$f"
  done
} > "$TMP/bin/kwok-stages.yaml"

# Smoke-check every binary (output to stderr; never fatal to the pipe).
for b in kube-apiserver kube-controller-manager kube-scheduler kwok; do "$TMP/bin/$b" --version >&2; done
"$TMP/bin/kubectl" version --client >&2
"$TMP/bin/etcd" --version 2>&1 | sed -n 1p >&2
(cd "$TMP/bin" && ls -l) >&2

echo "k8s=$K8S_VERSION etcd=$ETCD_VERSION kwok=$KWOK_VERSION built=$(date -u +%Y-%m-%dT%H:%M:%SZ) seconds=$(( $(date +%s) - T0 ))" > "$TMP/.complete"
if ! mv -T "$TMP" "$OUT" 2>/dev/null; then
  # Someone else finished first (or a stale incomplete dir is in the way).
  if [[ -f "$STAMP" ]]; then
    rm -rf "$TMP"
  else
    rm -rf "$OUT" && mv -T "$TMP" "$OUT"
  fi
fi
trap - EXIT
log "done in $(( $(date +%s) - T0 ))s"
echo "$OUT/bin"
