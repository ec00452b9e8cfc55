"""TEST CODE: LMCache's MP-mode processes from the vllm-0.33.0 consumer venv (lmcache 0.5.6), for
tests/backends/test_coordinator.py.

- `Coordinator`: a real `lmcache coordinator` on a host and port, logging into a directory;
  `wait_up()` until `GET /healthz` answers (after the app's lifespan startup); `stop()` its
  process group.
- `Registrant`: `mp_registrant.py` in that venv, registering instances through LMCache's own
  `registrar.keep_registered` (what `lmcache server` runs); `terminate()` = clean shutdown (it
  deregisters), `crash()` = SIGKILL (nothing deregistered).

Every wait is bounded; a failed wait stops the process before raising, so nothing leaks.
Stdlib only (the readiness checks use urllib, not the kvmesh client under test).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "consumers"))
import consumers  # noqa: E402  (tests/consumers/consumers.py: consumer venv paths)

ENV = "vllm-0.33.0"
HERE = Path(__file__).resolve().parent


class NotUp(RuntimeError):
    """An MP process exited or did not become ready in time (its log tail attached)."""


def child_env() -> dict[str, str]:
    """A clean environment: nothing of the test process leaks in; no telemetry, no banner."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONWARNINGS": "ignore", "LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1",
            "LMCACHE_DISABLE_BANNER": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "NO_PROXY": "*", "no_proxy": "*"}


def get_json(url: str, timeout: float = 1.0):
    """GET url -> parsed JSON, or None if nothing answered (no proxies)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return json.loads(r.read(1 << 20))
    except (OSError, ValueError):
        return None


class _Proc:
    name = "process"

    def _start(self, argv: list[str], log_path: Path, cwd: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        try:
            self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                         env=child_env(), cwd=cwd, start_new_session=True)
        except BaseException:
            self._log.close()
            raise

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to its process group, SIGKILL after `grace` s. Idempotent."""
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()

    def crash(self) -> None:
        """SIGKILL to the process group (no clean shutdown)."""
        self._signal_group(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.close()

    def _wait(self, what: str, probe, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not probe():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited rc={self.proc.returncode}" if self.proc.poll() is not None
                       else f"not {what} after {timeout:.0f} s")
                self.stop()
                raise NotUp(f"{self.name} {why}:\n{self.tail()}")
            time.sleep(0.1)


class Coordinator(_Proc):
    """One `lmcache coordinator` on ip:port. Raises consumers.ConsumerEnvMissing (with the setup
    command) if the venv is absent."""

    name = "lmcache coordinator"

    def __init__(self, ip: str, port: int, log_dir: Path, *extra: str):
        consumers.env_python(ENV)  # the venv, checked as a whole
        exe = consumers.env_dir(ENV) / "bin" / "lmcache"
        if not exe.exists():
            raise consumers.ConsumerEnvMissing(
                f"{exe} missing: recreate the env with bash {consumers.SETUP_SCRIPT} {ENV}")
        self.url = f"http://{ip}:{port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._start([str(exe), "coordinator", "--host", ip, "--port", str(port), *extra],
                    log_dir / f"coordinator-{port}.log", log_dir)

    def wait_up(self, timeout: float = 90) -> None:
        self._wait("healthy", lambda: get_json(f"{self.url}/healthz") == {"status": "healthy"},
                   timeout)

    def listed(self) -> dict[str, dict]:
        """instance_id -> entry, read with urllib (independent of the client under test)."""
        body = get_json(f"{self.url}/instances") or {}
        return {i["instance_id"]: i for i in body.get("instances", [])}


class Registrant(_Proc):
    """mp_registrant.py registering `instances` (dicts of keep_registered's arguments)."""

    name = "mp_registrant"

    def __init__(self, coordinator: Coordinator, instances: list[dict], log_dir: Path,
                 heartbeat: float = 0.5, tag: str = "r"):
        py = consumers.env_python(ENV)
        self.coordinator, self.instances = coordinator, instances
        self.ids = [i["instance_id"] for i in instances]
        spec = {"coordinator": coordinator.url, "heartbeat": heartbeat, "instances": instances}
        self._start([str(py), "-s", str(HERE / "mp_registrant.py"), json.dumps(spec)],
                    log_dir / f"registrant-{tag}.log", log_dir)

    def wait_registered(self, timeout: float = 90) -> None:
        self._wait("registered", lambda: set(self.ids) <= set(self.coordinator.listed()), timeout)

    def registrations(self) -> list[str]:
        """Instance ids in the order the registrar announced (re-)registrations."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "registered" in rec:
                    out.append(rec["registered"])
        return out


NIXL_ENV = "nixl-1.5.1-cu13"


def nixl_site() -> Path:
    """The NIXL overlay (upstream's `lmcache[nixl]` extra) put on the server's PYTHONPATH; without
    it a P2P server exits with "NIXL is not available" (lmcache 0.5.6 nixl_impl.py:47-58)."""
    d = consumers.env_dir(NIXL_ENV)
    sp = sorted((d / "lib").glob("python3*/site-packages"))
    if not sp or not (d / ".kvmesh-spec").exists():
        raise consumers.ConsumerEnvMissing(
            f"NIXL overlay {NIXL_ENV!r} missing at {d}; create it with: "
            f"bash {consumers.SETUP_SCRIPT} {ENV} {NIXL_ENV}")
    return sp[0]


class Server(_Proc):
    """A real `lmcache server` with P2P on, configured the way docs/mp-mode.md §4.1 prescribes
    (listen on all interfaces, advertise `ip` through LMCACHE_COORDINATOR_ADVERTISE_IP and
    --p2p-advertise-url, 1 s heartbeat), small CPU L1. Stand-ins: `ip` is a loopback address for
    the pod IP; UCX over TCP on loopback; `--supported-transfer-mode auto` (no GPU here)."""

    name = "lmcache server"

    def __init__(self, coordinator: Coordinator, instance_id: str, ip: str, ports: dict,
                 log_dir: Path, heartbeat: float = 1.0):
        consumers.env_python(ENV)
        exe = consumers.env_dir(ENV) / "bin" / "lmcache"
        self.coordinator, self.instance_id, self.ip, self.ports = coordinator, instance_id, ip, ports
        env = {**child_env(), "PYTHONPATH": str(nixl_site()), "UCX_TLS": "tcp,self",
               "UCX_NET_DEVICES": "lo", "LMCACHE_COORDINATOR_URL": coordinator.url,
               "LMCACHE_COORDINATOR_ADVERTISE_IP": ip,
               "LMCACHE_COORDINATOR_HEARTBEAT_INTERVAL": str(heartbeat)}
        argv = [str(exe), "server", "--instance-id", instance_id,
                "--host", "0.0.0.0", "--port", str(ports["rpc"]),
                "--http-host", "127.0.0.1", "--http-port", str(ports["http"]),
                "--p2p-advertise-url", f"{ip}:{ports['p2p']}",
                "--p2p-listen-url", f"0.0.0.0:{ports['p2p']}",
                "--l1-size-gb", "0.25", "--eviction-policy", "LRU", "--l1-align-bytes", "65536",
                "--chunk-size", "16", "--supported-transfer-mode", "auto"]
        self.log_path = log_dir / f"server-{instance_id}.log"
        self._log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                         env=env, cwd=log_dir, start_new_session=True)
        except BaseException:
            self._log.close()
            raise

    def wait_registered(self, timeout: float = 120) -> None:
        self._wait("registered", lambda: self.instance_id in self.coordinator.listed(), timeout)
