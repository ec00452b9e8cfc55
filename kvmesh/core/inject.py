"""Decide and mutate: one pod (or pod template) in, a decision and the mutated pod out.

Pure: no I/O, no clocks, no randomness. The webhook, the offline CLI and the tests all call
`decide`, so every path injects byte-identical configuration. Re-running `decide` on its own
output changes nothing (the webhook's reinvocationPolicy: IfNeeded relies on it).

`decide` runs the pod through PIPELINE, one named step after another:

    prepare -> opt_in -> target -> mp_gate -> parallelism -> connector -> ports -> env
            -> container_ports -> flag -> mp_server -> stamp

(mp_gate and mp_server act in mp mode only; the mp plan itself is kvmesh.core.mp.)

Each step reads what earlier steps found on a `_Pod` and adds to it. A step ends the pipeline
by raising `_Deny` (the pod is refused) or `_Skip` (admitted untouched; once the target
container is known, with the reason in the status annotation).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import orjson

from kvmesh import __version__

from kvmesh.core import names
from kvmesh.core import contract, launch, limits, mp, overrides
from kvmesh.core.policy import PolicyDefaults

INJECT, SKIP, DENY = "inject", "skip", "deny"

# Skip reasons (stable: metrics labels, status annotation, docs).
R_INJECTED = "injected"
R_NOT_OPTED_IN = "not-opted-in"
R_OPTED_OUT = "opted-out"
R_NO_VLLM = "no-vllm-container"
R_PARALLEL = "parallelism-unsupported"
R_DATA_PARALLEL = "data-parallel-unsupported"
R_FOREIGN_CONNECTOR = "foreign-connector"
R_SCRIPT = "script-not-editable"
R_LIMIT = "limit-exceeded"  # the pod is larger than kvmesh configures (kvmesh.core.limits)
R_MP_VERSION = "lmcache-version-unsupported"  # mp asked for, image's LMCache < 0.5.0
R_NO_SIDECARS = "native-sidecars-unsupported"  # mp asked for, cluster without native sidecars
# Denial reasons.
R_INVALID_ANNOTATION = "invalid-annotation"
R_AMBIGUOUS = "ambiguous-container"
R_CONTAINER_NOT_FOUND = "container-not-found"
R_CONNECTOR_CONFLICT = "connector-mode-conflict"
R_BAD_KV_CONFIG = "invalid-kv-transfer-config"
R_MALFORMED = "malformed-pod"


@dataclass(frozen=True)
class Context:
    """What the caller knows besides the pod itself."""

    namespace: str
    policy: PolicyDefaults = field(default_factory=PolicyDefaults)
    # True when the namespace label or a cluster policy selected the pod (the API server's
    # selectors did the matching, so the webhook passes True for everything it receives).
    selected: bool = False
    # Kind of the workload owning a pod template (CLI); pods carry ownerReferences instead.
    owner_kind: Optional[str] = None
    # The KVMeshPolicy whose defaults `policy` holds (recorded in the status annotation).
    policy_name: Optional[str] = None
    # Whether the cluster runs native sidecars (mp mode needs them); None: unknown, assumed.
    native_sidecars: Optional[bool] = None


@dataclass
class Result:
    action: str
    reason: str
    message: str
    pod: dict
    warnings: list[str] = field(default_factory=list)
    mode: Optional[str] = None
    mode_reason: str = ""
    container: Optional[str] = None


class _Deny(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _Pod:
    """One pod on its way through the pipeline: the copy being built and what steps found."""

    __slots__ = ("ctx", "warnings", "pod", "meta", "annotations", "labels", "spec",
                 "containers", "ov", "c", "launch", "env_in", "mode", "mode_reason", "version",
                 "flags", "ranks", "user_kv", "v0", "ports", "dist", "init", "look", "work",
                 "mp")

    def __init__(self, pod: dict, ctx: Context, warnings: list[str]):
        self.pod, self.ctx, self.warnings = pod, ctx, warnings
        self.c: Optional[dict] = None  # the target container (a copy), once known


def decide(pod: Any, ctx: Context) -> Result:
    """Inject LMCache P2P configuration into `pod` (a Pod or a pod template), or say why not."""
    warnings: list[str] = []
    if not isinstance(pod, dict):
        return Result(DENY, R_MALFORMED, "the object is not a JSON object", pod, warnings)
    s = _Pod(pod, ctx, warnings)
    try:
        for step in PIPELINE:
            step(s)
    except _Deny as d:
        return Result(DENY, d.reason, str(d), pod, warnings)
    except _Skip as skip:
        if s.c is None:  # before the target container is known: nothing to record
            return Result(SKIP, skip.reason, str(skip), pod, warnings)
        _set_status(s.annotations, {"injected": False, "reason": skip.reason,
                                    "message": str(skip), "mode": s.mode,
                                    "modeReason": s.mode_reason, "container": s.c["name"]})
        return Result(SKIP, skip.reason, str(skip), s.pod, warnings, s.mode, s.mode_reason,
                      s.c["name"])
    c = s.c
    return Result(INJECT, R_INJECTED,
                  f"injected {s.mode} mode into container {c['name']!r} ({s.mode_reason})",
                  s.pod, warnings, s.mode, s.mode_reason, c["name"])


# --- prepare: copy on write, check the untrusted JSON, parse the overrides ------------------

def prepare(s: _Pod) -> None:
    """Copy on write: only the objects on the path to what changes are copied (metadata, its
    annotations and labels, spec, later the containers list and the target container);
    everything else is shared with the input, which is never modified. Sharing also lets the
    patch diff skip unchanged subtrees by identity."""
    pod = s.pod = dict(s.pod)
    meta = s.meta = pod["metadata"] = dict(_object(pod.get("metadata"), ".metadata"))
    annotations = s.annotations = meta["annotations"] = dict(
        _strings(_object(meta.get("annotations"), "metadata.annotations"),
                 "metadata.annotations"))
    labels = s.labels = dict(_strings(_object(meta.get("labels"), "metadata.labels"),
                                      "metadata.labels"))
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        raise _Deny(R_MALFORMED, "spec must be an object")
    spec = s.spec = pod["spec"] = dict(spec)
    s.containers = _checked_containers(spec, "containers")
    if not s.containers:
        raise _Deny(R_MALFORMED, "spec.containers is empty")
    _checked_containers(spec, "initContainers")
    try:
        s.ov = overrides.parse(annotations, labels)
    except overrides.InvalidOverride as e:
        raise _Deny(R_INVALID_ANNOTATION, str(e)) from None


def _object(v: Any, where: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _Deny(R_MALFORMED, f"{where} must be an object")
    return v


def _strings(d: dict, where: str) -> dict:
    for k, v in d.items():
        if not isinstance(v, str):
            raise _Deny(R_MALFORMED, f"{where}[{k!r}] must be a string")
    return d


def _checked_containers(spec: dict, key: str) -> list[dict]:
    cs = spec.get(key)
    if cs is None:
        return []
    if not isinstance(cs, list):
        raise _Deny(R_MALFORMED, f"spec.{key} must be a list")
    for c in cs:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise _Deny(R_MALFORMED, f"spec.{key}[{_at(cs, c)}] must be an object with a name")
        for k in ("command", "args"):
            words = c.get(k)
            if words is not None and not _all_strings(words):
                raise _Deny(R_MALFORMED, f"spec.{key}[{_at(cs, c)}].{k} must be a list of strings")
        for k in ("env", "ports"):
            items = c.get(k)
            if items is not None and not _all_objects(items):
                where = f"spec.{key}[{_at(cs, c)}].{k}"
                if not isinstance(items, list):
                    raise _Deny(R_MALFORMED, f"{where} must be a list")
                raise _Deny(R_MALFORMED, f"{where}[{_at(items, None)}] must be an object")
    return cs


def _at(items: list, item: Any) -> int:
    """Index of `item` in `items` by identity, or of the first non-object when item is None
    (error messages only: the loops above do without enumerate)."""
    for i, x in enumerate(items):
        if (x is item) if item is not None else not isinstance(x, dict):
            return i
    return -1


def _all_objects(items: Any) -> bool:
    if not isinstance(items, list):
        return False
    for e in items:
        if not isinstance(e, dict):
            return False
    return True


def _all_strings(words: Any) -> bool:
    if not isinstance(words, list):
        return False
    for w in words:
        if not isinstance(w, str):
            return False
    return True


# --- opt_in: the pod's label, or the namespace / a policy selecting it ---------------------

def opt_in(s: _Pod) -> None:
    opt = s.labels.get(names.LABEL_INJECT)
    if opt == names.INJECT_DISABLED:
        raise _Skip(R_OPTED_OUT, f"label {names.LABEL_INJECT}={names.INJECT_DISABLED}")
    if opt != names.INJECT_ENABLED and not s.ctx.selected:
        raise _Skip(R_NOT_OPTED_IN, f"no label {names.LABEL_INJECT}={names.INJECT_ENABLED} and "
                                    "neither the namespace nor a policy selects the pod")


# --- target: the vLLM container, how it starts, and the LMCache mode ------------------------

def target(s: _Pod) -> None:
    idx, ln = _find_container(s.containers, s.ov)
    containers = s.spec["containers"] = list(s.containers)
    c = s.c = containers[idx] = dict(containers[idx])
    s.launch = ln
    s.env_in = c.get("env") or []
    s.mode, s.mode_reason, s.version = _mode(s.ov, s.ctx.policy, str(c.get("image", "")),
                                             ln.flags)
    if len(s.env_in) > limits.MAX_ENV_ENTRIES:
        raise _Skip(R_LIMIT, f"container {c['name']!r} has {len(s.env_in):,} env entries; "
                             f"kvmesh edits containers with at most {limits.MAX_ENV_ENTRIES:,}")
    if ln.script_error:
        raise _Skip(R_SCRIPT, f"container {c['name']!r}: cannot edit its shell script safely "
                              f"({ln.script_error}); start vLLM with command/args, or add "
                              f"{contract.KV_TRANSFER_FLAG} to the script yourself")


def _classify(c: dict, budget: list[int]) -> Optional[launch.Launch]:
    """How container `c` starts vLLM, if it does. `budget` ([bytes]) is what is left of the
    pod's script-parsing allowance (limits.MAX_SCRIPT_BYTES_PER_POD); a script spends it."""
    command, args = c.get("command") or (), c.get("args") or ()
    script = launch.script_in(list(command) + list(args))
    if script is not None and len(script) <= limits.MAX_SCRIPT_BYTES:
        if len(script) > budget[0]:
            why = (f"the pod's scripts are over {limits.kib(limits.MAX_SCRIPT_BYTES_PER_POD)} "
                   "together, the most kvmesh parses per pod")
            return launch.Launch("shell", (), "command", 0, None, why) if "vllm" in script \
                else None
        budget[0] -= len(script)
    return launch.classify(command, args, str(c.get("image", "")))


