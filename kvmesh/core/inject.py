"""Decide and mutate: one pod (or pod template) in, a decision and the mutated pod out.

Pure: no I/O, no clocks, no randomness. The webhook, the offline CLI and the tests all call
`decide`, so every path injects byte-identical configuration. Re-running `decide` on its own
output changes nothing (the webhook's reinvocationPolicy: IfNeeded relies on it).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import orjson

from kvmesh import __version__

from kvmesh.core import names
from kvmesh.core import contract, launch, limits, overrides
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
# Denial reasons.
R_INVALID_ANNOTATION = "invalid-annotation"
R_AMBIGUOUS = "ambiguous-container"
R_CONTAINER_NOT_FOUND = "container-not-found"
R_CONNECTOR_CONFLICT = "connector-mode-conflict"
R_BAD_KV_CONFIG = "invalid-kv-transfer-config"
R_MALFORMED = "malformed-pod"

SKIP_REASONS = (R_NOT_OPTED_IN, R_OPTED_OUT, R_NO_VLLM, R_PARALLEL, R_DATA_PARALLEL,
                R_FOREIGN_CONNECTOR, R_SCRIPT, R_LIMIT)


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


def decide(pod: Any, ctx: Context) -> Result:
    """Inject LMCache P2P configuration into `pod` (a Pod or a pod template), or say why not."""
    original = pod
    warnings: list[str] = []
    try:
        if not isinstance(pod, dict):
            raise _Deny(R_MALFORMED, "the object is not a JSON object")
        return _decide(pod, ctx, warnings)
    except _Deny as d:
        return Result(DENY, d.reason, str(d), original, warnings)
    except _Skip as s:  # skips that happen before a mode is known
        return Result(SKIP, s.reason, str(s), original, warnings)


# --- helpers over plain dicts (the pod is untrusted JSON: check every type) ---------------

def _dict(obj: dict, key: str, where: str, create: bool = True) -> dict:
    v = obj.get(key)
    if v is None:
        v = {}
        if create:
            obj[key] = v
    if not isinstance(v, dict):
        raise _Deny(R_MALFORMED, f"{where}.{key} must be an object")
    return v


def _list(obj: dict, key: str, where: str) -> list:
    v = obj.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise _Deny(R_MALFORMED, f"{where}.{key} must be a list")
    return v


def _str_map(d: dict, where: str) -> dict:
    for k, v in d.items():
        if not isinstance(v, str):
            raise _Deny(R_MALFORMED, f"{where}[{k!r}] must be a string")
    return d


def _containers(spec: dict, key: str) -> list[dict]:
    cs = _list(spec, key, "spec")
    for i, c in enumerate(cs):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise _Deny(R_MALFORMED, f"spec.{key}[{i}] must be an object with a name")
        for k in ("command", "args"):
            if c.get(k) is not None and (not isinstance(c[k], list)
                                         or not all(isinstance(a, str) for a in c[k])):
                raise _Deny(R_MALFORMED, f"spec.{key}[{i}].{k} must be a list of strings")
        for k in ("env", "ports"):
            for j, e in enumerate(_list(c, k, f"spec.{key}[{i}]")):
                if not isinstance(e, dict):
                    raise _Deny(R_MALFORMED, f"spec.{key}[{i}].{k}[{j}] must be an object")
    return cs


# --- the vLLM container ------------------------------------------------------------------

@dataclass
class _Launch:
    form: str  # exec | args-only | shell | unknown
    words: list[str]  # vLLM's own arguments (after `vllm serve` / the module)
    script_field: Optional[str] = None  # "command" | "args" for shell form
    script_index: int = 0
    script: Optional[launch.ScriptLaunch] = None
    script_error: Optional[str] = None


def _classify(c: dict, budget: Optional[list[int]] = None) -> Optional[_Launch]:
    """How container `c` starts vLLM, if it does. `budget` ([bytes]) is what is left of the
    pod's script-parsing allowance (limits.MAX_SCRIPT_BYTES_PER_POD); parsing spends it."""
    command = c.get("command") or []
    args = c.get("args") or []
    argv = command + args
    at = launch.server_start(argv)
    if at is not None:
        return _Launch("exec", argv[at:])
    # sh -c SCRIPT, with the script in command or args
    for i, w in enumerate(argv):
        if launch._base(w) in launch.SHELLS:
            j = i + 1
            while j < len(argv) and argv[j].startswith("-") and "c" not in argv[j][1:]:
                j += 1
            if j < len(argv) and argv[j].startswith("-") and "c" in argv[j][1:] \
                    and j + 1 < len(argv):
                where = "command" if j + 1 < len(command) else "args"
                idx = j + 1 if where == "command" else j + 1 - len(command)
                script = argv[j + 1]
                budget = budget if budget is not None else [limits.MAX_SCRIPT_BYTES_PER_POD]
                over = _script_over_limit(len(script), budget[0])
                if over:
                    return _Launch("shell", [], where, idx, None, over) \
                        if "vllm" in script else None
                budget[0] -= len(script)
                try:
                    found = launch.find_in_script(script)
                except launch.ScriptError as e:
                    if "vllm" in script:
                        return _Launch("shell", [], where, idx, None, str(e))
                    return None
                if found is None:
                    return None
                return _Launch("shell", [w.text for w in found.words[found.server_at:]],
                               where, idx, found)
            break
    if not command and launch.is_vllm_image(str(c.get("image", ""))):
        return _Launch("args-only", list(args))
    return None


