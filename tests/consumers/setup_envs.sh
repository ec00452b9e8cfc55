#!/usr/bin/env bash
# Create the cached virtualenvs that host the REAL consumers of kvmesh's output
# (LMCache's config loader of each generation, vLLM's CLI parser), used by the
# contract tests through tests/consumers/consumers.py.
#
#   tests/consumers/setup_envs.sh            # all envs (incl. lmcache-0.3.6-engine, tests/p2p)
#   tests/consumers/setup_envs.sh lmcache-0.3.6 lmcache-0.5.6   # a subset
#
# Envs live in ${KVMESH_CACHE:-$HOME/.cache/kvmesh}/envs/<name>.  Each one carries
# a stamp file holding its exact spec; a matching stamp means "done" (no-op in
# well under a second), anything else means "rebuild".  A rebuild happens in a
# temporary directory that is moved into place only when complete, so an
# interrupted build never leaves a half env behind.
# Needs only python3 (with venv) and access to PyPI.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
CACHE="${KVMESH_CACHE:-$HOME/.cache/kvmesh}"
ENVS="$CACHE/envs"
VLLM_VERSION="${KVMESH_VLLM_VERSION:-0.33.0}"
# Bump when the way an env is built changes without its pip spec changing.
SPEC_REV=1

mkdir -p "$ENVS"
PY_ID="$("$PYTHON" -c 'import sys; print(sys.implementation.name, ".".join(map(str, sys.version_info[:3])), sys.executable)')"

# name -> pip install steps, one step per line (each line = args to `pip install`)
spec_for() {
  case "$1" in
    lmcache-0.3.6|lmcache-0.5.6)
      # Only the config loader is needed: PyYAML (lmcache/v1/config*.py) and
      # requests (0.5.6 config_base) with their deps, then lmcache itself with
      # --no-deps (its declared deps pull CUDA torch etc.).  Installing lmcache
      # last keeps pip from printing its unmet-dependency report.  0.3.6 also
      # needs `torch.dtype`/`torch.Tensor` for annotations: provided at probe
      # time by tests/consumers/torch_standin (PYTHONPATH), not installed here.
      printf '%s\n' "PyYAML requests" "--no-deps lmcache==${1#lmcache-}" ;;
    lmcache-0.3.6-engine)
      # The REAL LMCache 0.3.6 engine for the P2P data-path tests (tests/p2p/).  torch
      # 2.8.0 from PyPI is the CUDA build: lmcache's c_ops links libcudart/libtorch_cuda,
      # so a CPU torch cannot even import lmcache.v1.cache_engine; no GPU is used.
      # lmcache goes in with --no-deps (its deps would pull the newest torch); the explicit
      # list is what the 0.3.6 P2P path imports, versions as tested, incl. the two it uses
      # without declaring them (py-cpuinfo, requests).  Research note:
      # shared/docs/research/lmcache-p2p-dataflow-on-cpu.md.
      printf '%s\n' "torch==2.8.0" \
        "redis==8.1.0 PyYAML numpy==2.2.6 msgspec==0.22.0 prometheus_client>=0.18.0 psutil pyzmq==27.3.0 sortedcontainers aiofile aiofiles aiohttp nvtx==0.2.17 safetensors transformers==5.24.0 py-cpuinfo==9.0.0 requests==2.34.2" \
        "--no-deps lmcache==0.3.6" ;;
    nixl-1.5.1-cu13)
      # NIXL for the controller-mode P2P tests (tests/p2p/test_p2p_controller_mode.py): an
      # overlay put on PYTHONPATH of the vllm-0.33.0 venv's python, not a runtime of its own.
      # `nixl` is the py3-none-any meta package (it provides `nixl._api` and picks the backend
      # by torch's CUDA major); `nixl-cu13` matches the cu13 torch of vllm 0.33 and bundles
      # UCX. --no-deps: torch and numpy come from the vllm venv (nixl's meta deps would also
      # pull nixl-cu12 and a second torch).
      printf '%s\n' "--no-deps nixl==1.5.1 nixl-cu13==1.5.1" ;;
    vllm-*)
      # Plain install (pulls CUDA torch, ~10 GB) together with lmcache 0.5.6 and
      # its deps, so lmcache_controller runs here too.  One resolver run: a
      # second `pip install lmcache` would downgrade opentelemetry and leave
      # orphans that make `pip check` complain.
      printf '%s\n' "vllm==${1#vllm-} lmcache==0.5.6" ;;
    *) echo "unknown env: $1" >&2; return 1 ;;
  esac
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

build_env() {
  local name="$1" dest="$ENVS/$1" spec stamp t0 tmp
  spec="$(printf 'rev=%s\npython=%s\n%s\n' "$SPEC_REV" "$PY_ID" "$(spec_for "$name")")"
  stamp="$dest/.kvmesh-spec"
  t0="$(now)"
  if [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$spec" ]]; then
    echo "[setup_envs] $name: up to date ($(elapsed "$t0")s) $dest"
    return 0
  fi
  echo "[setup_envs] $name: building in $dest"
  # leftovers of an interrupted earlier build (we hold this env's lock)
  rm -rf "$ENVS/.build-$name."* "$dest.old"
  tmp="$(mktemp -d "$ENVS/.build-$name.XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  "$PYTHON" -m venv "$tmp"
  local step ts
  while IFS= read -r step; do
    [[ -n "$step" ]] || continue
    ts="$(now)"
    # shellcheck disable=SC2086
    "$tmp/bin/python" -m pip install --disable-pip-version-check -q $step
    echo "[setup_envs] $name: pip install $step ($(elapsed "$ts")s)"
  done <<<"$(spec_for "$name")"
  # Console scripts / activate scripts embed the build path: point them at
  # the final location before moving the env there.
  grep -rlI --null -F "$tmp" "$tmp/bin" | xargs -0 -r sed -i "s#$tmp#$dest#g"
  printf '%s\n' "$spec" >"$tmp/.kvmesh-spec"
  rm -rf "$dest.old"
  [[ -e "$dest" ]] && mv "$dest" "$dest.old"
  mv "$tmp" "$dest"
  rm -rf "$dest.old"
  trap - EXIT
  echo "[setup_envs] $name: done in $(elapsed "$t0")s, size $(du -sh "$dest" | cut -f1)"
}

if [[ $# -eq 0 ]]; then
  set -- lmcache-0.3.6 lmcache-0.5.6 lmcache-0.3.6-engine "vllm-$VLLM_VERSION" nixl-1.5.1-cu13
fi
T0="$(now)"
for name in "$@"; do
  if command -v flock >/dev/null; then
    # serialise concurrent builders of the same env (e.g. parallel CI jobs)
    exec {lock}>"$ENVS/.lock-$name"
    flock "$lock"
    build_env "$name"
    exec {lock}>&-
  else
    build_env "$name"
  fi
done
echo "[setup_envs] all done in $(elapsed "$T0")s (envs under $ENVS)"
