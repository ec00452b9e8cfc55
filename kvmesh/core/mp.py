"""mp mode: what kvmesh injects for LMCache's multiprocess generation (pure, no I/O).

docs/mp-mode.md decides the shape and says why each setting is there: vLLM talks through
LMCache's own `LMCacheMPConnector` to an `lmcache server` in a native sidecar of its own pod
(an initContainers[] entry with restartPolicy: Always); the servers of a peer group find each
other through the group's `lmcache coordinator` (Service `kvmesh-mp-<group>`, made by the
controller). This module is the one place for the server's flags, the sidecar's variables and
the connector's extra config; kvmesh.core.inject calls it from its PIPELINE.

Every flag and variable here is checked by the real consumers (lmcache 0.5.6's `lmcache server`
parser, LMCache's connector config, vLLM 0.33's parser and KVTransferConfig) in
tests/contract/test_mp_inject.py.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from kvmesh.core import contract, launch, names

CONNECTOR = "LMCacheMPConnector"
# LMCache's own connector, not vLLM's in-tree copy: vLLM 0.33 falls back to its builtin on any
# ImportError, and that one maps TP ranks wrongly for lmcache 0.5.6 and ignores
# mp_transfer_mode / isolated_ipc (docs/mp-mode.md §4.2).
CONNECTOR_MODULE = "lmcache.integration.vllm.lmcache_mp_connector"
MIN_VERSION = (0, 5, 0)  # first stable LMCache release with MP P2P
# Native sidecars: beta and on by default from Kubernetes 1.29 (KEP-753).
SIDECAR_MIN_KUBE = (1, 29)

ENGINE_DRIVEN, LMCACHE_DRIVEN = "engine_driven", "lmcache_driven"
HASH_ALGORITHM = "blake3"  # the coordinator's too (the controller starts it with the same)
HEARTBEAT_SECONDS = 1  # also the peer poll interval: a dead peer goes after ~4 polls
# A restarted server waits (_MAX_MISSES 3 + 2) polls after deleting its predecessor, so that
# survivors drop the old adapter before the new incarnation registers at the same address.
RESTART_GAP_SECONDS = 5 * HEARTBEAT_SECONDS
L1_ALIGN_BYTES = 65536  # NIXL registers one descriptor per alignment page of L1
# The server's memory besides L1 (python, torch, buffers): 1 GiB L1 measured ~1.8 GB RSS.
SERVER_OVERHEAD_GIB = 2
LOOPBACK = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"
SHM = "/dev/shm"

_EXTRA = "kv_connector_extra_config"
_K = "lmcache.mp."
# Extra-config keys kvmesh owns; a user value is replaced (or removed) with a warning.
_HOST, _PORT, _MODE, _HASH = _K + "host", _K + "port", _K + "mp_transfer_mode", _K + "hash_algorithm"
_ISOLATED = _K + "isolated_ipc"
_REMOVED = {
    _K + "server_urls": "it points vLLM at other servers than its own sidecar",
    _K + "autostart": "an autostarted server binds localhost only, so peers cannot reach it",
}
_ROLES = ("kv_both", "kv_producer", "kv_consumer")


# --- mode evidence -----------------------------------------------------------------------

def evidence(flags: launch.Flags) -> Optional[str]:
    """Why the vLLM command line shows LMCache's multiprocess generation, or None."""
    if (flags.offload_backend or "").strip().lower() == "lmcache":
        return "vLLM's --kv-offloading-backend lmcache (LMCacheMPConnector)"
    if flags.kv_transfer is not None:
        try:
            kv = json.loads(flags.kv_transfer)
        except ValueError:
            return None  # the connector step refuses it with the reason
        if isinstance(kv, dict) and kv.get("kv_connector") == CONNECTOR:
            return f"the pod's {contract.KV_TRANSFER_FLAG} names {CONNECTOR}"
    if flags.kv_transfer_dotted.get("kv_connector") == CONNECTOR:
        return f"the pod's {contract.KV_TRANSFER_FLAG}.kv_connector names {CONNECTOR}"
    return None


