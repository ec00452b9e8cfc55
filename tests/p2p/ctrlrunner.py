"""TEST CODE: run pods as real LMCache 0.5.6 controller-mode engines, and the real
`lmcache_controller`, for tests/p2p/test_p2p_controller_mode.py.

Engines: tests/p2p/engine_node_ctrl.py in the `vllm-0.33.0` venv, NIXL from the
`nixl-1.5.1-cu13` overlay (PYTHONPATH), environment = the pod's vLLM container env expanded as
the kubelet would (podrunner.pod_environment) plus the HARNESS variables below, stated as such:
  - UCX_TLS=tcp,self, UCX_NET_DEVICES=lo: UCX over TCP on loopback (no RDMA here, and only
    loopback may carry test traffic);
  - PYTHONPATH=<nixl overlay>: NIXL is not part of the vllm venv (image contents, not config);
  - LMCACHE_TRACK_USAGE is injected by kvmesh already; DO_NOT_TRACK=1 as a second guard;
  - KVMESH_TEST_LOOP_WAKE_MS=2: turns on engine_node_ctrl.py's STAND-IN 4 (the loop waker,
    a work-around for LMCache 0.5.6's cross-event-loop controller lookup; see that file and
    docs/controller-mode-on-cpu.md). Read by test code only, never by LMCache.
  - KVMESH_TEST_POD_NETNS=1: turns on engine_node_ctrl.py's STAND-IN 3 (the pod network
    namespace of LMCache's worker RPC endpoint), needed only because these engines share the
    host's network namespace. Read by test code only; real pods (tests/node) run without it.
Cluster DNS stand-in: kvmesh injects the controller address as the lookup Service's name
(`kvmesh-lmcache-<group>.<ns>.svc`). There is no cluster DNS here, so each engine runs in its own
mount namespace (`unshare -m`, root) where /etc/hosts is bind-mounted with one line mapping that
name to the lookup pod's IP (the Service's only endpoint). Nothing in the env is rewritten.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import podrunner  # noqa: E402
from podrunner import EngineError, EngineProcess, consumers  # noqa: E402

ENGINE_ENV = "vllm-0.33.0"
NIXL_ENV = "nixl-1.5.1-cu13"
NODE_SCRIPT = HERE / "engine_node_ctrl.py"
# (no PYTHONNOUSERSITE: the engine runs as `python -s`, which is the same switch)
HARNESS_ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo", "DO_NOT_TRACK": "1",
               "KVMESH_TEST_LOOP_WAKE_MS": "2", "KVMESH_TEST_POD_NETNS": "1"}


def nixl_site() -> Path:
    d = consumers.env_dir(NIXL_ENV)
    sp = sorted((d / "lib").glob("python3*/site-packages"))
    if not (d / ".kvmesh-spec").exists() or not sp or not (sp[0] / "nixl").is_dir():
        raise consumers.ConsumerEnvMissing(
            f"NIXL overlay {NIXL_ENV!r} missing at {d}; create it with: "
            f"bash {consumers.SETUP_SCRIPT} {ENGINE_ENV} {NIXL_ENV}")
    return sp[0]


def engine_python() -> Path:
    nixl_site()
    return consumers.env_python(ENGINE_ENV)


def hosts_prefix(hosts: dict[str, str], workdir: Path) -> list[str]:
    """argv prefix: a private mount namespace whose /etc/hosts maps `hosts` (name -> IP)."""
    if not shutil.which("unshare"):
        raise EngineError("unshare (util-linux) is needed for the cluster DNS stand-in")
    f = workdir / f"hosts-{os.getpid()}-{time.monotonic_ns()}"
    f.write_text("127.0.0.1 localhost\n" + "".join(f"{ip} {n}\n" for n, ip in hosts.items()))
    return ["unshare", "-m", "sh", "-c", f'mount --bind "{f}" /etc/hosts && exec "$@"', "sh"]


class CtrlEngine(EngineProcess):
    """EngineProcess (same protocol and lifecycle) for a controller-mode engine."""

    def __init__(self, env: dict[str, str], name: str, pod_ip: str, log_dir: Path,
                 hosts: Optional[dict[str, str]] = None):
        import itertools
        import queue
        import threading
        self.pod_name, self.pod_ip = name, pod_ip
        self.env = {**env, **HARNESS_ENV, "PYTHONPATH": str(nixl_site())}
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"engine-{name}-{int(time.time() * 1000)}.log"
        self._log = open(self.log_path, "wb")
        argv = [*(hosts_prefix(hosts, log_dir) if hosts else []), str(engine_python()), "-s",
                str(NODE_SCRIPT)]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=self.env, cwd=str(HERE),
                                     start_new_session=True)
        self._lines = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._ids = itertools.count(1)
        self.ready = {}
        self.frozen = False

    @classmethod
    def for_pod(cls, pod: dict, log_dir: Path, hosts: Optional[dict[str, str]] = None
                ) -> "CtrlEngine":
        return cls(podrunner.pod_environment(pod), pod["metadata"]["name"],
                   pod["status"]["podIP"], log_dir, hosts)


# --- the scenario's checks, shared by tests/p2p/test_p2p_controller_mode.py (engines as local
# processes) and tests/node/test_p2p_ctrl_real.py (engines as real pods). An engine here is
# anything with `.call(cmd, timeout=None, **args)`, `.ready` (its ready line) and `.pod_ip`.

from scenario import CHUNK  # noqa: E402  (the fake model's chunk = kvmesh's default chunk size)
from support import wait_for  # noqa: E402

IMAGE = "lmcache/vllm-openai:v0.3.9"  # the webhook picks controller mode from this version
CHUNKS = 8
TOKENS = CHUNKS * CHUNK
CALL_S = 10  # every data-path call is bounded
WARM_S = 45  # LMCache's startup full sync: 10 s heartbeat delay + <=5 s jitter + a 5 s poll


def wait_warm(*engines, bound: float = WARM_S) -> float:
    """Wait until each engine is past LMCache's startup full sync. A worker that registers
    while the controller is fresh (its `need_full_sync_all` window) gets a FullSyncCommand with
    its first heartbeat (sent lmcache_worker_heartbeat_delay_time = 10 s after start); it then
    enters freeze mode, in which stores are skipped silently and lookups stay local, until the
    controller confirms the sync (status polled every 5 s). Warm = two heartbeat answers seen
    (so a command in the first one has been acted on), every full sync started has finished,
    and not frozen. Returns seconds waited."""
    t0 = time.monotonic()

    def warm():
        st = [e.call("stats") for e in engines]
        return all(x["ok"] and x["heartbeats"] >= 2 and x["full_syncs"][0] == x["full_syncs"][1]
                   and not x["frozen"] for x in st)
    wait_for("engines past LMCache's startup full sync", warm, bound, 0.25)
    return time.monotonic() - t0


def fetch_once_indexed(b, seed: int, tokens: int, bound: float = 5.0) -> dict:
    """B's fetch, repeated while it is a clean miss: LMCache reports stored chunks to the
    controller asynchronously (batched admit messages), so a lookup right after A's store can
    miss. Returns the first hit, with `misses` (clean misses before it) and `index_ms`."""
    t0, misses = time.monotonic(), 0
    while True:
        got = b.call("fetch", seed=seed, tokens=tokens, timeout=CALL_S)
        assert got["ok"], got
        if got["hit"] or time.monotonic() - t0 > bound:
            got["misses"], got["index_ms"] = misses, (time.monotonic() - t0) * 1000
            return got
        misses += 1
        time.sleep(0.05)


def assert_share(a, b, seed: int) -> dict:
    """A stores; B finds A through the controller and reads A's chunks over NIXL."""
    stored = a.call("store", seed=seed, tokens=TOKENS, timeout=CALL_S)
    assert stored["ok"] and stored["local_hit"] == TOKENS and len(stored["keys"]) == CHUNKS, stored
    # B computes the same chunk keys (asserted, so a silent zero-hit run fails loudly)
    assert b.call("keys", seed=seed, tokens=TOKENS)["keys"] == stored["keys"]
    served = a.call("stats")["served"]
    got = fetch_once_indexed(b, seed, TOKENS)
    assert got["local_hit_before"] == 0  # B had nothing ...
    # ... the controller named A (instance id, its p2p_host:init port) for all chunks ...
    assert got["controller"] == [a.ready["instance_id"], "LocalCPUBackend", CHUNKS,
                                 f"{a.pod_ip}:{a.ready['init_ports'][0]}"], got
    # ... and B now holds A's exact bytes, read from A (A served the batched get, B did not)
    assert got["hit"] == TOKENS and got["retrieved"] == TOKENS and got["equal"], got
    assert got["sha256"] == stored["sha256"]
    assert a.call("stats")["served"] - served == 1 and got["self_served"] == 0
    print(f"\nB fetched {CHUNKS} chunks ({TOKENS} tokens, 16 MiB) from A: lookup+NIXL read "
          f"{got['lookup_ms']:.1f} ms, copy into KV buffer {got['retrieve_ms']:.1f} ms "
          f"({got['misses']} clean misses while the controller indexed A's chunks)",
          file=sys.stderr)
    return got


def clean_miss(b, seed: int, t0: float, bound: float) -> tuple[Optional[float], list]:
    """B's fetch until it is a clean miss *answered by the controller* (0 chunks)."""
    seen = []
    while time.monotonic() - t0 < bound:
        r = b.call("fetch", seed=seed, tokens=TOKENS, timeout=5)
        seen.append(r)
        if r.get("ok") and r["hit"] == 0 and r["retrieved"] == 0 and r["controller"] and \
                r["controller"][2] == 0:
            return time.monotonic() - t0, seen
        time.sleep(0.05)
    return None, seen