def _find_container(containers: list[dict], ov: overrides.Overrides
                    ) -> tuple[int, launch.Launch]:
    budget = [limits.MAX_SCRIPT_BYTES_PER_POD]
    if ov.container:
        for i, c in enumerate(containers):
            if c["name"] == ov.container:
                return i, _classify(c, budget) or launch.UNKNOWN
        raise _Deny(R_CONTAINER_NOT_FOUND,
                    f"annotation {names.ANN_CONTAINER}={ov.container!r} names no container of "
                    f"this pod; containers: {', '.join(c['name'] for c in containers)}")
    found = [(i, ln) for i, c in enumerate(containers) if (ln := _classify(c, budget))]
    if not found:
        raise _Skip(R_NO_VLLM, "no container runs the vLLM OpenAI server (vllm serve, "
                               "python -m vllm.entrypoints.openai.api_server, or a vLLM image); "
                               f"name it with the annotation {names.ANN_CONTAINER}")
    if len(found) > 1:
        raise _Deny(R_AMBIGUOUS,
                    "several containers run vLLM ("
                    + ", ".join(containers[i]["name"] for i, _ in found)
                    + f"); name the one to inject with the annotation {names.ANN_CONTAINER}")
    return found[0]


def _mode(ov: overrides.Overrides, policy: PolicyDefaults, image: str, flags: launch.Flags
          ) -> tuple[str, str, Optional[tuple[int, int, int]]]:
    version = contract.lmcache_version_from_image(image)
    if ov.mode:
        return ov.mode, f"annotation {names.ANN_MODE}", version
    if policy.mode:
        return policy.mode, "policy", version
    mp_evidence = mp.evidence(flags)  # the pod's own config names LMCache's MP connector
    if mp_evidence:
        return names.MODE_MP, mp_evidence, version
    if version is not None:
        m = contract.mode_for_version(version)
        return m, f"image tag: LMCache {contract.fmt_version(version)}", version
    return policy.default_mode, "policy default (the image tag names no LMCache version)", None


