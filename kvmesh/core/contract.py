"""The LMCache / vLLM configuration contract per mode (pure, no I/O).

One place for every variable name, value format and rule kvmesh relies on. Where each fact
comes from: docs/lmcache-contract.md (a section per mode, and the upstream limits kvmesh works
around). Two generations:

* redis mode: LMCache experimental builds and 0.3.0-0.3.6 (Redis lookup + per-pod TCP server)
* controller mode: LMCache 0.3.7 -> 0.5.x (lmcache_controller + NIXL)
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

from kvmesh.core import names

# --- vLLM side ---------------------------------------------------------------------------

KV_TRANSFER_FLAG = "--kv-transfer-config"
CONNECTOR_V1 = "LMCacheConnectorV1"
# V0 connector: vLLM 0.8.0-0.10.0 with LMCache < 0.3.0 only (imports lmcache.experimental).
CONNECTOR_V0 = "LMCacheConnector"
LMCACHE_CONNECTORS = (CONNECTOR_V1, CONNECTOR_V0)
VLLM_DEFAULT_PORT = 8000


@functools.lru_cache(maxsize=None)
def kv_transfer_json(connector: str) -> str:
    # Compact, key order fixed: the value must be byte-stable for idempotent re-injection.
    return json.dumps({"kv_connector": connector, "kv_role": "kv_both"}, separators=(",", ":"))


# --- LMCache version windows -------------------------------------------------------------

REDIS_MAX_VERSION = (0, 3, 6)  # legacy P2P removed in 0.3.7
V0_CONNECTOR_BELOW = (0, 3, 0)  # lmcache.experimental gone from 0.3.0

_VERSION_IN_TAG = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")


def lmcache_version_from_image(image: str) -> Optional[tuple[int, int, int]]:
    """LMCache version from an image reference, or None when the image does not say.

    Only images whose repository names LMCache carry an LMCache version in their tag
    (`lmcache/vllm-openai:v0.3.6`); a `vllm/vllm-openai:v0.10.0` tag is a vLLM version.
    Cached (a pure function of the string; a cluster runs few images), unless very long.
    """
    if len(image) > 512:
        return _version_in_image.__wrapped__(image)
    return _version_in_image(image)


@functools.lru_cache(maxsize=256)
def _version_in_image(image: str) -> Optional[tuple[int, int, int]]:
    ref = image.split("@", 1)[0]
    repo, _, tag = ref.rpartition(":")
    if not repo or "/" in tag:  # no tag, or the ':' was a registry port
        return None
    if "lmcache" not in repo.rsplit("/", 1)[-1].lower() and "lmcache" not in repo.lower():
        return None
    m = _VERSION_IN_TAG.match(tag)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def mode_for_version(version: tuple[int, int, int]) -> str:
    # LMCache >= 0.5.0 images also ship the multiprocess generation (mp mode), but stay on
    # controller mode unless the pod or a policy asks for mp: mp needs native sidecars
    # (Kubernetes >= 1.29), and its GPU path (engine-driven copy without a shared claim) is
    # unmeasured on GPUs (docs/mp-mode.md, "Default").
    return names.MODE_REDIS if version <= REDIS_MAX_VERSION else names.MODE_CONTROLLER


def fmt_version(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))


# --- value formats -----------------------------------------------------------------------
# Each checker returns None when LMCache would parse the value as intended, else the problem.

TRUE = "True"  # exact case: pre-2025-04-28 builds compare LMCACHE_USE_EXPERIMENTAL == "True"


def is_true(v: str) -> bool:
    return v.strip().lower() in ("true", "1")


_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(Ki|Mi|Gi|Ti|K|M|G|T|k)?i?[Bb]?\s*$")
_UNIT_GB = {
    None: 1.0, "K": 1e-6, "k": 1e-6, "M": 1e-3, "G": 1.0, "T": 1e3,
    "Ki": 2**10 / 1e9, "Mi": 2**20 / 1e9, "Gi": 2**30 / 1e9, "Ti": 2**40 / 1e9,
}


def check_gb(v: str) -> Optional[str]:
    try:
        f = float(v)
    except ValueError:
        return "LMCache parses this with float() as a number of GB (e.g. \"20\"), not a quantity"
    if not f > 0:
        return "P2P needs a CPU cache larger than 0 GB (LMCache asserts a CPU backend)"
    if not math.isfinite(f):
        return "a finite number of GB (LMCache would try to reserve an unbounded cache)"
    return None


def quantity_to_gb(v: str) -> Optional[float]:
    """'20Gi' -> 21.47; a Kubernetes-style quantity a user meant as the cache size."""
    m = _QUANTITY.match(v)
    if not m:
        return None
    gb = float(m.group(1)) * _UNIT_GB[m.group(2)]
    return round(gb, 3) if gb > 0 else None


def format_gb(gb: float) -> str:
    return str(int(gb)) if float(gb).is_integer() else repr(float(gb))


def check_positive_int(v: str) -> Optional[str]:
    try:
        return None if int(v.strip()) > 0 else "must be a positive integer"
    except ValueError:
        return "LMCache parses this with int()"


def check_hash_seed(v: str) -> Optional[str]:
    try:
        n = int(v.strip())
    except ValueError:
        return "PYTHONHASHSEED must be one fixed integer shared by the group (\"random\" breaks chunk keys)"
    return None if 0 <= n <= 4294967295 else "PYTHONHASHSEED must be in 0..4294967295"


def int_list(values: list[int]) -> str:
    # LMCache's _to_int_list accepts only comma lists; "[8200]" or "8200 8201" become None.
    return ",".join(str(p) for p in values)


# --- the env plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvSpec:
    """One variable kvmesh makes sure is set.

    managed: kvmesh's value always wins (addresses, ports, switches P2P depends on); a
    different user value is replaced with a warning.
    tuning: the user's value wins when `check` accepts it; a broken one is replaced.
    """

    name: str
    value: Optional[str] = None
    field_path: Optional[str] = None
    tuning: bool = False
    check: Optional[Callable[[str], Optional[str]]] = None
    why: str = ""


class Plan(NamedTuple):
    """Resolved inputs for one pod's env (all decisions already made).

    A tuple: built for every pod and hashed as env_specs' cache key, both cheap for tuples."""

    mode: str
    pod_ip_var: str
    lookup_host: str
    redis_address: Optional[str]
    distributed_port: int
    init_ports: tuple[int, ...]
    lookup_ports: tuple[int, ...]
    worker_ports: tuple[int, ...]
    redis_port: int
    pull_port: int
    reply_port: int
    cpu_cache_gb: float
    chunk_size: int
    hash_seed: int
    heartbeat_seconds: int
    worker_timeout_seconds: int
    instance_field: str
    v0_connector: bool


