"""Decide and mutate: one pod (or pod template) in, a decision and the mutated pod out.

Pure: no I/O, no clocks, no randomness. The webhook, the offline CLI and the tests all call
`decide`, so every path injects byte-identical configuration. Re-running `decide` on its own
output changes nothing (the webhook's reinvocationPolicy: IfNeeded relies on it).

`decide` runs the pod through PIPELINE, one named step after another:

    prepare -> opt_in -> target -> evidence -> other_injector -> image -> roles
            -> offloading -> connector -> elsewhere -> mode -> mp_gate -> understood
            -> parallelism -> memory -> ports -> env -> container_ports -> flag -> mp_server
            -> stamp

(mp_gate and mp_server act in mp mode only; the mp plan itself is kvmesh.core.mp.)

Each step reads what earlier steps found on a `_Pod` and adds to it. A step ends the pipeline
by raising `_Deny` (the pod is refused) or `_Skip` (admitted untouched; once the pod is opted
in, with the reason and message in the status annotation and the reason in the
kvmesh.dev/skipped label, which the controller watches). The rule: kvmesh
injects only what it fully understands. The steps from other_injector to understood each
name one thing it does not, in the order a user should fix them (what no setting can change
first). The reasons, and what a user does about each new one, are named once below.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import orjson

from kvmesh import __version__

from kvmesh.core import names
from kvmesh.core import contract, hashseed, images, launch, limits, mp, overrides
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
R_OTHER_INJECTOR = "other-injector"
R_IMAGE = "image-unsupported"
R_DISAGG = "disaggregated-prefill"
R_NATIVE_OFFLOAD = "vllm-native-offloading"
R_KV_UNKNOWN = "kv-transfer-config-unknown"
R_ELSEWHERE = "lmcache-configured-elsewhere"
R_MODE_UNKNOWN = "mode-unknown"
R_MODE_UNSUPPORTED = "mode-unsupported"
R_ARGS_UNKNOWN = "vllm-args-unknown"
R_CACHE_FIT = "cache-does-not-fit"
R_SEED = "hash-seed-unavailable"  # the group's PYTHONHASHSEED cannot be known yet
R_MP_VERSION = "lmcache-version-unsupported"  # mp asked for, image's LMCache < 0.5.0
R_NO_SIDECARS = "native-sidecars-unsupported"  # mp asked for, cluster without native sidecars
# Denial reasons.
R_INVALID_ANNOTATION = "invalid-annotation"
R_AMBIGUOUS = "ambiguous-container"
R_CONTAINER_NOT_FOUND = "container-not-found"
R_CONNECTOR_CONFLICT = "connector-mode-conflict"
R_MODE_CONFLICT = "mode-evidence-conflict"
R_NOT_VLLM_SERVER = "container-not-a-vllm-server"
R_BAD_KV_CONFIG = "invalid-kv-transfer-config"
R_MALFORMED = "malformed-pod"

# What the user does about each of the newer skips (the message says what was found).
ADVICE = {
    R_OTHER_INJECTOR: "kvmesh leaves pods another injector manages alone; remove the "
                      "kvmesh.dev/inject label or the other injector's",
    R_IMAGE: f"use an image that runs LMCache (lmcache/vllm-openai, vllm/vllm-openai >= "
             f"v0.9.2 on CUDA), or set {names.ANN_IMAGE_SUPPORTED}: \"true\" if this one does",
    R_DISAGG: "prefill/decode pods exchange KV through their own connector and LMCache "
              "refuses P2P beside it (\"PD only supports enable_p2p=False\"); kvmesh leaves "
              "them alone",
    R_NATIVE_OFFLOAD: "vLLM then replaces the kv-transfer-config kvmesh would set; remove "
                      "those settings to share KV through kvmesh",
    R_KV_UNKNOWN: "kvmesh cannot see which connector it names at admission; give "
                  f"{contract.KV_TRANSFER_FLAG} literally, or remove it to let kvmesh set it",
    R_ELSEWHERE: "kvmesh would cut that setup off; remove those variables to share KV "
                 "through kvmesh",
    R_MODE_UNKNOWN: "",
    R_MODE_UNSUPPORTED: "",
    R_ARGS_UNKNOWN: "give vLLM's flags literally, or through env values kvmesh can read",
    R_CACHE_FIT: f"raise the memory limit or set a smaller {names.ANN_CPU_CACHE_GB}",
}
OTHER_INJECTOR_PREFIX = "lmcache.ai/"  # LMCache's operator (label lmcache.ai/lmcache-inject)


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
    # The key of per-group hash seeds (kvmesh.core.hashseed). Without it a group's own seed
    # is unknown here: PYTHONHASHSEED is left for the webhook to set (offline CLI), or, with
    # `hash_seed_pending` (a webhook whose key has not loaded), the pod is skipped (R_SEED).
    hash_seed_key: Optional[bytes] = None
    hash_seed_pending: bool = False
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
                 "kv_problem", "pod_modes", "choice", "cache_gb", "cache_max", "cache_note",
                 "mp")

    def __init__(self, pod: dict, ctx: Context, warnings: list[str]):
        self.pod, self.ctx, self.warnings = pod, ctx, warnings
        self.c: Optional[dict] = None  # the target container (a copy), once known
        self.mode: Optional[str] = None
        self.mode_reason = ""


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
        if skip.reason in (R_NOT_OPTED_IN, R_OPTED_OUT):  # not kvmesh's pod: untouched
            return Result(SKIP, skip.reason, str(skip), pod, warnings)
        # An opted-in pod always says why it was not injected (the controller takes an
        # opted-in pod without status for one the webhook never saw).
        name = s.c["name"] if s.c is not None else None
        # The label lets the controller watch skipped pods by selector, whatever opted them in.
        s.meta["labels"] = s.labels
        s.labels[names.LABEL_SKIPPED] = skip.reason
        _set_status(s.annotations, {"injected": False, "reason": skip.reason,
                                    "message": str(skip), "mode": s.mode,
                                    "modeReason": s.mode_reason, "container": name})
        return Result(SKIP, skip.reason, str(skip), s.pod, warnings, s.mode, s.mode_reason,
                      name)
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


# --- target: the vLLM container and how it starts (its effective argv) ----------------------

def target(s: _Pod) -> None:
    idx, ln = _find_container(s.containers, s.ov)
    containers = s.spec["containers"] = list(s.containers)
    c = s.c = containers[idx] = dict(containers[idx])
    s.launch = ln
    s.flags = ln.flags
    s.env_in = c.get("env") or []
    if len(s.env_in) > limits.MAX_ENV_ENTRIES:
        raise _Skip(R_LIMIT, f"container {c['name']!r} has {len(s.env_in):,} env entries; "
                             f"kvmesh edits containers with at most {limits.MAX_ENV_ENTRIES:,}")


def _literal_env(c: dict) -> launch.Env:
    """The container's env values known at admission (not valueFrom), for expansions."""
    env = c.get("env") or ()
    if len(env) > limits.MAX_ENV_ENTRIES:
        return ()
    return tuple((e["name"], e["value"]) for e in env
                 if isinstance(e.get("name"), str) and isinstance(e.get("value"), str))


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
    return launch.classify(command, args, str(c.get("image", "")), _literal_env(c))


