"""TEST CODE: run mp-mode pods of the control plane as real LMCache 0.5.6 processes (the
"kubelet + container runtime" for them), for tests/p2p/test_p2p_mp.py and bench/p2p.py.

- `CoordinatorPod`: the group's coordinator pod, which kvmesh's controller created (Deployment
  kvmesh-mp-<group>, scheduled by the scheduler, given a loopback pod IP by KWOK), run as
  `lmcache coordinator` with exactly its container's command and args.
- `ServerPod`: a member's `kvm-lmcache-server` native sidecar, run with exactly its injected
  command (the incarnation wrapper, `sh -c`), args ($(VAR)-expanded by kubelet rules) and env.
- `DriverPod`: the vLLM side of a member: tests/p2p/mp_driver.py with LMCache's own client
  classes, connected where the injected `--kv-transfer-config` says (lmcache.mp.host/port).

Stand-ins, each for something that cannot exist here, and nothing else changed:
  1. THE IMAGE: `lmcache`, `python3` and `sh` resolve to the vllm-0.33.0 venv (lmcache 0.5.6)
     and the machine's shell, first on PATH; PYTHONPATH=<nixl overlay> is the image's
     `lmcache[nixl]` extra.
  2. THE POD'S NETWORK NAMESPACE: every pod here shares the machine's loopback, so what a pod
     binds on "all its interfaces" (0.0.0.0) or on its own loopback (127.0.0.1) is bound on its
     pod IP instead (a 127.64.x.y address KWOK assigned): these two addresses in the args and
     the connector's host are rewritten to the pod IP. Ports are left as injected.
  3. CLUSTER DNS: the coordinator URL names the Service (`kvmesh-mp-<group>.<ns>.svc`); each
     server runs in a private mount namespace whose /etc/hosts maps that name to the
     coordinator pod's IP, the Service's only endpoint (ctrlrunner.hosts_prefix, root).
  4. THE emptyDir VOLUME at names.MP_STATE_DIR (the incarnation counter): a per-pod directory
     of the test, substituted for that path in the wrapper (a container runtime would mount it
     there); it survives the sidecar's restarts as an emptyDir does.
  5. NO GPU, LOOPBACK ONLY: UCX_TLS=tcp,self, UCX_NET_DEVICES=lo; CPU KV tensors in the driver.
  6. NO KUBELET: a container restart is done by the test (kill the process group, start the
     same container again, patch restartCount in the pod status as the kubelet reports it).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "consumers"))
import consumers  # noqa: E402
import ctrlrunner  # noqa: E402
sys.path.insert(0, str(HERE.parent / "backends"))
from lmcache_mp import get_json  # noqa: E402,F401  (the backends tier's; also used by mpscenario)

from kvmesh.core import names  # noqa: E402

ENV = "vllm-0.33.0"
HARNESS_ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo", "DO_NOT_TRACK": "1",
               "LMCACHE_DISABLE_BANNER": "1", "PYTHONWARNINGS": "ignore",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_PROXY": "*",
               "no_proxy": "*"}
LOOPBACK, ANY = "127.0.0.1", "0.0.0.0"


class NotUp(RuntimeError):
    """A process exited or did not become ready in time (its log tail attached)."""


def venv_bin() -> Path:
    consumers.env_python(ENV)
    return consumers.env_dir(ENV) / "bin"


def image_env() -> dict[str, str]:
    """STAND-IN 1 (+5): what the image and runtime provide."""
    return {"PATH": f"{venv_bin()}:/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp",
            "LANG": "C.UTF-8", "PYTHONPATH": str(ctrlrunner.nixl_site()), **HARNESS_ENV}


def pod_network(value: str, pod_ip: str) -> str:
    """STAND-IN 2: the pod's own interfaces (all of them, or its loopback) are its pod IP."""
    for addr in (ANY, LOOPBACK):
        if value == addr:
            return pod_ip
        if value.endswith("=" + addr):
            return value[: -len(addr)] + pod_ip
        if value.startswith(addr + ":"):
            value = pod_ip + value[len(addr):]
        value = value.replace(f"={addr}:", f"={pod_ip}:").replace(f"//{addr}:", f"//{pod_ip}:")
        if value.endswith("//" + addr):
            value = value[: -len(addr)] + pod_ip
    return value


