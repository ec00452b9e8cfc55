#!/usr/bin/env bash
# Builds kube-router (its network policy controller is all tests/node use) from the Go module
# pinned in cluster/kube-router/go.mod, for NetworkPolicy enforcement on the real node
# (kvmesh/local/node.py, RealNodeCluster(network_policy=True)). Test-only: kube-router v2.1.0
# is the version the module proxy here serves, and security advisories are reported against
# it; it runs only inside the node's network namespace, never on the machine's own.
# Needs the Debian package ipset at run time (`node-build.sh --packages` installs it).
#
# Output: ${KVMESH_CACHE:-$HOME/.cache/kvmesh}/kube-router-<v>-<src>/bin/kube-router
#   kube-router-build.sh          build if needed, print the bin dir (LAST stdout line)
#   kube-router-build.sh --check  print the bin dir if built, else exit 1 (never builds)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MOD="$HERE/kube-router"
VERSION="$(awk '$1 == "github.com/cloudnativelabs/kube-router/v2" {print $2; exit}' "$MOD/go.mod")"
[[ -n "$VERSION" ]] || { echo "kube-router-build.sh: cannot read the kube-router version from $MOD/go.mod" >&2; exit 1; }
SRC="$(cat "$MOD/go.mod" "$MOD/go.sum" | sha256sum | cut -c1-8)"
CACHE="${KVMESH_CACHE:-$HOME/.cache/kvmesh}"
KEY="kube-router-${VERSION}-${SRC}"
OUT="$CACHE/$KEY"
STAMP="$OUT/.complete"

if [[ -f "$STAMP" ]]; then echo "$OUT/bin"; exit 0; fi
if [[ "${1:-}" == "--check" ]]; then echo "kube-router-build.sh: not built: $OUT" >&2; exit 1; fi

log() { echo "[kube-router-build.sh $(date +%H:%M:%S)] $*" >&2; }
command -v go >/dev/null || { echo "kube-router-build.sh: 'go' not found on PATH (need Go >= 1.26)" >&2; exit 1; }
mkdir -p "$CACHE"
exec 9>"$CACHE/.$KEY.lock"
flock 9
if [[ -f "$STAMP" ]]; then echo "$OUT/bin"; exit 0; fi
rm -rf "$CACHE/.build-$KEY".*
TMP="$(mktemp -d "$CACHE/.build-$KEY.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/bin"

export GOTOOLCHAIN=local CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-p=2"
T0=$(date +%s)
log "kube-router $VERSION -> $OUT"
(cd "$MOD" && go mod download && go build -mod=readonly -trimpath -ldflags "-s -w" -o "$TMP/bin/kube-router" \
  github.com/cloudnativelabs/kube-router/v2/cmd/kube-router)
"$TMP/bin/kube-router" --version >&2 || true

echo "kube-router=$VERSION built=$(date -u +%Y-%m-%dT%H:%M:%SZ) seconds=$(( $(date +%s) - T0 ))" > "$TMP/.complete"
if ! mv -T "$TMP" "$OUT" 2>/dev/null; then
  if [[ -f "$STAMP" ]]; then rm -rf "$TMP"; else rm -rf "$OUT" && mv -T "$TMP" "$OUT"; fi
fi
trap - EXIT
log "done in $(( $(date +%s) - T0 ))s"
echo "$OUT/bin"