def _find_container(containers: list[dict], ov: overrides.Overrides
                    ) -> tuple[int, launch.Launch]:
    budget = [limits.MAX_SCRIPT_BYTES_PER_POD]
    if ov.container:
        for i, c in enumerate(containers):
            if c["name"] == ov.container:
                return i, _classify(c, budget) or _named(c)
        raise _Deny(R_CONTAINER_NOT_FOUND,
                    f"annotation {names.ANN_CONTAINER}={ov.container!r} names no container of "
                    f"this pod; containers: {', '.join(c['name'] for c in containers)}")
    found = [(i, ln) for i, c in enumerate(containers) if (ln := _classify(c, budget))]
    if not found:
        runs = "; ".join(f"{c['name']!r} runs {_runs(c)}" for c in containers[:4])
        raise _Skip(R_NO_VLLM, "no container runs the vLLM OpenAI server (vllm serve, "
                               "python -m vllm.entrypoints.openai.api_server, or args to an "
                               f"image whose entrypoint is the server): {runs}; if one does, "
                               f"name it with the annotation {names.ANN_CONTAINER}")
    if len(found) > 1:
        raise _Deny(R_AMBIGUOUS,
                    "several containers run vLLM ("
                    + ", ".join(containers[i]["name"] for i, _ in found)
                    + f"); name the one to inject with the annotation {names.ANN_CONTAINER}")
    return found[0]