def _script_over_limit(size: int, left: int) -> Optional[str]:
    if size > limits.MAX_SCRIPT_BYTES:
        return (f"the script is {size:,} bytes; kvmesh parses scripts of at most "
                f"{limits.kib(limits.MAX_SCRIPT_BYTES)}")
    if size > left:
        return (f"the pod's scripts are over {limits.kib(limits.MAX_SCRIPT_BYTES_PER_POD)} "
                "together, the most kvmesh parses per pod")
    return None


def _find_container(spec_containers: list[dict], ov: overrides.Overrides
                    ) -> tuple[int, _Launch]:
    budget = [limits.MAX_SCRIPT_BYTES_PER_POD]
    if ov.container:
        for i, c in enumerate(spec_containers):
            if c["name"] == ov.container:
                return i, _classify(c, budget) or _Launch("unknown", [])
        raise _Deny(R_CONTAINER_NOT_FOUND,
                    f"annotation {names.ANN_CONTAINER}={ov.container!r} names no container of "
                    f"this pod; containers: {', '.join(c['name'] for c in spec_containers)}")
    found = [(i, l) for i, c in enumerate(spec_containers) if (l := _classify(c, budget))]
    if not found:
        raise _Skip(R_NO_VLLM, "no container runs the vLLM OpenAI server (vllm serve, "
                               "python -m vllm.entrypoints.openai.api_server, or a vLLM image); "
                               f"name it with the annotation {names.ANN_CONTAINER}")
    if len(found) > 1:
        raise _Deny(R_AMBIGUOUS,
                    "several containers run vLLM ("
                    + ", ".join(spec_containers[i]["name"] for i, _ in found)
                    + f"); name the one to inject with the annotation {names.ANN_CONTAINER}")
    return found[0]


# --- mode ----------------------------------------------------------------------------------

def _mode(ov: overrides.Overrides, policy: PolicyDefaults, image: str
          ) -> tuple[str, str, Optional[tuple[int, int, int]]]:
    version = contract.lmcache_version_from_image(image)
    if ov.mode:
        return ov.mode, f"annotation {names.ANN_MODE}", version
    if policy.mode:
        return policy.mode, "policy", version
    if version is not None:
        m = contract.mode_for_version(version)
        return m, f"image tag: LMCache {contract.fmt_version(version)}", version
    return policy.default_mode, "policy default (the image tag names no LMCache version)", None


# --- integers on the vLLM command line ------------------------------------------------------

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


# --- ports -----------------------------------------------------------------------------------

def _used_ports(spec: dict, target: dict, vllm_port: int) -> limits.PortSet:
    used = {vllm_port}
    for key in ("containers", "initContainers", "ephemeralContainers"):
        for c in spec.get(key) or []:
            if not isinstance(c, dict):
                continue
            for p in c.get("ports") or []:
                if not isinstance(p, dict):
                    continue
                if c is target and str(p.get("name", "")).startswith(names.PORT_NAME_PREFIX):
                    continue  # kvmesh's own ports from an earlier injection are re-chosen
                for k in ("containerPort", "hostPort"):
                    if isinstance(p.get(k), int):
                        used.add(p[k])
    return limits.PortSet(used)


