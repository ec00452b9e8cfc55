"""TEST CODE, run INSIDE an engine pod on the real node (tests/node/test_p2p_real.py): the pod's
`vllm` process. It listens on the pod's control port; the first connection gets a real LMCache
engine (tests/p2p/engine_node.py or engine_node_ctrl.py) whose stdin and stdout are that
connection, so the test drives it with the same JSON-lines protocol as tests/p2p does through a
pipe. The engine inherits this container's environment untouched: the env the API server stored
after admission, expanded by the kubelet. Later connections (a second driver) are refused with
one error line. With HEALTH_PORT it also answers `GET /health` there, like vLLM's own endpoint,
for the pod's readiness probe: a frozen container (`ctr tasks pause`) then stops answering and
the kubelet marks the pod not Ready, as it would a hung vLLM. Stdlib only: it runs on the engine
venv's Python.

    pod_bridge.py PORT ENGINE_SCRIPT [HEALTH_PORT]
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        ok = self.path == "/health"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):  # one line per probe would drown the container's log
        pass


def main() -> None:
    port, script = int(sys.argv[1]), sys.argv[2]
    if len(sys.argv) > 3:
        health = ThreadingHTTPServer(("0.0.0.0", int(sys.argv[3])), Health)
        threading.Thread(target=health.serve_forever, daemon=True).start()
    # PID 1 of the container: without a handler SIGTERM is ignored and every deletion would
    # wait out the grace period. Exiting ends the engine too (its PID namespace goes).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(4)
    print(f"pod_bridge: control port {port}, engine {script}", file=sys.stderr, flush=True)
    engine = None
    while True:
        conn, peer = srv.accept()
        if engine is None or engine.poll() is not None:
            # stdout/stdin are the connection; stderr stays the container's log (kubectl logs).
            engine = subprocess.Popen([sys.executable, "-s", script], stdin=conn, stdout=conn)
            print(f"pod_bridge: engine pid {engine.pid} for {peer}", file=sys.stderr, flush=True)
        else:
            conn.sendall((json.dumps({"event": "fatal", "error": "engine already driven"}) + "\n").encode())
        conn.close()  # the engine holds its own copy


if __name__ == "__main__":
    main()