# --- mp_gate: can mp mode run here at all ----------------------------------------------------

def mp_gate(s: _Pod) -> None:
    if s.mode != names.MODE_MP:
        return
    why = mp.unsupported(s.version, s.ctx.native_sidecars)
    if why:
        reason = R_MP_VERSION if why[0] == "lmcache-version" else R_NO_SIDECARS
        raise _Skip(reason, f"container {s.c['name']!r} ({s.mode_reason}): {why[1]}")


# --- parallelism: ranks from the vLLM command line -------------------------------------------

def parallelism(s: _Pod) -> None:
    flags = s.flags = s.launch.flags
    name, warnings = s.c["name"], s.warnings
    if flags.has_config_file:
        warnings.append("vLLM reads a --config file kvmesh cannot see: keep tensor/pipeline "
                        "parallel 1 and no other kv-transfer-config there")
    tp = _flag_int(flags.tp, "--tensor-parallel-size", s.env_in, warnings)
    pp = _flag_int(flags.pp, "--pipeline-parallel-size", s.env_in, warnings)
    dp = _flag_int(flags.dp, "--data-parallel-size", s.env_in, warnings)
    if dp > 1:
        raise _Skip(R_DATA_PARALLEL, f"container {name!r} runs --data-parallel-size {dp}: "
                                     "several LMCache engines in one pod would share one "
                                     "address (LMCache#919)")
    s.ranks = tp * pp
    if s.ranks > 1:
        if not s.ov.allow_parallel:
            raise _Skip(R_PARALLEL, f"container {name!r} runs tensor-parallel {tp} x "
                                    f"pipeline-parallel {pp}; LMCache P2P is broken for more "
                                    "than one rank (LMCache#2405, #1861); set "
                                    f"{names.ANN_ALLOW_PARALLEL}: \"true\" to inject anyway")
        if s.ranks > limits.MAX_RANKS:
            raise _Skip(R_LIMIT, f"container {name!r} runs tensor-parallel {tp} x "
                                 f"pipeline-parallel {pp} = {s.ranks:,} ranks; kvmesh configures "
                                 f"at most {limits.MAX_RANKS} ranks (three ports each) per pod")
        warnings.append(f"{names.ANN_ALLOW_PARALLEL}: injecting for {s.ranks} ranks although "
                        "upstream LMCache P2P does not work across ranks (LMCache#2405)")