def _pick(start: int, used: limits.PortSet) -> int:
    try:
        return used.pick(start)
    except limits.NoFreePort as e:
        raise _Deny(R_MALFORMED, f"cannot place kvmesh's ports: {e}") from None


# --- env -----------------------------------------------------------------------------------

def _pod_ip_var(env: list[dict]) -> Optional[str]:
    for e in env:
        vf = e.get("valueFrom")
        if (isinstance(vf, dict) and isinstance(vf.get("fieldRef"), dict)
                and vf["fieldRef"].get("fieldPath") == contract.POD_IP_FIELD
                and isinstance(e.get("name"), str)):
            return e["name"]
    return None


def _entry(spec: contract.EnvSpec) -> dict:
    if spec.field_path:
        return {"name": spec.name, "valueFrom": {"fieldRef": {"fieldPath": spec.field_path}}}
    return {"name": spec.name, "value": spec.value}


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


def _apply_env(c: dict, specs: list[contract.EnvSpec], pod_ip_var: str, create_ip_var: bool,
               instance_ok: tuple[str, ...], warnings: list[str]) -> list[dict]:
    env = [dict(e) for e in (c.get("env") or [])]
    names_seen: dict[str, int] = {}
    deduped = []
    for e in env:  # no duplicate names, ever: keep the last (the one the kubelet would use)
        n = e.get("name")
        if n in names_seen:
            deduped[names_seen[n]] = e
            warnings.append(f"kvmesh removed a duplicate definition of {n} (the later one wins)")
            continue
        names_seen[n] = len(deduped)
        deduped.append(e)
    env = deduped
    ref = f"$({pod_ip_var})"
    if create_ip_var:
        env.insert(0, {"name": pod_ip_var,
                       "valueFrom": {"fieldRef": {"fieldPath": contract.POD_IP_FIELD}}})
    index = {e.get("name"): i for i, e in enumerate(env)}
    ip_at = index[pod_ip_var]
    appended: list[dict] = []
    for spec in specs:
        want = _entry(spec)
        idx = index.get(spec.name)
        if idx is None:
            appended.append(want)
            continue
        old = env[idx]
        keep = False
        problem = None
        if spec.name == "LMCACHE_LMCACHE_INSTANCE_ID":
            keep = _field_path(old) in instance_ok and "value" not in old
            if not keep:
                problem = ("the id must come from the pod's identity "
                           f"({' or '.join(instance_ok)}); " + spec.why)
        elif old == want:
            keep = True
        elif spec.tuning:
            if "valueFrom" in old and "value" not in old:
                keep = True  # from a ConfigMap/Secret: the user's value, not checkable here
            elif isinstance(old.get("value"), str):
                problem = spec.check(old["value"]) if spec.check else None
                keep = problem is None
                if not keep and spec.name == "LMCACHE_MAX_LOCAL_CPU_SIZE":
                    gb = contract.quantity_to_gb(old["value"])
                    if gb is not None:
                        want = {"name": spec.name, "value": contract.format_gb(gb)}
                        problem += f"; converted to {want['value']} GB"
        if keep:
            continue
        warnings.append(_replace_message(spec, old, problem))
        if ref in str(want.get("value", "")) and idx < ip_at:
            # $(VAR) only sees variables defined earlier: move it after the pod IP variable.
            env[idx] = None
            appended.append(want)
        else:
            env[idx] = want
    return [e for e in env if e is not None] + appended


# --- the decision ---------------------------------------------------------------------------