def _runs(c: dict) -> str:
    return launch.runs(c.get("command") or (), c.get("args") or (), str(c.get("image", "")))


def _named(c: dict) -> launch.Launch:
    """A container the annotation names although it runs no vLLM server kvmesh can see: the
    user's request cannot be honoured (kvmesh could not put its flag on vLLM's command line).
    Args to an entrypoint kvmesh does not know count as unknown too: the fix is a command."""
    unknown = "" if c.get("command") else (
        " (kvmesh does not know that image's entrypoint: if it is vLLM, give the command, "
        "`vllm serve MODEL ...`)")
    raise _Deny(R_NOT_VLLM_SERVER,
                f"annotation {names.ANN_CONTAINER}={c['name']!r} names a container that runs "
                f"{_runs(c)}, not the vLLM OpenAI server{unknown}; name the container that "
                f"runs vLLM (kvmesh adds {contract.KV_TRANSFER_FLAG} to its command line), or "
                "remove the annotation")


# --- evidence: the user's kv-transfer-config and the LMCache generation ---------------------

def evidence(s: _Pod) -> None:
    """Read what the pod says (no decision yet: the steps below raise in their order)."""
    s.user_kv, s.kv_problem = _user_kv(s.flags)
    s.pod_modes = _pod_modes(s.user_kv, s.flags, s.env_in)
    s.choice = choose_mode(s.ov, s.ctx.policy, str(s.c.get("image", "")), s.pod_modes)
    s.mode, s.mode_reason, s.version = s.choice.mode, s.choice.reason, s.choice.version


def _user_kv(flags: launch.Flags) -> tuple[Optional[dict], Optional[tuple[str, str]]]:
    raw = flags.kv_transfer
    if raw is not None and "$" in raw:
        return None, (R_KV_UNKNOWN, f"{contract.KV_TRANSFER_FLAG} {raw[:80]!r} is computed when "
                                    "the container starts")
    user_kv: Optional[dict] = None
    if raw is not None:
        try:
            user_kv = json.loads(raw)
        except ValueError:
            return None, (R_BAD_KV_CONFIG, f"{contract.KV_TRANSFER_FLAG} {raw!r} is not valid "
                                           "JSON")
        if not isinstance(user_kv, dict):
            return None, (R_BAD_KV_CONFIG, f"{contract.KV_TRANSFER_FLAG} must be a JSON object")
    if flags.kv_transfer_dotted:
        user_kv = {**(user_kv or {}), **flags.kv_transfer_dotted}
    return user_kv, None


def _connectors(kv: Optional[dict]) -> list[dict]:
    """The connector and, for a MultiConnector, the ones it combines."""
    if not kv:
        return []
    out = [kv]
    extra = kv.get("kv_connector_extra_config")
    if isinstance(extra, dict) and isinstance(extra.get("connectors"), list):
        out += [c for c in extra["connectors"] if isinstance(c, dict)]
    return out