_REF = re.compile(r"^\$\(([A-Za-z_][A-Za-z0-9_]*)\)$")


def _flag_int(raw: Optional[str], flag: str, env: list[dict], warnings: list[str]) -> int:
    if raw is None:
        return 1
    value = raw
    m = _REF.match(raw)
    if m:  # the kubelet expands $(VAR) in args from the container env
        for e in env:
            if e.get("name") == m.group(1) and isinstance(e.get("value"), str):
                value = e["value"]
    try:
        return int(value)
    except ValueError:
        warnings.append(f"kvmesh cannot read {flag} {raw!r}; assuming 1")
        return 1


# --- connector: the user's kv-transfer-config, if any ----------------------------------------

def connector(s: _Pod) -> None:
    flags, name, mode = s.flags, s.c["name"], s.mode
    user_kv: Optional[dict] = None
    if flags.kv_transfer is not None:
        try:
            user_kv = json.loads(flags.kv_transfer)
        except ValueError:
            raise _Deny(R_BAD_KV_CONFIG, f"container {name!r}: {contract.KV_TRANSFER_FLAG} "
                                         f"{flags.kv_transfer!r} is not valid JSON") from None
        if not isinstance(user_kv, dict):
            raise _Deny(R_BAD_KV_CONFIG, f"container {name!r}: {contract.KV_TRANSFER_FLAG} "
                                         "must be a JSON object")
    if flags.kv_transfer_dotted:
        user_kv = {**(user_kv or {}), **flags.kv_transfer_dotted}
    s.user_kv = user_kv
    problem = mp.conflict(mode, user_kv, flags)  # across generations, mp included
    if problem:
        raise _Deny(R_CONNECTOR_CONFLICT, f"container {name!r} {problem} ({s.mode_reason})")
    s.v0 = mode == names.MODE_REDIS and s.version is not None \
        and s.version < contract.V0_CONNECTOR_BELOW
    if user_kv is None or mode == names.MODE_MP:
        return
    kind = user_kv.get("kv_connector")
    if kind not in contract.LMCACHE_CONNECTORS:
        raise _Skip(R_FOREIGN_CONNECTOR, f"container {name!r} already uses kv_connector "
                                         f"{kind!r}; kvmesh does not replace another connector")
    if kind == contract.CONNECTOR_V0 and mode == names.MODE_CONTROLLER:
        raise _Deny(R_CONNECTOR_CONFLICT,
                    f"container {name!r} uses the V0 {contract.CONNECTOR_V0}, which needs "
                    f"LMCache < 0.3.0 (redis mode), but the mode is controller "
                    f"({s.mode_reason}); set {names.ANN_MODE}: redis or use "
                    f"{contract.CONNECTOR_V1}")
    s.v0 = kind == contract.CONNECTOR_V0


