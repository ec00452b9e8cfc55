"""Per-group hash seeds, checked with LMCache's own chunk hashing (lmcache 0.5.6 in the vLLM
0.33 env: the controller generation's consumer stack, with vLLM's init_none_hash).

Each pod's injected env (kubelet-expanded) becomes a real process environment; LMCache reads
its config from it and hashes the same tokens. Members of one group must compute the same
keys (or they share nothing); another group, or the same group name in another namespace,
must compute different ones (so a prefix cached there cannot be confirmed from here).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from consumers import HERE, PROBE_TIMEOUT_S, VLLM_VERSION, _child_env, env_python, \
    kubelet_expand
from kvmesh.core import hashseed, names
from kvmesh.core.inject import Context, decide

pytestmark = pytest.mark.consumers

KEY = bytes(range(32))
TOKENS = list(range(1000, 1000 + 3 * 16))  # three chunks of 16


def _pod(name: str, namespace: str, group: str = "") -> dict:
    ann = {names.ANN_GROUP: group} if group else {}
    return {"metadata": {"name": name, "namespace": namespace, "annotations": ann,
                         "labels": {names.LABEL_INJECT: names.INJECT_ENABLED}},
            "spec": {"containers": [{"name": "vllm", "image": "lmcache/vllm-openai:v0.5.6",
                                     "command": ["vllm", "serve", "m"]}]}}


def _process_env(name: str, namespace: str, group: str = "") -> dict[str, str]:
    r = decide(_pod(name, namespace, group), Context(namespace, hash_seed_key=KEY))
    assert r.action == "inject", r.message
    c = r.pod["spec"]["containers"][0]
    pod = {**r.pod, "status": {"podIP": "10.1.2.3"}}
    env = kubelet_expand(c["env"], pod)
    # Only what the hashing reads: the seed and LMCache's settings (no controller to reach).
    return {k: v for k, v in env.items() if k == "PYTHONHASHSEED" or k.startswith("LMCACHE_")
            and "CONTROLLER" not in k and "P2P" not in k} | {"LMCACHE_CHUNK_SIZE": "16"}


def _hash_all(envs: dict[str, dict[str, str]]) -> dict[str, dict]:
    """One real LMCache process per env, all at once (each imports torch and vLLM)."""
    py = env_python(f"vllm-{VLLM_VERSION}")
    procs = {k: subprocess.Popen([str(py), "-s", str(HERE / "probe_hash.py")],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=str(HERE),
                                 env=_child_env() | e, start_new_session=True)
             for k, e in envs.items()}
    out = {}
    try:
        for k, p in procs.items():
            stdout, stderr = p.communicate(json.dumps({"tokens": TOKENS}),
                                          timeout=PROBE_TIMEOUT_S)
            assert p.returncode == 0, stderr[-3000:]
            out[k] = json.loads(stdout)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def test_members_share_keys_and_other_groups_do_not():
    envs = {"a1": _process_env("vllm-a-1", "team-a"),
            "a2": _process_env("vllm-a-2", "team-a"),
            "b": _process_env("vllm-b-1", "team-a", group="b"),
            "other-ns": _process_env("vllm-a-1", "team-b")}
    seeds = {k: e["PYTHONHASHSEED"] for k, e in envs.items()}
    assert seeds["a1"] == seeds["a2"] == str(hashseed.derive(KEY, "team-a",
                                                              "controller-default"))
    assert len({seeds["a1"], seeds["b"], seeds["other-ns"]}) == 3, seeds
    got = _hash_all(envs)
    assert all(g["algorithm"] == "builtin" for g in got.values())  # LMCache's default
    assert len(got["a1"]["hashes"]) == 3
    assert got["a1"]["hashes"] == got["a2"]["hashes"]  # peers find each other's chunks
    # Not one chunk key in common with another group, here or in another namespace.
    for other in ("b", "other-ns"):
        assert not set(got["a1"]["hashes"]) & set(got[other]["hashes"]), other
        assert got["a1"]["none_hash"] != got[other]["none_hash"]
