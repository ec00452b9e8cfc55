#!/usr/bin/env bash
# Build the pieces of a REAL kubelet node for the dev cluster from Go modules:
# kubelet and kube-proxy (same module and version as the control plane, see
# go.mod's tool block), CoreDNS with only a cluster DNS's plugins (coredns/main.go,
# version pinned in coredns/go.mod), and a static `pause` binary for the sandbox image.
# containerd, runc, the CNI plugins, iptables and conntrack come from Debian
# packages (`node-build.sh --packages` installs them when missing).
#
# Output: ${KVMESH_CACHE:-$HOME/.cache/kvmesh}/node-k8s-<v>-coredns-<v>/bin/
#   {kubelet,kube-proxy,coredns,pause}
# Idempotent like build.sh: a stamp file marks a complete build, builds happen in
# a temp dir renamed into place, concurrent builders serialise on a lock.
#   node-build.sh             build if needed, print the bin dir (LAST stdout line)
#   node-build.sh --check     print the bin dir if built, else exit 1 (never builds)
#   node-build.sh --packages  install the Debian packages the node needs, if missing
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEB_PACKAGES=(containerd runc containernetworking-plugins iptables conntrack ipset)

if [[ "${1:-}" == "--packages" ]]; then
  missing=()
  for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "node-build.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
  fi
  exit 0
fi

modver() { awk -v m="$1" '{for (i = 1; i < NF; i++) if ($i == m && $(i+1) ~ /^v[0-9]/ && $(i+2) != "=>") {print $(i+1); exit}}' "${2:-$HERE/go.mod}"; }
K8S_VERSION="$(modver k8s.io/kubernetes)"
[[ -n "$K8S_VERSION" ]] || { echo "node-build.sh: cannot read the k8s version from $HERE/go.mod" >&2; exit 1; }
grep -q 'k8s.io/kubernetes/cmd/kubelet' "$HERE/go.mod" || { echo "node-build.sh: go.mod lacks kubelet in its tool block" >&2; exit 1; }

COREDNS_VERSION="$(modver github.com/coredns/coredns "$HERE/coredns/go.mod")"
[[ -n "$COREDNS_VERSION" ]] || { echo "node-build.sh: cannot read the coredns version from $HERE/coredns/go.mod" >&2; exit 1; }
# The plugin set is part of the key: a changed coredns/main.go or go.sum is a new build.
COREDNS_SRC="$(cat "$HERE/coredns/main.go" "$HERE/coredns/go.mod" "$HERE/coredns/go.sum" | sha256sum | cut -c1-8)"

CACHE="${KVMESH_CACHE:-$HOME/.cache/kvmesh}"
KEY="node-k8s-${K8S_VERSION}-coredns-${COREDNS_VERSION}-${COREDNS_SRC}"
OUT="$CACHE/$KEY"
STAMP="$OUT/.complete"

if [[ -f "$STAMP" ]]; then echo "$OUT/bin"; exit 0; fi
if [[ "${1:-}" == "--check" ]]; then echo "node-build.sh: not built: $OUT" >&2; exit 1; fi

log() { echo "[node-build.sh $(date +%H:%M:%S)] $*" >&2; }
command -v go >/dev/null || { echo "node-build.sh: 'go' not found on PATH (need Go >= 1.26)" >&2; exit 1; }
mkdir -p "$CACHE"
if command -v flock >/dev/null; then
  exec 9>"$CACHE/.$KEY.lock"
  flock 9
  if [[ -f "$STAMP" ]]; then echo "$OUT/bin"; exit 0; fi
  rm -rf "$CACHE/.build-$KEY".*
fi
TMP="$(mktemp -d "$CACHE/.build-$KEY.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/bin"

export GOTOOLCHAIN=local CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-p=2"
T0=$(date +%s)
log "kubelet/kube-proxy $K8S_VERSION, coredns $COREDNS_VERSION -> $OUT"

MINOR="${K8S_VERSION#v1.}"; MINOR="${MINOR%%.*}"
K8S_LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  K8S_LDFLAGS+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$MINOR -X $pkg.gitTreeState=clean"
done
log "building kubelet kube-proxy"
(cd "$HERE" && go mod download && go build -mod=readonly -trimpath -ldflags "$K8S_LDFLAGS" -o "$TMP/bin/" \
  k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy)

log "building coredns (cluster-DNS plugins only)"
(cd "$HERE/coredns" && go mod download && go build -mod=readonly -trimpath -ldflags "-s -w" -o "$TMP/bin/coredns" .)

# The pod sandbox's process: waits for signals, reaps children (after
# kubernetes/build/pause/linux/pause.c), static, no C compiler needed.
log "building pause"
mkdir -p "$TMP/pause"
cat > "$TMP/pause/main.go" <<'EOF'
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if os.Getpid() != 1 {
		os.Stderr.WriteString("Warning: pause should be the first process\n")
	}
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sigs {
		if s == syscall.SIGCHLD {
			for {
				var ws syscall.WaitStatus
				if pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); pid <= 0 || err != nil {
					break
				}
			}
			continue
		}
		os.Stderr.WriteString("Shutting down, got signal\n")
		os.Exit(0)
	}
}
EOF
(cd "$TMP/pause" && printf 'module kvmesh.invalid/pause\n\ngo 1.26\n' > go.mod && go build -trimpath -ldflags "-s -w" -o "$TMP/bin/pause" .)
rm -rf "$TMP/pause"

"$TMP/bin/kubelet" --version >&2
"$TMP/bin/kube-proxy" --version >&2
"$TMP/bin/coredns" -version 2>&1 | sed -n 1p >&2
(cd "$TMP/bin" && ls -l) >&2

echo "k8s=$K8S_VERSION coredns=$COREDNS_VERSION built=$(date -u +%Y-%m-%dT%H:%M:%SZ) seconds=$(( $(date +%s) - T0 ))" > "$TMP/.complete"
if ! mv -T "$TMP" "$OUT" 2>/dev/null; then
  if [[ -f "$STAMP" ]]; then rm -rf "$TMP"; else rm -rf "$OUT" && mv -T "$TMP" "$OUT"; fi
fi
trap - EXIT
log "done in $(( $(date +%s) - T0 ))s"
echo "$OUT/bin"