def _pod_modes(kv: Optional[dict], flags: launch.Flags, env_in: list[dict]
               ) -> tuple[tuple[str, str], ...]:
    """(mode, field) for every part of the pod's own configuration that names a generation:
    first what vLLM loads (a connector only one generation provides), then env variables
    only one generation reads (left-overs are harmless, so they never contradict)."""
    found = []
    # First: kvmesh's own MP connector flag joins it on re-injection, and the evidence
    # recorded (modeReason) must not change then.
    if (flags.offload_backend or "").lower() == contract.OFFLOAD_BACKEND_LMCACHE:
        found.append((names.MODE_MP, f"--kv-offloading-backend {flags.offload_backend}"))
    for conn in _connectors(kv):
        kind = conn.get("kv_connector")
        if kind == contract.CONNECTOR_V0:
            found.append((names.MODE_REDIS, f"{contract.KV_TRANSFER_FLAG} kv_connector {kind} "
                                            "(V0, LMCache < 0.3.0)"))
        elif kind == contract.CONNECTOR_MP:
            found.append((names.MODE_MP, f"{contract.KV_TRANSFER_FLAG} kv_connector {kind}"))
    for e in env_in:
        if e.get("name") in contract.REDIS_GENERATION_MARKERS:
            found.append((names.MODE_REDIS, f"env {e['name']}"))
    return tuple(found)


@dataclass(frozen=True)
class ModeChoice:
    mode: Optional[str]
    reason: str  # which evidence decided (recorded as modeReason)
    version: Optional[tuple[int, int, int]] = None
    problem: Optional[tuple[str, str, str]] = None  # (action, reason, message) for step `mode`


def choose_mode(ov: overrides.Overrides, policy: PolicyDefaults, image: str,
                pod: tuple[tuple[str, str], ...]) -> ModeChoice:
    """The LMCache generation from the best evidence: annotation > policy > the pod's own MP
    configuration > image tag > the pod's other configuration > policy default. The pod's configuration is what it will run, so
    a choice it contradicts (or that contradicts itself) is refused, naming the fields."""
    tag_mode, tag_why, version = images.lmcache_generation(image)
    if ov.mode:
        mode, why = ov.mode, f"annotation {names.ANN_MODE}"
    elif policy.mode:
        mode, why = policy.mode, "policy"
    elif any(m == names.MODE_MP for m, _ in pod):
        # LMCache's MP connector (or vLLM's lmcache offloading backend) is the pod's own
        # choice of generation; whether the image's LMCache has it is step mp_gate's question.
        mode, why = names.MODE_MP, "pod configuration: " + next(
            f for m, f in pod if m == names.MODE_MP)
    elif tag_mode == "":
        return ModeChoice(None, tag_why, None, (SKIP, R_MODE_UNKNOWN, (
            f"{tag_why}; kvmesh cannot tell which LMCache generation it carries: set "
            f"{names.ANN_MODE} to redis or controller")))
    elif tag_mode:
        mode, why = tag_mode, tag_why
    elif pod:
        mode, why = pod[0][0], f"pod configuration: {pod[0][1]}"
    else:
        mode, why = policy.default_mode, "policy default (the image tag names no LMCache version)"
    disagree = [f"{f} needs {m} mode" for m, f in pod if m != mode and not f.startswith("env ")]
    if disagree:
        return ModeChoice(mode, why, version, (DENY, _conflict_reason(disagree), (
            f"{'; '.join(disagree)}, but the mode is {mode} ({why}); make them agree: set "
            f"{names.ANN_MODE} to the generation the image runs and use that generation's "
            "connector")))
    if mode not in names.MODES:
        return ModeChoice(mode, why, version, (SKIP, R_MODE_UNSUPPORTED, (
            f"{why} means LMCache's {mode} mode, which this kvmesh does not inject")))
    return ModeChoice(mode, why, version)


def _conflict_reason(fields: list[str]) -> str:
    return R_CONNECTOR_CONFLICT if any("kv_connector" in f for f in fields) else R_MODE_CONFLICT


# --- the pod's own setup: things kvmesh does not understand are skips, each with its reason --

def other_injector(s: _Pod) -> None:
    keys = sorted(k for d in (s.labels, s.annotations) for k in d
                  if k.startswith(OTHER_INJECTOR_PREFIX))
    if keys:
        raise _Skip(R_OTHER_INJECTOR, f"the pod carries {', '.join(keys[:3])}: LMCache's operator "
                                      "configures its LMCache; " + ADVICE[R_OTHER_INJECTOR])


