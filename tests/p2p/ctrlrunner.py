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
               "KVMESH_TEST_LOOP_WAKE_MS": "2"}


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