# --- ports: free ports for LMCache, avoiding every port the pod already uses -----------------

def ports(s: _Pod) -> None:
    pol = s.ctx.policy
    vllm_port = _flag_int(s.flags.port, "--port", s.env_in, s.warnings) if s.flags.port else \
        contract.VLLM_DEFAULT_PORT
    used = _used_ports(s.spec, s.c, vllm_port)
    s.dist = s.init = s.look = s.work = ()
    if s.mode == names.MODE_MP:  # the server sidecar's ports; none on the vLLM container
        s.mp = (_pick(pol.mp_rpc_port, used), _pick(pol.mp_p2p_port, used),
                _pick(pol.mp_http_port, used))
        s.ports = []
        return
    if s.mode == names.MODE_REDIS:
        s.dist = (_pick(pol.distributed_port, used),)
        s.ports = [(names.PORT_NAME_DISTRIBUTED, s.dist[0])]
        return
    ranks = range(s.ranks)
    # All init ports first, then lookup, then worker: the order decides who gets a taken port.
    init = s.init = tuple([_pick(pol.p2p_init_port + r, used) for r in ranks])
    look = s.look = tuple([_pick(pol.p2p_lookup_port + r, used) for r in ranks])
    work = s.work = tuple([_pick(pol.worker_port + r, used) for r in ranks])
    s.ports = [port for r in ranks for port in zip(_port_names(r), (init[r], look[r], work[r]))]


def _used_ports(spec: dict, target: dict, vllm_port: int) -> limits.PortSet:
    used = {vllm_port}
    for key in ("containers", "initContainers", "ephemeralContainers"):
        for c in spec.get(key) or []:
            if not isinstance(c, dict) or c.get("name") == names.MP_SIDECAR:
                continue  # (kvmesh's mp server: its ports are re-chosen too)
            for p in c.get("ports") or ():
                if not isinstance(p, dict):
                    continue
                if c is target and str(p.get("name", "")).startswith(names.PORT_NAME_PREFIX):
                    continue  # kvmesh's own ports from an earlier injection are re-chosen
                n = p.get("containerPort")
                if isinstance(n, int):
                    used.add(n)
                n = p.get("hostPort")
                if isinstance(n, int):
                    used.add(n)
    return limits.PortSet(used)


@functools.lru_cache(maxsize=64)
def _port_names(rank: int) -> tuple[str, str, str]:
    return (names.PORT_NAME_INIT.format(rank=rank), names.PORT_NAME_LOOKUP.format(rank=rank),
            names.PORT_NAME_WORKER.format(rank=rank))


def _pick(start: int, used: limits.PortSet) -> int:
    try:
        return used.pick(start)
    except limits.NoFreePort as e:
        raise _Deny(R_MALFORMED, f"cannot place kvmesh's ports: {e}") from None


# --- env: the mode's variables merged into the container's env ------------------------------

def env(s: _Pod) -> None:
    c, warnings = s.c, s.warnings
    entries, index, user_ip_var, notes = _read_env(s.env_in, s.mode)
    pod_ip_var = user_ip_var or names.POD_IP_VAR
    reuse_names = _reuses_names(s.meta, s.ctx)
    specs = contract.env_specs(_plan(s, pod_ip_var, reuse_names))
    if c.get("envFrom"):
        shadowed = [sp.name for sp in specs if sp.tuning and sp.name not in index]
        if shadowed:
            warnings.append(f"container {c['name']!r} has envFrom: kvmesh's values for "
                            f"{', '.join(shadowed)} in env take precedence over envFrom; set "
                            "them in env to choose your own")
    warnings += notes
    if user_ip_var is None and s.mode != names.MODE_MP:  # first: $(VAR) sees earlier ones
        entries.insert(0, {"name": pod_ip_var,
                           "valueFrom": {"fieldRef": {"fieldPath": contract.POD_IP_FIELD}}})
        index = {n: i + 1 for n, i in index.items()}
        index.setdefault(pod_ip_var, 0)
    instance_ok = (contract.INSTANCE_FROM_UID,) if reuse_names else \
        (contract.INSTANCE_FROM_UID, contract.INSTANCE_FROM_NAME)
    c["env"] = _merge_env(entries, index, specs, pod_ip_var, instance_ok, warnings)
    _check_memory(c, warnings)


