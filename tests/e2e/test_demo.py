"""The README's main job: `kvmesh demo` injects the sample Deployment and stops cleanly on
Ctrl-C, leaving no process behind."""

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from support import REPO

READY_LINE = "Ctrl-C stops everything"
READY_S = 180


def start_demo():
    """`kvmesh demo` with its output fed to a queue by a reader thread, so every wait on it is
    bounded: a demo that stalls without printing fails at the deadline, never hangs."""
    proc = subprocess.Popen([sys.executable, "-m", "kvmesh.cli", "demo"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "KVMESH_LOG_LEVEL": "WARNING"})
    lines_q: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines_q.put(line)
        lines_q.put(None)  # EOF
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    return proc, lines_q, reader


def wait_ready(proc, lines_q) -> tuple[str, str]:
    """The demo's output up to READY_LINE, and its work directory."""
    lines = []
    deadline = time.monotonic() + READY_S
    while True:
        try:
            line = lines_q.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            raise AssertionError(f"demo printed no {READY_LINE!r} within {READY_S} s "
                                 f"(stalled); output so far:\n{''.join(lines)}") from None
        if line is None:
            raise AssertionError(f"demo exited (rc={proc.wait(10)}) before "
                                 f"{READY_LINE!r}:\n{''.join(lines)}")
        lines.append(line)
        if READY_LINE in line:
            out = "".join(lines)
            return out, next(w for w in out.split()
                             if w.endswith("admin.kubeconfig")).rsplit("/", 2)[0]


def stuck(proc, lines_q, workdir: str) -> str:
    """What a demo that does not stop is doing: its threads' stacks (faulthandler, SIGUSR1),
    its output since Ctrl-C, and the processes of its work dir with their state and wait
    channel (D: in the kernel, e.g. disk I/O)."""
    proc.send_signal(signal.SIGUSR1)
    time.sleep(3)
    out = "".join(line for line in list(lines_q.queue) if line is not None)
    procs = []
    for pid in pids_of(workdir).split():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = Path(f"/proc/{pid}/wchan").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
            procs.append(f"{pid} {stat} {wchan} {cmd}")
        except OSError:
            pass
    return f"output since Ctrl-C:\n{out}\nprocesses:\n" + "\n".join(procs)


def pids_of(workdir: str) -> str:
    return subprocess.run(["pgrep", "-f", workdir], capture_output=True, text=True).stdout


def test_demo_runs_and_stops_cleanly_on_ctrl_c():
    proc, lines_q, reader = start_demo()
    workdir = None
    try:
        out, workdir = wait_ready(proc, lines_q)
        assert "2 pods created by the ReplicaSet controller" in out, out
        assert out.count("LMCACHE_P2P_HOST=$(KVMESH_POD_IP)   -> 127.64.") == 2, out
        proc.send_signal(signal.SIGINT)
        # Bounded generously for a busy 2-core machine: each kvmesh process stops within 10 s.
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"demo still running 120 s after Ctrl-C\n{stuck(proc, lines_q, workdir)}") from None
        reader.join(10)  # EOF follows the exit (unless a child kept the pipe open)
        rest = "".join(line for line in list(lines_q.queue) if line is not None)
        assert proc.returncode == 0, rest
        assert "stopping webhook, controller and control plane" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    time.sleep(0.5)
    leftovers = pids_of(workdir)
    assert leftovers.strip() == "", f"processes left behind: {leftovers}"
    assert not os.path.exists(workdir)


def test_demo_sigkilled_leaves_no_orphans():
    # SIGKILL runs no cleanup: every child dies by its parent-death signal instead.
    proc, lines_q, _ = start_demo()
    workdir = None
    try:
        _, workdir = wait_ready(proc, lines_q)
        before = pids_of(workdir)
        assert len(before.split()) >= 5, before  # etcd, apiserver, ..., webhook, controller
        proc.kill()
        proc.wait(10)
        left = before
        for _ in range(60):  # the signal is immediate; the exits take a moment under load
            left = pids_of(workdir)
            if not left.strip():
                break
            time.sleep(0.5)
        assert left.strip() == "", f"orphans after SIGKILL of the demo: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if workdir:  # a failed run must not leave the control plane behind either
            for pid in pids_of(workdir).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
            shutil.rmtree(workdir, ignore_errors=True)  # SIGKILL left the demo no time to clean