def image(s: _Pod) -> None:
    c = s.c
    img = str(c.get("image", ""))
    env_names = frozenset(e.get("name") for e in s.env_in if isinstance(e.get("name"), str))
    plat, plat_why = images.platform(img, c.get("resources") or {}, env_names)
    why = images.unsupported(img, plat, plat_why)
    if why and not s.ov.image_supported:
        raise _Skip(R_IMAGE, f"container {c['name']!r}: {why}; " + ADVICE[R_IMAGE])


def roles(s: _Pod) -> None:
    found = [f"kv_role {conn.get('kv_role')} ({conn.get('kv_connector')})"
             for conn in _connectors(s.user_kv) if conn.get("kv_role") in contract.PD_ROLES]
    for e in s.env_in:
        n, v = e.get("name"), e.get("value")
        if n in contract.PD_ENV and (not isinstance(v, str) or n.endswith("_ROLE")
                                     or contract.is_true(v)):
            found.append(f"env {n}" + (f"={v}" if isinstance(v, str) else ""))
    if found:
        raise _Skip(R_DISAGG, f"container {s.c['name']!r} is part of a disaggregated prefill "
                              f"setup ({', '.join(found[:3])}); " + ADVICE[R_DISAGG])


def offloading(s: _Pod) -> None:
    f = s.flags
    backend = (f.offload_backend or "").lower()
    found = []
    if f.offload_size is not None and backend != contract.OFFLOAD_BACKEND_LMCACHE:
        found.append(f"--kv-offloading-size {f.offload_size}")
    if f.offload_backend is not None and backend != contract.OFFLOAD_BACKEND_LMCACHE:
        found.append(f"--kv-offloading-backend {f.offload_backend}")
    found += [f"kv_connector {conn.get('kv_connector')}" for conn in _connectors(s.user_kv)
              if conn.get("kv_connector") in contract.NATIVE_OFFLOAD_CONNECTORS]
    if found:
        raise _Skip(R_NATIVE_OFFLOAD, f"container {s.c['name']!r} uses vLLM's own KV offloading "
                                      f"({', '.join(found)}); " + ADVICE[R_NATIVE_OFFLOAD])


def connector(s: _Pod) -> None:
    name = s.c["name"]
    if s.kv_problem:
        reason, why = s.kv_problem
        if reason == R_BAD_KV_CONFIG:
            raise _Deny(reason, f"container {name!r}: {why}")
        raise _Skip(reason, f"container {name!r}: {why}; " + ADVICE[reason])
    kind = (s.user_kv or {}).get("kv_connector")
    if s.user_kv is not None and kind not in contract.LMCACHE_CONNECTORS + (contract.CONNECTOR_MP,):
        raise _Skip(R_FOREIGN_CONNECTOR, f"container {name!r} already uses kv_connector "
                                         f"{kind!r}; kvmesh does not replace another connector")


def elsewhere(s: _Pod) -> None:
    # kvmesh's lookup Services of any group (a template re-injected into another group
    # carries the old group's address, which kvmesh then rewrites).
    own = tuple(names.lookup_service_name(m, "") for m in (names.MODE_CONTROLLER,
                                                            names.MODE_REDIS, names.MODE_MP))
    redis = s.ctx.policy.redis_address
    found = []
    for e in s.env_in:
        n = e.get("name")
        if n in contract.OWN_ADDRESS_VARS:
            v = e.get("value")
            if not isinstance(v, str):
                found.append(f"{n} from valueFrom")
            elif v and v != redis and not _host(v).startswith(own):
                found.append(f"{n}={v}")
        elif n in contract.OTHER_TIER_VARS and (e.get("value") or "valueFrom" in e):
            found.append(f"{n}={e.get('value', '(valueFrom)')}")
    if found:
        raise _Skip(R_ELSEWHERE, f"container {s.c['name']!r}: LMCache is already configured "
                                 f"toward something kvmesh does not run ({', '.join(found[:3])}); "
                                 + ADVICE[R_ELSEWHERE])
    # The shell's own assignment (`export LMCACHE_X=...`, `LMCACHE_X=... vllm serve`) wins over
    # the container env kvmesh would inject, so such a script configures LMCache itself.
    assigned = list(dict.fromkeys(_SCRIPT_ASSIGN.findall(_script(s))))
    if assigned:
        raise _Skip(R_ELSEWHERE, f"container {s.c['name']!r}: its script sets LMCache variables "
                                 f"itself ({', '.join(assigned[:3])}), which would override what "
                                 "kvmesh injects; " + ADVICE[R_ELSEWHERE])