def conflict(mode: str, user_kv: Optional[dict], flags: launch.Flags) -> Optional[str]:
    """The problem when the pod's own config and the chosen mode are different generations."""
    kind = (user_kv or {}).get("kv_connector")
    if mode == names.MODE_MP:
        if kind is not None and kind != CONNECTOR:
            return (f"uses kv_connector {kind!r}, but the mode is mp, which runs LMCache "
                    f"through {CONNECTOR}; remove the connector or choose another "
                    f"{names.ANN_MODE}")
        return None
    if kind == CONNECTOR:
        return (f"uses {CONNECTOR} (LMCache's multiprocess generation), but the mode is "
                f"{mode}; set {names.ANN_MODE}: mp")
    if (flags.offload_backend or "").strip().lower() == "lmcache" and flags.offload_size:
        return (f"runs --kv-offloading-backend lmcache, with which vLLM replaces any connector "
                f"by {CONNECTOR}, but the mode is {mode}; set {names.ANN_MODE}: mp")
    return None


def unsupported(version: Optional[tuple[int, int, int]], native_sidecars: Optional[bool]
                ) -> Optional[tuple[str, str]]:
    """(reason suffix, message) when mp cannot run for this pod, else None."""
    if version is not None and version < MIN_VERSION:
        return ("lmcache-version", f"the image's LMCache {contract.fmt_version(version)} has "
                                   "no multiprocess P2P (first in 0.5.0); use controller or "
                                   "redis mode, or an image with LMCache >= 0.5.0")
    if native_sidecars is False:
        return ("native-sidecars", "mp mode runs the LMCache server as a native sidecar "
                                   "(restartPolicy: Always in initContainers), which this "
                                   "cluster lacks (Kubernetes >= "
                                   f"{'.'.join(map(str, SIDECAR_MIN_KUBE))} with the "
                                   "SidecarContainers gate); without it the pod would hang in "
                                   f"Init. Set {names.ANN_MODE}: controller")
    return None


def kube_has_native_sidecars(major: str, minor: str) -> Optional[bool]:
    """From the API server's /version fields ("1", "29+"); None when they do not parse."""
    try:
        v = (int(major), int(minor.rstrip("+")))
    except ValueError:
        return None
    return v >= SIDECAR_MIN_KUBE


# --- the plan ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """Everything decided for one pod's server and connector."""

    rpc_port: int
    p2p_port: int
    http_port: int
    coordinator_url: str
    l1_gb: float
    chunk_size: int
    hash_seed: int
    transfer_mode: str
    isolated_ipc: bool
    gpu_all: bool
    host_network: bool


def coordinator_url(group: str, namespace: str) -> str:
    return f"http://{names.lookup_host(names.MODE_MP, group, namespace)}:{names.COORDINATOR_PORT}"


def l1_gb(annotation: Optional[float], offload_size: Optional[str], policy_gb: float,
          warnings: list[str]) -> float:
    """The server's L1: the annotation, else vLLM's --kv-offloading-size (which vLLM itself
    leaves to the server), else the policy's cpuCacheGb."""
    if annotation is not None:
        return annotation
    if offload_size is not None:
        problem = contract.check_gb(offload_size)
        if problem is None:
            return float(offload_size)
        warnings.append(f"kvmesh cannot use --kv-offloading-size {offload_size!r} as the "
                        f"LMCache server's L1 size ({problem}); using {policy_gb} GB")
    return policy_gb


def transfer_mode(c: dict, gpu_all: bool, user_kv: Optional[dict]) -> str:
    """lmcache_driven (zero-copy CUDA IPC) only when the sidecar can see the vLLM
    container's GPU: a shared DRA claim, or the opt-in node-wide visibility; else the worker
    copies KV to the server through host memory (docs/mp-mode.md §3)."""
    extra = (user_kv or {}).get(_EXTRA)
    if isinstance(extra, dict) and extra.get(_MODE) == ENGINE_DRIVEN:
        return ENGINE_DRIVEN  # the user's choice works whatever the sidecar sees
    return LMCACHE_DRIVEN if gpu_all or _claims(c) else ENGINE_DRIVEN