class _Proc:
    name = "process"

    def _start(self, argv: list[str], env: dict, log_path: Path, cwd: Path, **kw) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=kw.pop("stdout", self._log),
                                     stderr=subprocess.STDOUT if "stdin" not in kw else self._log,
                                     env=env, cwd=cwd, start_new_session=True, **kw)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL to the process group: a crash (nothing deregistered)."""
        self._signal(signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (a server deregisters itself), SIGKILL after `grace` s. Idempotent."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self._signal(signal.SIGKILL)  # anything the group left behind
        self._log.close()

    def wait(self, what: str, probe, timeout: float, stop: bool = True) -> float:
        """Until probe() is true; seconds since this process started. On failure the process
        is stopped (unless `stop` is False) and NotUp raised with its log tail."""
        deadline = time.monotonic() + timeout
        while not probe():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited rc={self.proc.returncode}" if self.proc.poll() is not None
                       else f"not {what} after {timeout:.0f} s")
                if stop:
                    self.stop()
                raise NotUp(f"{self.name} {why}:\n{self.tail()}")
            time.sleep(0.1)
        return time.monotonic() - self.t0


def container(pod: dict, name: str, init: bool = False) -> dict:
    key = "initContainers" if init else "containers"
    return next(c for c in pod["spec"].get(key) or [] if c["name"] == name)


def expand_argv(c: dict, env: dict) -> list[str]:
    """The kubelet's $(VAR) expansion of command and args against the container's env."""
    look = env.get
    return ([consumers._expand(w, look) for w in c.get("command") or []]
            + [consumers._expand(w, look) for w in c.get("args") or []])


class CoordinatorPod(_Proc):
    """The coordinator pod kvmesh's controller created, run as its container says."""

    name = "lmcache coordinator"

    def __init__(self, pod: dict, log_dir: Path, drop_flags: tuple[str, ...] = ()):
        """drop_flags: flags left out with their values (the "without kvmesh" baseline runs
        LMCache's own defaults for them)."""
        self.pod, self.ip = pod, pod["status"]["podIP"]
        c = pod["spec"]["containers"][0]
        env = {**consumers.kubelet_expand(c.get("env") or [], pod), **image_env()}
        argv = [pod_network(w, self.ip) for w in expand_argv(c, env)]
        for flag in drop_flags:
            if flag in argv:
                i = argv.index(flag)
                del argv[i:i + 2]
        self.argv = argv
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
        self.url = f"http://{self.ip}:{port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._start(self.argv, env, log_dir / f"coordinator-{self.ip}.log", log_dir)

    def wait_up(self, timeout: float = 120) -> float:
        return self.wait("healthy", lambda: get_json(f"{self.url}/healthz") ==
                         {"status": "healthy"}, timeout)

    def listed(self) -> dict[str, dict]:
        body = get_json(f"{self.url}/instances") or {}
        return {i["instance_id"]: i for i in body.get("instances", [])}