def _script(s: _Pod) -> str:
    """The `sh -c` script the target container runs (where target's launch found it), or ''."""
    ln = s.launch
    if ln is None or ln.form != "shell" or ln.script_field not in ("command", "args"):
        return ""
    holder = s.c.get(ln.script_field) or []
    w = holder[ln.script_index] if ln.script_index < len(holder) else None
    return w if isinstance(w, str) else ""


_SCRIPT_ASSIGN = re.compile(r"(?:^|[\s;&|(`])(LMCACHE_[A-Za-z0-9_]+)=")


def _host(url: str) -> str:
    rest = url.split("://", 1)[-1]
    return rest.rsplit(":", 1)[0] if ":" in rest else rest


def mode(s: _Pod) -> None:
    if s.choice.problem:
        action, reason, message = s.choice.problem
        message = f"container {s.c['name']!r}: {message}"
        raise (_Deny if action == DENY else _Skip)(reason, message)
    problem = mp.conflict(s.mode, s.user_kv, s.flags)  # e.g. LMCacheConnectorV1 under mp
    if problem:
        raise _Deny(R_CONNECTOR_CONFLICT, f"container {s.c['name']!r} {problem} "
                                          f"({s.mode_reason})")
    s.v0 = any(conn.get("kv_connector") == contract.CONNECTOR_V0
               for conn in _connectors(s.user_kv)) or (
        s.mode == names.MODE_REDIS and s.version is not None
        and s.version < contract.V0_CONNECTOR_BELOW)


def understood(s: _Pod) -> None:
    ln, name = s.launch, s.c["name"]
    if ln.script_error:
        raise _Skip(R_SCRIPT, f"container {name!r}: cannot edit its shell script safely "
                              f"({ln.script_error}); start vLLM with command/args, or add "
                              f"{contract.KV_TRANSFER_FLAG} to the script yourself")
    if ln.unresolved:
        raise _Skip(R_ARGS_UNKNOWN, f"container {name!r}: vLLM's command line holds "
                                    f"{', '.join(map(repr, ln.unresolved[:3]))}, known only "
                                    "when the container starts, which may set flags kvmesh "
                                    "must see; " + ADVICE[R_ARGS_UNKNOWN])


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
    flags = s.flags
    name, warnings = s.c["name"], s.warnings
    if flags.has_config_file:
        warnings.append("vLLM reads a --config file kvmesh cannot see: keep tensor/pipeline "
                        "parallel 1 and no other kv-transfer-config there")
    tp = _flag_int(flags.tp, "--tensor-parallel-size", name, warnings)
    pp = _flag_int(flags.pp, "--pipeline-parallel-size", name, warnings)
    dp = _flag_int(flags.dp, "--data-parallel-size", name, warnings)
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


def _flag_int(raw: Optional[str], flag: str, name: str, warnings: list[str]) -> int:
    if raw is None:
        return 1
    if "$" in raw:
        raise _Skip(R_ARGS_UNKNOWN, f"container {name!r}: {flag} {raw!r} is known only when the "
                                    "container starts; " + ADVICE[R_ARGS_UNKNOWN])
    try:
        return int(raw)
    except ValueError:
        warnings.append(f"kvmesh cannot read {flag} {raw!r}; assuming 1")
        return 1


# --- memory: the CPU cache fits the container's memory ---------------------------------------