def user_isolated_ipc(user_kv: Optional[dict]) -> bool:
    """The user's lmcache.mp.isolated_ipc: true is honoured (the server gets --isolated-ipc)."""
    extra = (user_kv or {}).get(_EXTRA)
    return isinstance(extra, dict) and extra.get(_ISOLATED) is True


def _claims(c: dict) -> list:
    claims = (c.get("resources") or {}).get("claims") if isinstance(c.get("resources"), dict) \
        else None
    return [x for x in claims if isinstance(x, dict) and isinstance(x.get("name"), str)] \
        if isinstance(claims, list) else []


# --- vLLM's --kv-transfer-config ---------------------------------------------------------

def kv_transfer(plan: Plan, user_kv: Optional[dict], warnings: list[str]) -> str:
    """kvmesh's --kv-transfer-config: the user's config with every key P2P depends on set by
    kvmesh (a different user value is replaced with a warning). Compact, keys in a fixed
    order, so re-injecting the output yields the same string."""
    user = dict(user_kv or {})
    out: dict[str, Any] = {"kv_connector": CONNECTOR, "kv_connector_module_path": CONNECTOR_MODULE}
    module = user.pop("kv_connector_module_path", CONNECTOR_MODULE)
    if module != CONNECTOR_MODULE:
        warnings.append(f"kvmesh replaced kv_connector_module_path {module!r} with "
                        f"{CONNECTOR_MODULE!r}: {docs_why('module')}")
    user.pop("kv_connector", None)
    role = user.pop("kv_role", "kv_both")
    out["kv_role"] = role if role in _ROLES else "kv_both"
    if out["kv_role"] != role:
        warnings.append(f"kvmesh replaced kv_role {role!r} with 'kv_both' (vLLM accepts "
                        f"{', '.join(_ROLES)})")
    for k in sorted(user):
        if k == _EXTRA:
            continue
        if "." in k:  # a dotted --kv-transfer-config.a.b option kvmesh cannot place
            warnings.append(f"kvmesh dropped --kv-transfer-config.{k}: in mp mode kvmesh "
                            f"writes one JSON {contract.KV_TRANSFER_FLAG}; put it there")
            continue
        out[k] = user[k]
    out[_EXTRA] = _extra(plan, user.get(_EXTRA), warnings)
    return json.dumps(out, separators=(",", ":"))


def _extra(plan: Plan, user: Any, warnings: list[str]) -> dict:
    mine: dict[str, Any] = {_HOST: f"tcp://{LOOPBACK}", _PORT: plan.rpc_port,
                            _HASH: HASH_ALGORITHM, _MODE: plan.transfer_mode}
    if plan.isolated_ipc:
        mine[_ISOLATED] = True
    if user is not None and not isinstance(user, dict):
        warnings.append(f"kvmesh replaced {_EXTRA} {str(user)[:80]!r}: it must be an object")
        user = {}
    rest: dict[str, Any] = {}
    for k, v in (user or {}).items():
        if k in _REMOVED or k.startswith(_K + "autostart."):
            why = _REMOVED.get(k, _REMOVED[_K + "autostart"])
            warnings.append(f"kvmesh removed {k}={v!r} from {_EXTRA}: {why}")
        elif k in mine:
            if v != mine[k] and not (k == _ISOLATED and v is False):
                warnings.append(f"kvmesh replaced {k}={v!r} with {mine[k]!r}: {docs_why(k)}")
        else:
            rest[k] = v
    return {**mine, **{k: rest[k] for k in sorted(rest)}}


