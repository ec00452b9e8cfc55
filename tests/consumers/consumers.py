"""Drive the REAL consumers of kvmesh's output from the main test venv.

Stdlib only.  The consumers live in cached virtualenvs built by
``tests/consumers/setup_envs.sh`` (their versions conflict, so one venv each);
each call below runs one probe subprocess for a whole batch of cases.

- ``lmcache_parse(generation, envs)``: LMCache's config loader ("redis" -> lmcache
  0.3.6, "controller" -> lmcache 0.5.6), see probe_lmcache.py.
- ``vllm_parse(cases)``: vLLM's ``vllm serve`` / api_server argument parser plus
  KVTransferConfig and the KV connector registry, see probe_vllm.py.
- ``kubelet_expand(container_env, pod)``: pure-Python model of how the kubelet
  turns a container's ``env`` list into the process environment.

A missing venv is an error (never a skip): run ``tests/consumers/setup_envs.sh``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
SETUP_SCRIPT = "tests/consumers/setup_envs.sh"
VLLM_VERSION = os.environ.get("KVMESH_VLLM_VERSION", "0.33.0")
GENERATIONS = {"redis": "lmcache-0.3.6", "controller": "lmcache-0.5.6"}
PROBE_TIMEOUT_S = float(os.environ.get("KVMESH_PROBE_TIMEOUT", "600"))


class ConsumerEnvMissing(RuntimeError):
    """The cached venv hosting a consumer does not exist (or is incomplete)."""


class ProbeFailed(RuntimeError):
    """A probe subprocess crashed or printed something that is not its JSON answer."""


def cache_root() -> Path:
    return Path(os.environ.get("KVMESH_CACHE") or Path.home() / ".cache" / "kvmesh")


def env_dir(name: str) -> Path:
    return cache_root() / "envs" / name


def env_python(name: str) -> Path:
    d = env_dir(name)
    py = d / "bin" / "python"
    if not (py.exists() and (d / ".kvmesh-spec").exists()):
        raise ConsumerEnvMissing(
            f"consumer venv {name!r} is missing at {d}; create it with: "
            f"bash {SETUP_SCRIPT} {name}   (or `bash {SETUP_SCRIPT}` for all envs)"
        )
    return py


def _child_env(extra_pythonpath: list[Path] | None = None) -> dict[str, str]:
    # A clean environment: nothing of the test process (LMCACHE_*, PYTHONHASHSEED,
    # VLLM_*, PYTHONPATH, ...) leaks into the consumer.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        # no telemetry, no hub access
        "LMCACHE_TRACK_USAGE": "false",
        "DO_NOT_TRACK": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    if extra_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in extra_pythonpath)
    return env


def run_probe(
    env_name: str, script: str, payload: dict, extra_pythonpath: list[Path] | None = None
) -> dict:
    """Run HERE/script with env_name's python, JSON payload on stdin; return its JSON."""
    py = env_python(env_name)
    proc = subprocess.run(
        [str(py), "-s", str(HERE / script)],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env=_child_env(extra_pythonpath),
        cwd=str(HERE),
        timeout=PROBE_TIMEOUT_S,
    )
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        answer = None
    if proc.returncode != 0 or not isinstance(answer, dict):
        raise ProbeFailed(
            f"{script} in {env_name} exited {proc.returncode}; "
            f"stdout={proc.stdout[-2000:]!r}; stderr tail:\n{proc.stderr[-4000:]}"
        )
    return answer


# ---------------------------------------------------------------- LMCache


def lmcache_probe(generation: str, envs: list[dict[str, str]]) -> dict:
    """Full probe answer: lmcache_version, loader, import_warnings, results."""
    try:
        name = GENERATIONS[generation]
    except KeyError:
        raise ValueError(f"generation must be one of {sorted(GENERATIONS)}, got {generation!r}")
    extra = [HERE / "torch_standin"] if name == "lmcache-0.3.6" else None
    payload = {"cases": [{"env": dict(e)} for e in envs]}
    return run_probe(name, "probe_lmcache.py", payload, extra)


def lmcache_parse(generation: str, envs: list[dict[str, str]]) -> list[dict]:
    """One result per env: {"ok": True, "config": {...}, "warnings": [...]} or
    {"ok": False, "stage": ..., "error": "Type: message", "warnings": [...]}."""
    return lmcache_probe(generation, envs)["results"]


# ---------------------------------------------------------------- vLLM


def vllm_probe(cases: list[dict]) -> dict:
    return run_probe(f"vllm-{VLLM_VERSION}", "probe_vllm.py", {"cases": list(cases)})


