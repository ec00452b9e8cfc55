"""The README's main job: `kvmesh demo` injects the sample Deployment and stops cleanly on
Ctrl-C, leaving no process behind."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time

from support import REPO

READY_LINE = "Ctrl-C stops everything"
READY_S = 180


def test_demo_runs_and_stops_cleanly_on_ctrl_c():
    proc = subprocess.Popen([sys.executable, "-m", "kvmesh.cli", "demo"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "KVMESH_LOG_LEVEL": "WARNING"})
    # A reader thread feeds a queue so every wait is bounded: a demo that stalls without
    # printing fails at the deadline instead of hanging on readline().
    lines_q: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines_q.put(line)
        lines_q.put(None)  # EOF
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    lines = []
    deadline = time.monotonic() + READY_S
    try:
        while True:
            left = deadline - time.monotonic()
            try:
                line = lines_q.get(timeout=max(left, 0))
            except queue.Empty:
                raise AssertionError(f"demo printed no {READY_LINE!r} within {READY_S} s "
                                     f"(stalled); output so far:\n{''.join(lines)}") from None
            if line is None:
                raise AssertionError(f"demo exited (rc={proc.wait(10)}) before "
                                     f"{READY_LINE!r}:\n{''.join(lines)}")
            lines.append(line)
            if READY_LINE in line:
                break
        out = "".join(lines)
        assert "2 pods created by the ReplicaSet controller" in out, out
        assert out.count("LMCACHE_P2P_HOST=$(KVMESH_POD_IP)   -> 127.64.") == 2, out
        workdir = next(w for w in out.split() if w.endswith("admin.kubeconfig")).rsplit("/", 2)[0]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        reader.join(10)  # EOF follows the exit (unless a child kept the pipe open)
        rest = "".join(line for line in list(lines_q.queue) if line is not None)
        assert proc.returncode == 0, rest
        assert "stopping webhook, controller and control plane" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    time.sleep(0.5)
    leftovers = subprocess.run(["pgrep", "-f", workdir], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", f"processes left behind: {leftovers}"
    assert not os.path.exists(workdir)