@functools.lru_cache(maxsize=1024)
def env_specs(p: Plan) -> tuple[EnvSpec, ...]:
    """The variables for one resolved plan (cached: replicas of a workload share a plan)."""
    return tuple(_env_specs(p))


def _env_specs(p: Plan) -> list[EnvSpec]:
    ip = f"$({p.pod_ip_var})"
    common_tail = [
        EnvSpec("LMCACHE_LOCAL_CPU", TRUE,
                why="P2P serves only from the local CPU tier (LMCache#2347)"),
        EnvSpec("LMCACHE_MAX_LOCAL_CPU_SIZE", format_gb(p.cpu_cache_gb), tuning=True,
                check=check_gb),
        EnvSpec("LMCACHE_CHUNK_SIZE", str(p.chunk_size), tuning=True, check=check_positive_int),
        EnvSpec("PYTHONHASHSEED", str(p.hash_seed), tuning=True, check=check_hash_seed),
        # Telemetry: any user value is the user's choice (tuning without a check).
        EnvSpec("LMCACHE_TRACK_USAGE", "false", tuning=True),
    ]
    if p.mode == names.MODE_MP:
        # LMCache runs in the server sidecar (kvmesh.core.mp); vLLM's process only hashes
        # with the group's seed and stays quiet.
        return [sp for sp in common_tail if sp.name in ("PYTHONHASHSEED", "LMCACHE_TRACK_USAGE")]
    if p.mode == names.MODE_REDIS:
        lookup = p.redis_address or f"{p.lookup_host}:{p.redis_port}"
        specs = [
            EnvSpec("LMCACHE_USE_EXPERIMENTAL", TRUE,
                    why="builds before 2025-04-28 need exactly \"True\" to load the P2P engine"),
            EnvSpec("LMCACHE_ENABLE_P2P", TRUE, why="without it LMCache ignores both URLs"),
            EnvSpec("LMCACHE_LOOKUP_URL", lookup,
                    why="kvmesh's controller purges dead pods' keys only in the group's Redis"),
            EnvSpec("LMCACHE_DISTRIBUTED_URL", f"{ip}:{p.distributed_port}",
                    why="LMCache binds this address and advertises it to peers, so it must be "
                        "the pod's own IP"),
        ]
        if p.v0_connector:
            specs.append(EnvSpec("VLLM_USE_V1", "0",
                                 why="vLLM >= 0.8.5 creates the V0 LMCacheConnector only on V0"))
        return specs + common_tail
    return [
        EnvSpec("LMCACHE_ENABLE_P2P", TRUE, why="turns on the P2P backend"),
        EnvSpec("LMCACHE_ENABLE_CONTROLLER", TRUE, why="P2P asserts the controller is enabled"),
        EnvSpec("LMCACHE_LMCACHE_INSTANCE_ID", field_path=p.instance_field,
                why="the controller keeps the first address of an instance id, so each pod "
                    "incarnation needs its own id"),
        EnvSpec("LMCACHE_CONTROLLER_PULL_URL", f"{p.lookup_host}:{p.pull_port}",
                why="workers must reach the group's lmcache_controller"),
        EnvSpec("LMCACHE_CONTROLLER_REPLY_URL", f"{p.lookup_host}:{p.reply_port}",
                why="workers must reach the group's lmcache_controller"),
        EnvSpec("LMCACHE_LMCACHE_WORKER_PORTS", int_list(list(p.worker_ports)),
                why="one port per rank, declared on the container"),
        EnvSpec("LMCACHE_P2P_HOST", ip,
                why="LMCache binds this address and advertises it to peers, so it must be "
                    "the pod's own IP"),
        EnvSpec("LMCACHE_P2P_INIT_PORTS", int_list(list(p.init_ports)),
                why="one port per rank, declared on the container"),
        EnvSpec("LMCACHE_P2P_LOOKUP_PORTS", int_list(list(p.lookup_ports)),
                why="one port per rank, declared on the container"),
        EnvSpec("LMCACHE_TRANSFER_CHANNEL", "nixl", why="NIXL is the only cross-pod channel"),
        EnvSpec("LMCACHE_ENABLE_ASYNC_LOADING", TRUE,
                why="peer hits are only found by the async lookup path"),
        EnvSpec("LMCACHE_LMCACHE_WORKER_HEARTBEAT_TIME", str(p.heartbeat_seconds), tuning=True,
                check=lambda v: check_heartbeat(v, p.worker_timeout_seconds)),
    ] + common_tail