def vllm_parse(cases: list[dict]) -> list[dict]:
    """Cases are {"argv": [...]} or {"shell": "..."}; see probe_vllm.py."""
    return vllm_probe(cases)["results"]


# ---------------------------------------------------------------- kubelet


def _expand(value: str, lookup) -> str:
    """Kubernetes `$(VAR)` expansion (semantics of the kubelet's
    third_party/forked/golang/expansion): `$$` -> `$`; `$(NAME)` -> lookup or
    the literal `$(NAME)`; `$(` without `)` and `$x` stay literal."""
    out: list[str] = []
    i, n = 0, len(value)
    while i < n:
        ch = value[i]
        if ch != "$" or i + 1 >= n:
            out.append(ch)
            i += 1
            continue
        nxt = value[i + 1]
        if nxt == "$":  # escaped operator
            out.append("$")
            i += 2
        elif nxt == "(":
            close = value.find(")", i + 2)
            if close < 0:  # incomplete reference: keep "$(" and go on after it
                out.append("$(")
                i += 2
            else:
                name = value[i + 2 : close]
                found = lookup(name)
                out.append(found if found is not None else f"$({name})")
                i = close + 1
        else:  # `$` not starting an expression: keep it and the next char
            out.append("$" + nxt)
            i += 2
    return "".join(out)


_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.*)'\]$")


def _format_map(m: dict) -> str:
    # fieldpath.FormatMap: sorted `key="value"` lines (Go %q quoting ~ JSON here)
    return "\n".join(f"{k}={json.dumps(str(m[k]))}" for k in sorted(m))


def _field_ref(path: str, pod: dict) -> str:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    simple = {
        "metadata.name": lambda: meta.get("name", ""),
        "metadata.namespace": lambda: meta.get("namespace", ""),
        "metadata.uid": lambda: meta.get("uid", ""),
        "metadata.labels": lambda: _format_map(meta.get("labels") or {}),
        "metadata.annotations": lambda: _format_map(meta.get("annotations") or {}),
        "spec.nodeName": lambda: spec.get("nodeName", ""),
        "spec.serviceAccountName": lambda: spec.get("serviceAccountName", ""),
        "status.hostIP": lambda: status.get("hostIP", ""),
        "status.hostIPs": lambda: ",".join(
            x.get("ip", "") for x in status.get("hostIPs") or [{"ip": status.get("hostIP", "")}]
        ),
        "status.podIP": lambda: status.get("podIP", ""),
        "status.podIPs": lambda: ",".join(
            x.get("ip", "") for x in status.get("podIPs") or [{"ip": status.get("podIP", "")}]
        ),
    }
    if path in simple:
        return str(simple[path]())
    m = _SUBSCRIPT.match(path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    raise ValueError(f"fieldRef.fieldPath {path!r} is not supported by the kubelet")


def kubelet_expand(
    container_env: list[dict],
    pod: dict,
    preset: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment the kubelet gives a container for its `env` list.

    - Entries are processed in order; a non-empty `value` is `$(VAR)`-expanded
      against the variables defined so far (earlier entries, plus `preset`,
      which stands for resolved envFrom / service-link variables) -- never
      against later entries.  Unresolvable references stay literal.
    - `valueFrom.fieldRef` is resolved from `pod` (metadata.*, spec.nodeName,
      status.podIP/hostIP, ...) and is NOT expanded; other valueFrom kinds
      (configMapKeyRef, secretKeyRef, resourceFieldRef) are skipped.
    - A later entry with the same name overrides the earlier value.
    """
    env: dict[str, str] = dict(preset or {})
    for item in container_env:
        name = item["name"]
        value = item.get("value") or ""
        if value:
            value = _expand(value, env.get)
        elif item.get("valueFrom"):
            vf = item["valueFrom"]
            if vf.get("fieldRef"):
                value = _field_ref(vf["fieldRef"]["fieldPath"], pod)
            else:
                continue
        env[name] = value
    return env


__all__ = [
    "ConsumerEnvMissing",
    "ProbeFailed",
    "cache_root",
    "env_dir",
    "env_python",
    "kubelet_expand",
    "lmcache_parse",
    "lmcache_probe",
    "run_probe",
    "vllm_parse",
    "vllm_probe",
]

if __name__ == "__main__":  # tiny CLI: python consumers.py redis < envs.json
    gen = sys.argv[1]
    data = json.load(sys.stdin)
    if gen == "vllm":
        print(json.dumps(vllm_probe(data), indent=2))
    else:
        print(json.dumps(lmcache_probe(gen, data), indent=2))