def _decide(pod: dict, ctx: Context, warnings: list[str]) -> Result:
    # Copy on write: only the objects on the path to what changes are copied (metadata, its
    # annotations and labels, spec, the containers list, the target container); everything
    # else is shared with the input, which is never modified. Sharing also lets the patch
    # diff skip unchanged subtrees by identity.
    pod = dict(pod)
    meta = pod["metadata"] = dict(_dict(pod, "metadata", ""))
    annotations = meta["annotations"] = dict(_str_map(_dict(meta, "annotations", "metadata"),
                                                      "metadata.annotations"))
    labels = dict(_str_map(_dict(meta, "labels", "metadata", create=False), "metadata.labels"))
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        raise _Deny(R_MALFORMED, "spec must be an object")
    spec = pod["spec"] = dict(spec)
    containers = _containers(spec, "containers")
    if not containers:
        raise _Deny(R_MALFORMED, "spec.containers is empty")
    _containers(spec, "initContainers")
    try:
        ov = overrides.parse(annotations, labels)
    except overrides.InvalidOverride as e:
        raise _Deny(R_INVALID_ANNOTATION, str(e)) from None

    opt = labels.get(names.LABEL_INJECT)
    if opt == names.INJECT_DISABLED:
        raise _Skip(R_OPTED_OUT, f"label {names.LABEL_INJECT}={names.INJECT_DISABLED}")
    if opt != names.INJECT_ENABLED and not ctx.selected:
        raise _Skip(R_NOT_OPTED_IN, f"no label {names.LABEL_INJECT}={names.INJECT_ENABLED} and "
                                    "neither the namespace nor a policy selects the pod")

    idx, ln = _find_container(containers, ov)
    containers = spec["containers"] = list(containers)
    c = containers[idx] = dict(containers[idx])
    image = str(c.get("image", ""))
    mode, mode_reason, version = _mode(ov, ctx.policy, image)
    res = Result(INJECT, R_INJECTED, "", pod, warnings, mode, mode_reason, c["name"])

    def skip(reason: str, message: str) -> Result:
        _set_status(annotations, {"injected": False, "reason": reason, "message": message,
                                  "mode": mode, "modeReason": mode_reason,
                                  "container": c["name"]})
        res.action, res.reason, res.message = SKIP, reason, message
        return res

    if ln.script_error:
        return skip(R_SCRIPT, f"container {c['name']!r}: cannot edit its shell script safely "
                              f"({ln.script_error}); start vLLM with command/args, or add "
                              f"{contract.KV_TRANSFER_FLAG} to the script yourself")

    flags = launch.parse_flags(ln.words)
    env_list = c.get("env") or []
    if len(env_list) > limits.MAX_ENV_ENTRIES:
        return skip(R_LIMIT, f"container {c['name']!r} has {len(env_list):,} env entries; "
                             f"kvmesh edits containers with at most {limits.MAX_ENV_ENTRIES:,}")
    if flags.has_config_file:
        warnings.append("vLLM reads a --config file kvmesh cannot see: keep tensor/pipeline "
                        "parallel 1 and no other kv-transfer-config there")
    tp = _flag_int(flags.tp, "--tensor-parallel-size", env_list, warnings)
    pp = _flag_int(flags.pp, "--pipeline-parallel-size", env_list, warnings)
    dp = _flag_int(flags.dp, "--data-parallel-size", env_list, warnings)
    if dp > 1:
        return skip(R_DATA_PARALLEL, f"container {c['name']!r} runs --data-parallel-size {dp}: "
                                     "several LMCache engines in one pod would share one "
                                     "address (LMCache#919)")
    ranks = tp * pp
    if ranks > 1:
        if not ov.allow_parallel:
            return skip(R_PARALLEL, f"container {c['name']!r} runs tensor-parallel {tp} x "
                                    f"pipeline-parallel {pp}; LMCache P2P is broken for more "
                                    "than one rank (LMCache#2405, #1861); set "
                                    f"{names.ANN_ALLOW_PARALLEL}: \"true\" to inject anyway")
        if ranks > limits.MAX_RANKS:
            return skip(R_LIMIT, f"container {c['name']!r} runs tensor-parallel {tp} x "
                                 f"pipeline-parallel {pp} = {ranks:,} ranks; kvmesh configures "
                                 f"at most {limits.MAX_RANKS} ranks (three ports each) per pod")
        warnings.append(f"{names.ANN_ALLOW_PARALLEL}: injecting for {ranks} ranks although "
                        "upstream LMCache P2P does not work across ranks (LMCache#2405)")

    # --- connector
    user_kv: Optional[dict] = None
    if flags.kv_transfer is not None:
        try:
            user_kv = json.loads(flags.kv_transfer)
        except ValueError:
            raise _Deny(R_BAD_KV_CONFIG, f"container {c['name']!r}: {contract.KV_TRANSFER_FLAG} "
                                         f"{flags.kv_transfer!r} is not valid JSON") from None
        if not isinstance(user_kv, dict):
            raise _Deny(R_BAD_KV_CONFIG, f"container {c['name']!r}: {contract.KV_TRANSFER_FLAG} "
                                         "must be a JSON object")
    if flags.kv_transfer_dotted:
        user_kv = {**(user_kv or {}), **flags.kv_transfer_dotted}
    v0 = mode == names.MODE_REDIS and version is not None and version < contract.V0_CONNECTOR_BELOW
    if user_kv is not None:
        connector = user_kv.get("kv_connector")
        if connector not in contract.LMCACHE_CONNECTORS:
            return skip(R_FOREIGN_CONNECTOR,
                        f"container {c['name']!r} already uses kv_connector {connector!r}; "
                        "kvmesh does not replace another connector")
        if connector == contract.CONNECTOR_V0 and mode == names.MODE_CONTROLLER:
            raise _Deny(R_CONNECTOR_CONFLICT,
                        f"container {c['name']!r} uses the V0 {contract.CONNECTOR_V0}, which needs "
                        f"LMCache < 0.3.0 (redis mode), but the mode is controller ({mode_reason}); "
                        f"set {names.ANN_MODE}: redis or use {contract.CONNECTOR_V1}")
        v0 = connector == contract.CONNECTOR_V0

    # --- ports
    host_network = spec.get("hostNetwork") is True
    vllm_port = _flag_int(flags.port, "--port", env_list, warnings) if flags.port else \
        contract.VLLM_DEFAULT_PORT
    used = _used_ports(spec, c, vllm_port)
    pol = ctx.policy
    ports: list[tuple[str, int]] = []
    dist = init = look = work = ()
    if mode == names.MODE_REDIS:
        d = _pick(pol.distributed_port, used)
        dist = (d,)
        ports.append((names.PORT_NAME_DISTRIBUTED, d))
    else:
        init = tuple(_pick(pol.p2p_init_port + r, used) for r in range(ranks))
        look = tuple(_pick(pol.p2p_lookup_port + r, used) for r in range(ranks))
        work = tuple(_pick(pol.worker_port + r, used) for r in range(ranks))
        for r in range(ranks):
            ports += [(names.PORT_NAME_INIT.format(rank=r), init[r]),
                      (names.PORT_NAME_LOOKUP.format(rank=r), look[r]),
                      (names.PORT_NAME_WORKER.format(rank=r), work[r])]

    # --- env
    pod_ip_var = _pod_ip_var(env_list)
    create_ip_var = pod_ip_var is None
    pod_ip_var = pod_ip_var or names.POD_IP_VAR
    reuse_names = _reuses_names(pod, ctx)
    instance_field = contract.INSTANCE_FROM_UID if reuse_names else contract.INSTANCE_FROM_NAME
    instance_ok = (contract.INSTANCE_FROM_UID,) if reuse_names else \
        (contract.INSTANCE_FROM_UID, contract.INSTANCE_FROM_NAME)
    group = ov.group or pol.group
    namespace = ctx.namespace or str(meta.get("namespace") or "default")
    plan = contract.Plan(
        mode=mode, pod_ip_var=pod_ip_var,
        lookup_host=names.lookup_host(mode, group, namespace),
        redis_address=pol.redis_address, distributed_port=dist[0] if dist else 0,
        init_ports=init, lookup_ports=look, worker_ports=work, redis_port=pol.redis_port,
        pull_port=pol.controller_pull_port, reply_port=pol.controller_reply_port,
        cpu_cache_gb=ov.cpu_cache_gb or pol.cpu_cache_gb, chunk_size=pol.chunk_size,
        hash_seed=pol.hash_seed, heartbeat_seconds=pol.heartbeat_seconds,
        worker_timeout_seconds=pol.worker_timeout_seconds, instance_field=instance_field,
        v0_connector=v0)
    specs = contract.env_specs(plan)
    if c.get("envFrom"):
        shadowed = [s.name for s in specs if s.tuning
                    and not any(e.get("name") == s.name for e in env_list)]
        if shadowed:
            warnings.append(f"container {c['name']!r} has envFrom: kvmesh's values for "
                            f"{', '.join(shadowed)} in env take precedence over envFrom; set "
                            "them in env to choose your own")
    theirs = set(contract.GENERATION_VARS[contract.other_mode(mode)]) - \
        set(contract.GENERATION_VARS[mode])
    for e in env_list:
        n = e.get("name")
        if n in theirs:
            warnings.append(f"{n} belongs to the other LMCache generation and is ignored or "
                            f"harmful in {mode} mode; remove it")
        elif n in contract.BROKEN_ALIASES:
            warnings.append(f"{n} is a deprecated alias LMCache 0.5.x drops; remove it")
    c["env"] = _apply_env(c, specs, pod_ip_var, create_ip_var, instance_ok, warnings)
    _check_memory(c, warnings)

    # --- container ports
    declared = [p for p in _list(c, "ports", "container")
                if not str(p.get("name", "")).startswith(names.PORT_NAME_PREFIX)]
    for name, number in ports:
        entry = {"name": name, "containerPort": number, "protocol": "TCP"}
        if host_network:
            entry["hostPort"] = number  # lets the scheduler keep two replicas off one node
        declared.append(entry)
    c["ports"] = declared

    # --- vLLM flag
    if user_kv is None:
        value = contract.kv_transfer_json(contract.CONNECTOR_V0 if v0 else contract.CONNECTOR_V1)
        if ln.form in ("exec", "args-only"):
            c["args"] = list(c.get("args") or []) + [contract.KV_TRANSFER_FLAG, value]
        elif ln.form == "shell":
            holder = c[ln.script_field] = list(c[ln.script_field])
            holder[ln.script_index] = launch.insert_into_script(
                holder[ln.script_index], ln.script, contract.KV_TRANSFER_FLAG, value)
        else:
            warnings.append(f"kvmesh found no vLLM command in container {c['name']!r}; add "
                            f"{contract.KV_TRANSFER_FLAG} '{value}' to its vLLM command line")

    # The controller watches injected pods by this label (one watch, no annotation scans).
    meta["labels"] = labels
    labels[names.LABEL_PEER_GROUP] = names.group_id(mode, group)
    status = {"injected": True, "mode": mode, "modeReason": mode_reason,
              "container": c["name"], "group": group, "version": __version__,
              "hash": _hash(mode, c)}
    if ctx.policy_name:
        status["policy"] = ctx.policy_name
    _set_status(annotations, status)
    res.message = f"injected {mode} mode into container {c['name']!r} ({mode_reason})"
    return res