def _plan(s: _Pod, pod_ip_var: str, reuse_names: bool) -> contract.Plan:
    pol, ov = s.ctx.policy, s.ov
    group = ov.group or pol.group
    namespace = s.ctx.namespace or str(s.meta.get("namespace") or "default")
    return contract.Plan(
        mode=s.mode, pod_ip_var=pod_ip_var,
        lookup_host=names.lookup_host(s.mode, group, namespace),
        redis_address=pol.redis_address, distributed_port=s.dist[0] if s.dist else 0,
        init_ports=s.init, lookup_ports=s.look, worker_ports=s.work, redis_port=pol.redis_port,
        pull_port=pol.controller_pull_port, reply_port=pol.controller_reply_port,
        cpu_cache_gb=ov.cpu_cache_gb or pol.cpu_cache_gb, chunk_size=pol.chunk_size,
        hash_seed=pol.hash_seed, heartbeat_seconds=pol.heartbeat_seconds,
        worker_timeout_seconds=pol.worker_timeout_seconds,
        instance_field=contract.INSTANCE_FROM_UID if reuse_names
        else contract.INSTANCE_FROM_NAME,
        v0_connector=s.v0)


# Per mode: the other generation's variables, ignored or harmful in this one.
_FOREIGN = {mode: frozenset().union(*[contract.GENERATION_VARS[m] for m in names.MODES])
            - frozenset(contract.GENERATION_VARS[mode]) for mode in names.MODES}


def _read_env(env_in: list[dict], mode: str
              ) -> tuple[list[dict], dict[Any, int], Optional[str], list[str]]:
    """The container's own env in one pass: its entries without duplicates (the later
    definition wins, in the earlier one's place), where each name is, the user's pod IP
    variable, and warnings about what the env holds."""
    entries: list[dict] = []
    index: dict[Any, int] = {}
    pod_ip_var = None
    foreign, notes, dups = _FOREIGN[mode], [], []
    for e in env_in:
        n = e.get("name")
        if pod_ip_var is None and isinstance(n, str) and \
                _field_path(e) == contract.POD_IP_FIELD:
            pod_ip_var = n
        if n in foreign:
            notes.append(f"{n} belongs to the other LMCache generation and is ignored or "
                         f"harmful in {mode} mode; remove it")
        elif n in contract.BROKEN_ALIASES:
            notes.append(f"{n} is a deprecated alias LMCache 0.5.x drops; remove it")
        at = index.get(n)
        if at is None:
            index[n] = len(entries)
            entries.append(e)
        else:
            entries[at] = e
            dups.append(f"kvmesh removed a duplicate definition of {n} (the later one wins)")
    return entries, index, pod_ip_var, notes + dups


def _merge_env(env: list[Optional[dict]], index: dict[Any, int],
               specs: tuple[contract.EnvSpec, ...], pod_ip_var: str,
               instance_ok: tuple[str, ...], warnings: list[str]) -> list[dict]:
    """`env` (the user's entries, edited in place) with every spec applied."""
    ip_at = index.get(pod_ip_var, len(env))  # (mp mode adds no pod IP variable)
    ref = f"$({pod_ip_var})"
    appended: list[dict] = []
    for spec in specs:
        at = index.get(spec.name)
        if spec.field_path:
            want = {"name": spec.name, "valueFrom": {"fieldRef": {"fieldPath": spec.field_path}}}
        else:
            want = {"name": spec.name, "value": spec.value}
        if at is None:
            appended.append(want)
            continue
        old = env[at]
        want, problem = _reconcile(spec, old, want, instance_ok)
        if want is old:
            continue
        warnings.append(_replace_message(spec, old, problem))
        if ref in str(want.get("value", "")) and at < ip_at:
            env[at] = None  # moved after the pod IP variable it refers to
            appended.append(want)
        else:
            env[at] = want
    return [e for e in env if e is not None] + appended


def _reconcile(spec: contract.EnvSpec, old: dict, want: dict, instance_ok: tuple[str, ...]
               ) -> tuple[dict, Optional[str]]:
    """`old` when the user's entry stays, else the entry to write and what was wrong."""
    if spec.name == "LMCACHE_LMCACHE_INSTANCE_ID":
        if _field_path(old) in instance_ok and "value" not in old:
            return old, None
        return want, ("the id must come from the pod's identity "
                      f"({' or '.join(instance_ok)}); " + spec.why)
    if old == want:
        return old, None
    if not spec.tuning:
        return want, None
    if "valueFrom" in old and "value" not in old:
        return old, None  # from a ConfigMap/Secret: the user's value, not checkable here
    if not isinstance(old.get("value"), str):
        return want, None
    problem = spec.check(old["value"]) if spec.check else None
    if problem is None:
        return old, None
    if spec.name == "LMCACHE_MAX_LOCAL_CPU_SIZE":
        gb = contract.quantity_to_gb(old["value"])
        if gb is not None:
            want = {"name": spec.name, "value": contract.format_gb(gb)}
            problem += f"; converted to {want['value']} GB"
    return want, problem