@functools.lru_cache(maxsize=None)
def docs_why(key: str) -> str:
    return {
        "module": "LMCache's own connector maps tensor-parallel ranks right and honours "
                  "mp_transfer_mode; vLLM's builtin copy does neither (docs/mp-mode.md §4.2)",
        _HOST: "vLLM talks to its own server sidecar in the pod",
        _PORT: "vLLM talks to its own server sidecar in the pod",
        _HASH: "chunk keys must hash alike on every server of the group and the coordinator",
        _MODE: "the server sidecar cannot see the vLLM container's GPU, so only the "
               "engine-driven copy works (docs/mp-mode.md §3)",
        _ISOLATED: "it must match the server's --isolated-ipc",
    }[key]


# --- the server sidecar ------------------------------------------------------------------

def server_args(plan: Plan) -> list[str]:
    """`lmcache server`'s flags (the incarnation wrapper adds --instance-id)."""
    ip = f"$({names.MP_POD_IP_VAR})"  # expanded by the kubelet; P2P flags have no env fallback
    args = [
        f"--host={ALL_INTERFACES}",  # peers send lookups to <advertised ip>:--port
        f"--port={plan.rpc_port}",
        f"--p2p-advertise-url={ip}:{plan.p2p_port}",
        f"--p2p-listen-url={ALL_INTERFACES}:{plan.p2p_port}",
        f"--chunk-size={plan.chunk_size}",
        f"--hash-algorithm={HASH_ALGORITHM}",
        f"--l1-size-gb={contract.format_gb(plan.l1_gb)}",
        "--eviction-policy=LRU",  # required with --l1-size-gb
        f"--l1-align-bytes={L1_ALIGN_BYTES}",
        f"--supported-transfer-mode={plan.transfer_mode}",
        f"--http-host={LOOPBACK}",  # unauthenticated admin API: never beyond the pod
        f"--http-port={plan.http_port}",
    ]
    if plan.isolated_ipc:
        args.append("--isolated-ipc")
    return args


def wrapper_script() -> str:
    """The sidecar's command: counts its incarnations in the state volume, deletes its
    predecessor's coordinator registration and waits out the survivors' polls before a
    restarted server registers at the same address (docs/mp-mode.md §5)."""
    me = names.mp_instance_id("${" + names.MP_POD_UID_VAR + "}", "${n}")  # type: ignore[arg-type]
    prev = names.mp_instance_id("${" + names.MP_POD_UID_VAR + "}", "${p}")  # type: ignore[arg-type]
    delete = ("import sys, urllib.request as u; "
              "u.urlopen(u.Request(sys.argv[1], method='DELETE'), timeout=2)")
    return (
        f'f={names.MP_STATE_DIR}/incarnation; n=$(( $(cat "$f" 2>/dev/null || echo 0) + 1 )); '
        'echo "$n" > "$f"\n'
        'if [ "$n" -gt 1 ]; then p=$((n - 1))\n'
        f'  python3 -c "{delete}" "$LMCACHE_COORDINATOR_URL/instances/{prev}" || true\n'
        f'  sleep {RESTART_GAP_SECONDS}\n'
        'fi\n'
        f'exec lmcache server --instance-id "{me}" "$@"\n'
    )


def server_env(plan: Plan) -> list[dict]:
    ip = f"$({names.MP_POD_IP_VAR})"
    env = [
        {"name": names.MP_POD_IP_VAR,
         "valueFrom": {"fieldRef": {"fieldPath": contract.POD_IP_FIELD}}},
        {"name": names.MP_POD_UID_VAR,
         "valueFrom": {"fieldRef": {"fieldPath": contract.INSTANCE_FROM_UID}}},
        {"name": "LMCACHE_COORDINATOR_URL", "value": plan.coordinator_url},
        # Where peers send lookups; without it the server guesses from its routing table.
        {"name": "LMCACHE_COORDINATOR_ADVERTISE_IP", "value": ip},
        {"name": "LMCACHE_COORDINATOR_HEARTBEAT_INTERVAL", "value": str(HEARTBEAT_SECONDS)},
        {"name": "PYTHONHASHSEED", "value": str(plan.hash_seed)},
        {"name": "LMCACHE_TRACK_USAGE", "value": "false"},
    ]
    if plan.gpu_all:
        env += [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"},
                {"name": "NVIDIA_DRIVER_CAPABILITIES", "value": "compute,utility"}]
    return env


