"""The README's main job: `kvmesh demo` injects the sample Deployment and stops cleanly on
Ctrl-C, leaving no process behind."""

import os
import signal
import subprocess
import sys
import time

from support import REPO


def test_demo_runs_and_stops_cleanly_on_ctrl_c():
    proc = subprocess.Popen([sys.executable, "-m", "kvmesh.cli", "demo"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "KVMESH_LOG_LEVEL": "WARNING"})
    lines = []
    deadline = time.monotonic() + 180
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
            assert time.monotonic() < deadline, "".join(lines)
        out = "".join(lines)
        assert "2 pods created by the ReplicaSet controller" in out, out
        assert out.count("LMCACHE_P2P_HOST=$(KVMESH_POD_IP)   -> 127.64.") == 2, out
        workdir = next(w for w in out.split() if w.endswith("admin.kubeconfig")).rsplit("/", 2)[0]
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, rest
        assert "stopping webhook, controller and control plane" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)
    leftovers = subprocess.run(["pgrep", "-f", workdir], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", f"processes left behind: {leftovers}"
    assert not os.path.exists(workdir)