def check_heartbeat(v: str, timeout: int) -> Optional[str]:
    try:
        n = float(v)
    except ValueError:
        return "must be a number of seconds"
    if not 0 < n < timeout:
        return (f"must be above 0 and below the controller's worker timeout ({timeout}s), "
                "or the controller reaps this worker")
    return None


# Variables of one generation that the other one ignores or chokes on; kvmesh never injects
# them in the wrong mode and warns when a user has set them.
GENERATION_VARS = {
    names.MODE_REDIS: ("LMCACHE_LOOKUP_URL", "LMCACHE_DISTRIBUTED_URL", "LMCACHE_USE_EXPERIMENTAL"),
    names.MODE_CONTROLLER: (
        "LMCACHE_ENABLE_CONTROLLER", "LMCACHE_CONTROLLER_PULL_URL", "LMCACHE_CONTROLLER_REPLY_URL",
        "LMCACHE_LMCACHE_WORKER_PORTS", "LMCACHE_P2P_HOST", "LMCACHE_P2P_INIT_PORTS",
        "LMCACHE_P2P_LOOKUP_PORTS", "LMCACHE_TRANSFER_CHANNEL", "LMCACHE_LMCACHE_INSTANCE_ID",
        "LMCACHE_LMCACHE_WORKER_HEARTBEAT_TIME",
    ),
    # mp mode: LMCache's settings go to the server sidecar, none to the vLLM container.
    names.MODE_MP: (),
}
# Deprecated aliases that LMCache 0.5.6 drops as unknown keys (docs/lmcache-contract.md,
# controller mode).
BROKEN_ALIASES = ("LMCACHE_CONTROLLER_URL", "LMCACHE_LMCACHE_WORKER_PORT")


def other_mode(mode: str) -> str:
    return names.MODE_CONTROLLER if mode == names.MODE_REDIS else names.MODE_REDIS


# Instance id sources: a name reused by a later pod (StatefulSet, fixed-name pods) would hand
# the new pod the old pod's registration, so those use the uid.
INSTANCE_FROM_NAME = "metadata.name"
INSTANCE_FROM_UID = "metadata.uid"
POD_IP_FIELD = "status.podIP"