def memory(s: _Pod) -> None:
    c, pol = s.c, s.ctx.policy
    s.cache_gb, s.cache_max, s.cache_note = s.ov.cpu_cache_gb or pol.cpu_cache_gb, 0.0, None
    limit, which = _memory_of(c)
    mem_gb = contract.memory_gb(limit) if limit is not None else None
    if mem_gb is None:
        return
    headroom = contract.CACHE_HEADROOM_GB + _vllm_cpu_kv_gb(s.env_in)
    fit = mem_gb - headroom
    if fit < contract.MIN_CACHE_GB:
        raise _Skip(R_CACHE_FIT, f"container {c['name']!r}: its memory {which} {limit} leaves "
                                 f"{max(fit, 0):.1f} GB after {headroom:g} GB of headroom for "
                                 f"vLLM and the engine, less than {contract.MIN_CACHE_GB:g} GB "
                                 "of LMCache CPU cache; " + ADVICE[R_CACHE_FIT])
    # The bound also replaces a user's LMCACHE_MAX_LOCAL_CPU_SIZE above it (env step). The
    # note depends on the annotation/policy size only, so re-injection reproduces it.
    s.cache_max = math.floor(fit * 2) / 2
    if s.cache_gb > s.cache_max:
        s.cache_note = (f"container {c['name']!r}: LMCache CPU cache reduced from "
                        f"{s.cache_gb:g} GB to {s.cache_max:g} GB to fit its memory {which} "
                        f"{limit} with {headroom:g} GB of headroom for vLLM and the engine")
        s.cache_gb = s.cache_max
        s.warnings.append(s.cache_note)


def _memory_of(c: dict) -> tuple[Optional[str], str]:
    res = c.get("resources") or {}
    for which in ("limits", "requests"):
        q = (res.get(which) or {}).get("memory") if isinstance(res.get(which), dict) else None
        if isinstance(q, (str, int)):
            return str(q), which[:-1]
    return None, ""


def _vllm_cpu_kv_gb(env_in: list[dict]) -> float:
    for e in env_in:  # vLLM's CPU backend holds its own KV cache of this many GiB
        if e.get("name") == "VLLM_CPU_KVCACHE_SPACE" and isinstance(e.get("value"), str):
            try:
                return round(float(e["value"]) * 2**30 / 1e9, 3)
            except ValueError:
                return 0.0
    return 0.0


# --- ports: free ports for LMCache, avoiding every port the pod already uses -----------------

def ports(s: _Pod) -> None:
    pol = s.ctx.policy
    used = _used_ports(s.spec, s.c, _vllm_port(s))
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


def _vllm_port(s: _Pod) -> int:
    raw = s.flags.port
    if raw is None:
        return contract.VLLM_DEFAULT_PORT
    try:
        return int(raw)
    except ValueError:
        s.warnings.append(f"kvmesh cannot read vLLM's --port {raw!r} at admission; its own "
                          f"ports avoid {contract.VLLM_DEFAULT_PORT} and every port the pod "
                          "declares, so declare vLLM's port on the container")
        return contract.VLLM_DEFAULT_PORT


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
        cpu_cache_gb=s.cache_gb, max_cpu_cache_gb=s.cache_max, chunk_size=pol.chunk_size,
        hash_seed=_hash_seed(s, namespace, group), heartbeat_seconds=pol.heartbeat_seconds,
        worker_timeout_seconds=pol.worker_timeout_seconds,
        instance_field=contract.INSTANCE_FROM_UID if reuse_names
        else contract.INSTANCE_FROM_NAME,
        v0_connector=s.v0)