class ServerPod(_Proc):
    """One incarnation of a member's server sidecar. `state_dir` is the pod's emptyDir
    (STAND-IN 4): pass the same one to the next incarnation of the same pod."""

    name = "lmcache server"

    def __init__(self, pod: dict, coordinator_ip: str, state_dir: Path, log_dir: Path,
                 drop_env: tuple[str, ...] = (), bare: bool = False, listed=()):
        """bare: the "without kvmesh" baseline: `lmcache server` with the sidecar's args but
        without kvmesh's incarnation wrapper, so LMCache picks a random id per start and
        nothing deletes a predecessor; its id is learnt from the coordinator (`listed`: the
        ids registered before it started)."""
        self.pod, self.ip = pod, pod["status"]["podIP"]
        self.pod_name, self.uid = pod["metadata"]["name"], pod["metadata"]["uid"]
        c = container(pod, names.MP_SIDECAR, init=True)
        # drop_env: the "without kvmesh" baseline leaves LMCache's own defaults in place
        env = {k: v for k, v in consumers.kubelet_expand(c.get("env") or [], pod).items()
               if k not in drop_env}
        env = {**image_env(), **env}
        state_dir.mkdir(parents=True, exist_ok=True)
        if bare:
            c = {**c, "command": ["lmcache", "server"]}
        argv = [pod_network(w, self.ip) for w in expand_argv(c, env)]
        argv = [w.replace(names.MP_STATE_DIR + "/", f"{state_dir}/") for w in argv]
        self.bare, self.listed_before = bare, set(listed)
        self.args = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if "=" in a
                     and a.startswith("--")}
        self.http = f"http://{self.ip}:{self.args['--http-port']}"
        self.incarnation = int((state_dir / "incarnation").read_text() or 0) + 1 \
            if (state_dir / "incarnation").exists() else 1
        self.instance_id = None if bare else names.mp_instance_id(self.uid, self.incarnation)
        host = env["LMCACHE_COORDINATOR_URL"].split("//", 1)[1].rsplit(":", 1)[0]
        log_dir.mkdir(parents=True, exist_ok=True)
        prefix = ctrlrunner.hosts_prefix({host: coordinator_ip}, log_dir)
        self._start(prefix + argv, env,
                    log_dir / f"server-{self.pod_name}-{self.incarnation}.log", log_dir)

    def status(self) -> Optional[dict]:
        return get_json(f"{self.http}/status", timeout=2)

    def peers(self) -> list[str]:
        return list((self.status() or {}).get("p2p_peers") or [])

    def wait_registered(self, coordinator: CoordinatorPod, timeout: float = 240) -> float:
        def registered() -> bool:
            listed = coordinator.listed()
            if self.bare and self.instance_id is None:
                new = [i for i, e in listed.items()
                       if e.get("ip") == self.ip and i not in self.listed_before]
                self.instance_id = new[0] if new else None
            return self.instance_id in listed
        return self.wait("registered", registered, timeout)

    def wait_peers(self, ids: set[str], timeout: float = 60) -> float:
        """Until this server holds a P2P adapter for each of `ids` (its /status); a failure
        leaves the process running."""
        return self.wait(f"peered with {sorted(ids)}", lambda: ids <= set(self.peers()),
                         timeout, stop=False)


class DriverPod(_Proc):
    """The vLLM side of a member (mp_driver.py), connected where kvmesh's connector config
    points (lmcache.mp.host/port; STAND-IN 2 for the host)."""

    name = "mp driver"

    def __init__(self, pod: dict, vllm_container: str, log_dir: Path, chunk: int):
        self.pod_name, self.ip = pod["metadata"]["name"], pod["status"]["podIP"]
        extra = kv_connector_extra(container(pod, vllm_container))
        url = pod_network(f"{extra['lmcache.mp.host']}:{extra['lmcache.mp.port']}", self.ip)
        env = {**image_env(), "PYTHONHASHSEED": "0"}
        log_dir.mkdir(parents=True, exist_ok=True)
        self._start([str(venv_bin() / "python"), "-s", str(HERE / "mp_driver.py"),
                     json.dumps({"url": url, "chunk": chunk})], env,
                    log_dir / f"driver-{self.pod_name}-{time.time_ns()}.log", HERE,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.url = url
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._ids = itertools.count(1)
        self.ready: dict = {}

    def _pump(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self._lines.put(line.decode(errors="replace"))
        self._lines.put(None)

    def _read(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"driver {self.pod_name}: no answer in {timeout:.0f}s") from None
        if line is None:
            raise NotUp(f"driver {self.pod_name} exited:\n{self.tail()}")
        return json.loads(line)

    def wait_ready(self, timeout: float = 120) -> dict:
        self.ready = self._read(timeout)
        if not self.ready.get("ok"):
            raise NotUp(f"driver {self.pod_name}: {self.ready}")
        return self.ready

    def call(self, cmd: str, timeout: float = 60, **args) -> dict:
        self.proc.stdin.write((json.dumps({"cmd": cmd, **args}) + "\n").encode())  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._read(timeout)


def kv_connector_extra(c: dict) -> dict:
    """kv_connector_extra_config of the container's --kv-transfer-config (JSON form)."""
    words = [*(c.get("command") or []), *(c.get("args") or [])]
    for i, w in enumerate(words):
        if w == "--kv-transfer-config":
            return json.loads(words[i + 1])["kv_connector_extra_config"]
        if w.startswith("--kv-transfer-config="):
            return json.loads(w.split("=", 1)[1])["kv_connector_extra_config"]
    raise AssertionError(f"no --kv-transfer-config in {words}")