def startup_probe(plan: Plan) -> dict:
    """Gates vLLM's start (native sidecar order): /healthcheck answers 503 until the engine
    exists. An exec probe, because the HTTP API listens on loopback only."""
    check = (f"import urllib.request as u; "
             f"u.urlopen('http://{LOOPBACK}:{plan.http_port}/healthcheck', timeout=2)")
    return {"exec": {"command": ["python3", "-c", check]},
            "periodSeconds": 2, "timeoutSeconds": 3, "failureThreshold": 450}


def sidecar(plan: Plan, vllm: dict) -> dict:
    """The server's native sidecar, from the vLLM container it serves (same image, so the same
    LMCache as the connector; same security context and pull policy)."""
    mem = f"{math.ceil(plan.l1_gb) + SERVER_OVERHEAD_GIB}Gi"
    ports = []
    for name, number in ((names.PORT_NAME_MP_RPC, plan.rpc_port),
                         (names.PORT_NAME_MP_P2P, plan.p2p_port)):
        p = {"name": name, "containerPort": number, "protocol": "TCP"}
        if plan.host_network:
            p["hostPort"] = number
        ports.append(p)
    resources: dict[str, Any] = {"requests": {"cpu": "1", "memory": mem},
                                 "limits": {"memory": mem}}
    claims = _claims(vllm)
    if claims and plan.transfer_mode == LMCACHE_DRIVEN:
        resources["claims"] = [{"name": x["name"]} for x in claims]
    mounts = [{"name": names.MP_STATE_VOLUME, "mountPath": names.MP_STATE_DIR}]
    mounts += [{"name": m["name"], "mountPath": SHM} for m in vllm.get("volumeMounts") or ()
               if isinstance(m, dict) and m.get("mountPath") == SHM and "name" in m][:1]
    c: dict[str, Any] = {
        "name": names.MP_SIDECAR,
        "image": vllm.get("image", ""),
        "restartPolicy": "Always",
        "command": ["sh", "-c", wrapper_script(), names.MP_SIDECAR],
        "args": server_args(plan),
        "env": server_env(plan),
        "ports": ports,
        "startupProbe": startup_probe(plan),
        "resources": resources,
        "volumeMounts": mounts,
    }
    for k in ("imagePullPolicy", "securityContext"):
        if k in vllm:
            c[k] = vllm[k]
    return c


def place(spec: dict, server: dict) -> None:
    """Put the sidecar into spec.initContainers (in place of an earlier one of kvmesh's, else
    last: the user's init containers, e.g. a model download, run first) and its state
    volume into spec.volumes."""
    inits = list(spec.get("initContainers") or [])
    for i, c in enumerate(inits):
        if isinstance(c, dict) and c.get("name") == names.MP_SIDECAR:
            inits[i] = server
            break
    else:
        inits.append(server)
    spec["initContainers"] = inits
    vols = [v for v in spec.get("volumes") or []
            if not (isinstance(v, dict) and v.get("name") == names.MP_STATE_VOLUME)]
    vols.append({"name": names.MP_STATE_VOLUME, "emptyDir": {"sizeLimit": "1Mi"}})
    spec["volumes"] = vols


def remove_flag(words: list[str]) -> list[str]:
    """`words` without any --kv-transfer-config option (JSON or dotted, either spelling)."""
    out: list[str] = []
    skip = False
    for w in words:
        if skip:
            skip = False
            continue
        name, eq, _ = w.partition("=")
        norm = "--" + name[2:].replace("_", "-") if name.startswith("--") else name
        if norm == contract.KV_TRANSFER_FLAG or norm.startswith(contract.KV_TRANSFER_FLAG + "."):
            skip = not eq
            continue
        out.append(w)
    return out