def _hash_seed(s: _Pod, namespace: str, group: str) -> Optional[int]:
    """The group's PYTHONHASHSEED; never a guess: peers with different seeds share nothing."""
    seed = hashseed.for_group(s.ctx.policy.hash_seed, s.ctx.hash_seed_key, namespace,
                              names.group_id(s.mode, group))
    if seed is None and not any(e.get("name") == "PYTHONHASHSEED" and (
            "value" not in e or contract.check_hash_seed(str(e["value"])) is None)
            for e in s.env_in if isinstance(e, dict)):  # no usable value of the user's either
        if s.ctx.hash_seed_pending:
            raise _Skip(R_SEED, f"the peer group's PYTHONHASHSEED is derived from Secret "
                        f"{names.SYSTEM_NAMESPACE}/{names.HASH_SEED_SECRET}, which the webhook "
                        "has not read yet (the kvmesh controller creates it); recreate the pod "
                        "once the webhook is ready")
        note = ("PYTHONHASHSEED not set: each peer group has its own, which the webhook sets "
                "at admission (or set hashSeed in the policy)")
        if note not in s.warnings:  # mp mode asks twice: for vLLM and for its server
            s.warnings.append(note)
    return seed


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
        if gb is not None and spec.check(contract.format_gb(gb)) is None:
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
    # A Pod document is judged by its own metadata, as the webhook judges the pod it receives.
    if ctx.owner_kind is not None and ctx.owner_kind != "Pod":
        return ctx.owner_kind == "StatefulSet"
    for o in meta.get("ownerReferences") or []:
        if isinstance(o, dict) and o.get("kind") == "StatefulSet":
            return True
    return not meta.get("generateName")


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
    else:  # shell: after the vLLM command's last word, so after a "$@" it passes
        holder = c[ln.script_field] = list(c[ln.script_field])
        holder[ln.script_index] = launch.insert_into_script(
            holder[ln.script_index], ln.script, contract.KV_TRANSFER_FLAG, value)


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
        chunk_size=pol.chunk_size, hash_seed=_hash_seed(s, namespace, ov.group or pol.group),
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
        mp.unplace(s.spec)  # a template injected in mp mode before
        return
    mp.place(s.spec, mp.sidecar(s.mp, s.c))  # the plan the flag step made


# --- stamp: the peer-group label and the status annotation -----------------------------------

def stamp(s: _Pod) -> None:
    group = s.ov.group or s.ctx.policy.group
    # The controller watches injected pods by this label (one watch, no annotation scans).
    s.meta["labels"] = s.labels
    s.labels[names.LABEL_PEER_GROUP] = names.group_id(s.mode, group)
    s.labels.pop(names.LABEL_SKIPPED, None)  # a template skipped before, now injected
    if s.ranks > 1:  # only now: a pod skipped later must not read "injecting"
        s.warnings.append(f"{names.ANN_ALLOW_PARALLEL}: injecting for {s.ranks} ranks although "
                          "upstream LMCache P2P does not work across ranks (LMCache#2405)")
    status = {"injected": True, "mode": s.mode, "modeReason": s.mode_reason,
              "container": s.c["name"], "group": group, "version": __version__,
              "hash": _hash(s.mode, s.c, s.spec.get("initContainers"))}
    if s.ctx.policy_name:
        status["policy"] = s.ctx.policy_name
    if s.cache_note:  # an adjustment the owner should see (the controller makes it an Event)
        status["adjusted"] = s.cache_note
    _set_status(s.annotations, status)


def _set_status(annotations: dict, status: dict) -> None:
    annotations[names.ANN_STATUS] = orjson.dumps(status, option=orjson.OPT_SORT_KEYS).decode()


def _hash(mode: str, c: dict, inits: Optional[list] = None) -> str:
    """Digest of what kvmesh controls in the container (and mp mode's server sidecar); equal
    across re-injections."""
    # Unsorted JSON is deterministic here (kvmesh builds these values in a fixed order) and
    # an order of magnitude cheaper than a sorted dump or repr.
    material: tuple = (mode, c.get("env"), c.get("ports"), c.get("command"), c.get("args"))
    if mode == names.MODE_MP:
        material += tuple(x for x in inits or () if x.get("name") == names.MP_SIDECAR)
    digest = hashlib.sha256(orjson.dumps(material)).hexdigest()
    return "sha256:" + digest[:16]


PIPELINE = (prepare, opt_in, target, evidence, other_injector, image, roles, offloading,
            connector, elsewhere, mode, mp_gate, understood, parallelism, memory, ports, env,
            container_ports, flag, mp_server, stamp)