def _reuses_names(pod: dict, ctx: Context) -> bool:
    """True when a later pod may carry this pod's name (StatefulSets, fixed-name pods)."""
    if ctx.owner_kind is not None:
        return ctx.owner_kind in ("StatefulSet", "Pod")
    meta = pod.get("metadata") or {}
    for o in meta.get("ownerReferences") or []:
        if isinstance(o, dict) and o.get("kind") == "StatefulSet":
            return True
    return not meta.get("generateName")


def _check_memory(c: dict, warnings: list[str]) -> None:
    cache_gb = None
    for e in c.get("env") or []:
        if e.get("name") == "LMCACHE_MAX_LOCAL_CPU_SIZE" and isinstance(e.get("value"), str):
            try:
                cache_gb = float(e["value"])
            except ValueError:
                return
    limit = ((c.get("resources") or {}).get("limits") or {}).get("memory")
    if cache_gb is None or not isinstance(limit, (str, int)):
        return
    limit_gb = contract.quantity_to_gb(str(limit))
    if limit_gb is not None and cache_gb >= limit_gb:
        warnings.append(f"container {c['name']!r}: the LMCache CPU cache ({cache_gb} GB) does not "
                        f"fit in its memory limit ({limit}); the pod would be OOM-killed")


def _set_status(annotations: dict, status: dict) -> None:
    annotations[names.ANN_STATUS] = orjson.dumps(status, option=orjson.OPT_SORT_KEYS).decode()


def _hash(mode: str, c: dict) -> str:
    """Digest of what kvmesh controls in the container; equal across re-injections."""
    # Unsorted JSON is deterministic here (kvmesh builds these values in a fixed order) and
    # an order of magnitude cheaper than a sorted dump or repr.
    material = (mode, c.get("env"), c.get("ports"), c.get("command"), c.get("args"))
    digest = hashlib.sha256(orjson.dumps(material)).hexdigest()
    return "sha256:" + digest[:16]