def _field_path(e: dict) -> Optional[str]:
    vf = e.get("valueFrom")
    if isinstance(vf, dict) and isinstance(vf.get("fieldRef"), dict):
        return vf["fieldRef"].get("fieldPath")
    return None


def _why_bad_address(value: str) -> str:
    host = value.rsplit(":", 1)[0] if ":" in value else value
    if host in ("0.0.0.0", "::", "*"):
        return "peers would read 0.0.0.0 from the lookup service and connect to themselves"
    if host in ("localhost", "127.0.0.1"):
        return "peers would connect to themselves"
    if re.match(r"^\d+\.\d+\.\d+\.\d+$", host):
        return "a fixed IP is wrong for every other replica and after every restart"
    if "$(" not in host:
        return "LMCache binds this address, and a Service name cannot be bound (the failure " \
               "is silent and every replica advertises the same address)"
    return "kvmesh sets it to the pod's own IP"


def _replace_message(spec: contract.EnvSpec, old: dict, problem: Optional[str]) -> str:
    shown = old.get("value") if "value" in old else "(valueFrom)"
    base = f"kvmesh replaced {spec.name}={shown!r}"
    if spec.name in ("LMCACHE_DISTRIBUTED_URL", "LMCACHE_P2P_HOST") and isinstance(shown, str):
        return f"{base}: {_why_bad_address(shown)}"
    if problem:
        return f"{base}: {problem}"
    if spec.value == contract.TRUE and isinstance(shown, str) and not contract.is_true(shown):
        return f"{base}: LMCache reads only true/1 as true, so P2P would be off; {spec.why}"
    if isinstance(shown, str) and shown.lstrip().startswith("["):
        return f"{base}: LMCache reads only comma lists (\"8200,8201\"); a JSON list is dropped"
    return f"{base}: {spec.why}" if spec.why else base


def _reuses_names(meta: dict, ctx: Context) -> bool:
    """True when a later pod may carry this pod's name (StatefulSets, fixed-name pods)."""
    if ctx.owner_kind is not None:
        return ctx.owner_kind in ("StatefulSet", "Pod")
    for o in meta.get("ownerReferences") or []:
        if isinstance(o, dict) and o.get("kind") == "StatefulSet":
            return True
    return not meta.get("generateName")


def _check_memory(c: dict, warnings: list[str]) -> None:
    limit = ((c.get("resources") or {}).get("limits") or {}).get("memory")
    if not isinstance(limit, (str, int)):
        return
    cache_gb = None
    for e in c["env"]:
        if e.get("name") == "LMCACHE_MAX_LOCAL_CPU_SIZE" and isinstance(e.get("value"), str):
            try:
                cache_gb = float(e["value"])
            except ValueError:
                return
    limit_gb = contract.quantity_to_gb(str(limit))
    if cache_gb is not None and limit_gb is not None and cache_gb >= limit_gb:
        warnings.append(f"container {c['name']!r}: the LMCache CPU cache ({cache_gb} GB) does not "
                        f"fit in its memory limit ({limit}); the pod would be OOM-killed")


# --- container_ports: declare LMCache's ports on the container --------------------------------

def container_ports(s: _Pod) -> None:
    c = s.c
    declared = [p for p in c.get("ports") or []
                if not str(p.get("name", "")).startswith(names.PORT_NAME_PREFIX)]
    host_network = s.spec.get("hostNetwork") is True
    for name, number in s.ports:
        entry = {"name": name, "containerPort": number, "protocol": "TCP"}
        if host_network:
            entry["hostPort"] = number  # lets the scheduler keep two replicas off one node
        declared.append(entry)
    if declared or "ports" in c:  # (mp mode declares its ports on the server sidecar)
        c["ports"] = declared


# --- flag: --kv-transfer-config on the vLLM command line -------------------------------------

def flag(s: _Pod) -> None:
    c, ln = s.c, s.launch
    if s.mode == names.MODE_MP:  # always kvmesh's, with the user's own settings merged in
        s.mp = _mp_plan(s)
        value = mp.kv_transfer(s.mp, s.user_kv, s.warnings)
        if s.flags.kv_transfer == value and not s.flags.kv_transfer_dotted:
            return  # already injected
        _mp_drop_user_flag(s)
    elif s.user_kv is not None:  # the user's LMCache connector stays as written
        return
    else:
        value = contract.kv_transfer_json(contract.CONNECTOR_V0 if s.v0 else
                                          contract.CONNECTOR_V1)
    if ln.form in ("exec", "args-only"):
        c["args"] = list(c.get("args") or []) + [contract.KV_TRANSFER_FLAG, value]
    elif ln.form == "shell":
        holder = c[ln.script_field] = list(c[ln.script_field])
        holder[ln.script_index] = launch.insert_into_script(
            holder[ln.script_index], ln.script, contract.KV_TRANSFER_FLAG, value)
    else:
        s.warnings.append(f"kvmesh found no vLLM command in container {c['name']!r}; add "
                          f"{contract.KV_TRANSFER_FLAG} '{value}' to its vLLM command line")


# --- mp: the server sidecar and what it needs (kvmesh.core.mp) -------------------------------

def _mp_plan(s: _Pod) -> mp.Plan:
    pol, ov = s.ctx.policy, s.ov
    namespace = s.ctx.namespace or str(s.meta.get("namespace") or "default")
    gpu_all = (ov.mp_gpu_visibility or pol.mp_gpu_visibility) == "all"
    rpc, p2p, http = s.mp
    return mp.Plan(
        rpc_port=rpc, p2p_port=p2p, http_port=http,
        coordinator_url=mp.coordinator_url(ov.group or pol.group, namespace),
        l1_gb=mp.l1_gb(ov.cpu_cache_gb, s.flags.offload_size, pol.cpu_cache_gb, s.warnings),
        chunk_size=pol.chunk_size, hash_seed=pol.hash_seed,
        transfer_mode=mp.transfer_mode(s.c, gpu_all, s.user_kv),
        isolated_ipc=mp.user_isolated_ipc(s.user_kv),
        gpu_all=gpu_all, host_network=s.spec.get("hostNetwork") is True)


def _mp_drop_user_flag(s: _Pod) -> None:
    """The user's own --kv-transfer-config gives way to kvmesh's merged one."""
    if s.flags.kv_transfer is None and not s.flags.kv_transfer_dotted:
        return
    c, ln = s.c, s.launch
    if ln.form in ("exec", "args-only"):
        for k in ("command", "args"):
            if c.get(k):
                c[k] = mp.remove_flag(c[k])
    elif ln.form == "shell" and s.flags.kv_transfer_dotted:
        raise _Skip(R_SCRIPT, f"container {c['name']!r}: mp mode must rewrite the dotted "
                              f"{contract.KV_TRANSFER_FLAG}.* options in the script; pass one "
                              f"JSON {contract.KV_TRANSFER_FLAG} instead")
    # shell form with JSON: kvmesh's value goes after the user's; vLLM keeps the last one


def mp_server(s: _Pod) -> None:
    if s.mode != names.MODE_MP:
        return
    mp.place(s.spec, mp.sidecar(s.mp, s.c))  # the plan the flag step made


# --- stamp: the peer-group label and the status annotation -----------------------------------

def stamp(s: _Pod) -> None:
    group = s.ov.group or s.ctx.policy.group
    # The controller watches injected pods by this label (one watch, no annotation scans).
    s.meta["labels"] = s.labels
    s.labels[names.LABEL_PEER_GROUP] = names.group_id(s.mode, group)
    status = {"injected": True, "mode": s.mode, "modeReason": s.mode_reason,
              "container": s.c["name"], "group": group, "version": __version__,
              "hash": _hash(s.mode, s.c)}
    if s.ctx.policy_name:
        status["policy"] = s.ctx.policy_name
    _set_status(s.annotations, status)


def _set_status(annotations: dict, status: dict) -> None:
    annotations[names.ANN_STATUS] = orjson.dumps(status, option=orjson.OPT_SORT_KEYS).decode()


def _hash(mode: str, c: dict) -> str:
    """Digest of what kvmesh controls in the container; equal across re-injections."""
    # Unsorted JSON is deterministic here (kvmesh builds these values in a fixed order) and
    # an order of magnitude cheaper than a sorted dump or repr.
    material = (mode, c.get("env"), c.get("ports"), c.get("command"), c.get("args"))
    digest = hashlib.sha256(orjson.dumps(material)).hexdigest()
    return "sha256:" + digest[:16]


PIPELINE = (prepare, opt_in, target, mp_gate, parallelism, connector, ports, env,
            container_ports, flag, mp_server, stamp)
