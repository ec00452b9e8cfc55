"""Every mp-mode golden, as the kubelet would start it, checked by the REAL consumers (lmcache
0.5.6 and vLLM 0.33.0 from the cached vllm-0.33.0 env):

- the sidecar's command runs in a real shell (the incarnation wrapper), with `lmcache` replaced
  by a stub that records the argv it is exec'ed with; that argv and the kubelet-expanded env go
  through `lmcache server`'s own parser and startup checks (probe_mp.py), which must build
  the intended P2P config; a second start deletes its predecessor's registration (a loopback
  HTTP server stands in for the coordinator Service) and takes the next instance id;
- the group's coordinator, started with the same chunk size and hash algorithm, parses them;
- LMCache's own MP connector resolves the injected extra config to the sidecar's address, the
  server's hash algorithm and a transfer mode the server supports;
- vLLM's parser + KVTransferConfig accept the mutated command line and import the connector.

Stand-ins, each because the real thing cannot exist here: the stub `lmcache` (the probe then
runs the real one's parser), the loopback coordinator (it records the DELETE), the state
directory (a temporary one instead of the emptyDir at /kvm-mp), `sleep` (a no-op).
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

import consumers
from injected import POD_IP, POD_UID, injected_goldens
from kvmesh.core import contract, launch, mp, names

ENV = "vllm-0.33.0"
CASES = [c for c in injected_goldens() if c.mode == "mp"]
IDS = [c.case for c in CASES]


def sidecar(case) -> dict:
    [s] = [c for c in case.pod["spec"].get("initContainers", []) if c["name"] == names.MP_SIDECAR]
    return s


def vllm_argv(case) -> list[str]:
    command, args = case.container.get("command") or [], case.container.get("args") or []
    if launch.server_start(command + args) is not None:
        return command + args
    return ["vllm", "serve", *args]  # args-only: the image's entrypoint is `vllm serve`


def kv_config(case) -> dict:
    words = vllm_argv(case)
    at = len(words) - 1 - words[::-1].index(contract.KV_TRANSFER_FLAG)
    return json.loads(words[at + 1])


def flag(argv: list[str], name: str):
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


class _Coordinator(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_DELETE(self):  # noqa: N802 - http.server's naming
        self.seen.append(self.path)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def coordinator():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Coordinator)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", _Coordinator.seen
    srv.shutdown()
    srv.server_close()


def start(case, tmp, coordinator_url) -> list[str]:
    """One start of the sidecar as the kubelet does it: $(VAR) expanded in env, command and
    args, then the command run by a real shell; returns the argv `lmcache` got."""
    s = sidecar(case)
    env = consumers.kubelet_expand(s["env"], case.pod)
    command = [consumers._expand(w, env.get) for w in s["command"]]
    args = [consumers._expand(w, env.get) for w in s["args"]]
    state = tmp / "state"
    state.mkdir(exist_ok=True)
    command[2] = command[2].replace(names.MP_STATE_DIR, str(state))
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "lmcache").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "open(os.environ['ARGV_OUT'], 'w').write(json.dumps(sys.argv[1:]))\n")
    (bindir / "sleep").write_text("#!/bin/sh\nexit 0\n")
    (bindir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for f in bindir.iterdir():
        f.chmod(0o755)
    out = tmp / "argv.json"
    subprocess.run(command + args, check=True, timeout=60, capture_output=True,
                   env={**env, "LMCACHE_COORDINATOR_URL": coordinator_url, "ARGV_OUT": str(out),
                        "PATH": f"{bindir}:/usr/bin:/bin"})
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def started(tmp_path_factory, coordinator):
    url, seen = coordinator
    out = {}
    for c in CASES:
        tmp = tmp_path_factory.mktemp("sidecar")
        first = start(c, tmp, url)
        before = len(seen)
        second = start(c, tmp, url)
        out[c.case] = (first, second, seen[before:])
    return out


@pytest.fixture(scope="module")
def probed(started):
    """One lmcache probe for every case: server (as started), coordinator, connector."""
    cases = []
    for c in CASES:
        argv = started[c.case][0]
        assert argv[0] == "server", argv
        env = consumers.kubelet_expand(sidecar(c)["env"], c.pod)
        cases.append({"cmd": "server", "argv": argv[1:], "env": env})
        cases.append({"cmd": "coordinator", "argv": [
            "--host", "0.0.0.0", "--port", str(names.COORDINATOR_PORT),
            "--chunk-size", flag(argv, "--chunk-size"),
            "--hash-algorithm", flag(argv, "--hash-algorithm")]})
        cases.append({"cmd": "connector", "extra": kv_config(c)["kv_connector_extra_config"]})
        # Control: the same server without the coordinator URL must be refused.
        cases.append({"cmd": "server", "argv": argv[1:],
                      "env": {k: v for k, v in env.items() if k != "LMCACHE_COORDINATOR_URL"}})
    try:
        answer = consumers.run_probe(ENV, "probe_mp.py", {"cases": cases})
    except consumers.ConsumerEnvMissing as e:
        pytest.fail(str(e))
    assert answer["lmcache_version"] == "0.5.6", answer["lmcache_version"]
    r = answer["results"]
    return {c.case: r[4 * i:4 * i + 4] for i, c in enumerate(CASES)}


def test_goldens_cover_mp():
    assert len(CASES) >= 3
    assert any("kv-offloading" in c.case for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sidecar_is_a_native_sidecar(case):
    s = sidecar(case)
    assert s["restartPolicy"] == "Always" and s["image"] == case.container["image"]
    assert "startupProbe" in s and "readinessProbe" not in s
    probe = s["startupProbe"]["exec"]["command"]
    compile(probe[2], "<startupProbe>", "exec")  # valid python
    assert f":{flag(s['args'], '--http-port')}/healthcheck" in probe[2]
    assert {v["name"] for v in case.pod["spec"]["volumes"]} >= {names.MP_STATE_VOLUME}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_incarnations_get_new_ids_and_delete_their_predecessor(case, started):
    first, second, deleted = started[case.case]
    assert flag(first, "--instance-id") == names.mp_instance_id(POD_UID, 1)
    assert flag(second, "--instance-id") == names.mp_instance_id(POD_UID, 2)
    assert deleted == [f"/instances/{names.mp_instance_id(POD_UID, 1)}"]
    assert first[1:] != [] and first[3:] == second[3:]  # the server flags themselves unchanged


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_real_server_builds_the_intended_p2p_config(case, probed, started):
    server, _, _, no_coordinator = probed[case.case]
    assert server["ok"], server
    cfg = server["config"]
    m, p2p, co = cfg["mp"], cfg["mp"]["p2p_config"], cfg["coordinator"]
    ports = {p["name"]: p["containerPort"] for p in sidecar(case)["ports"]}
    assert (m["host"], m["port"]) == ("0.0.0.0", ports[names.PORT_NAME_MP_RPC])
    assert p2p["advertise_url"] == f"{POD_IP}:{ports[names.PORT_NAME_MP_P2P]}"
    assert p2p["listen_url"] == f"0.0.0.0:{ports[names.PORT_NAME_MP_P2P]}"
    assert m["instance_id"] == names.mp_instance_id(POD_UID, 1)
    assert co["url"] == f"http://kvmesh-mp-default.team-a.svc:{names.COORDINATOR_PORT}"
    assert (co["advertise_ip"], co["heartbeat_interval"]) == (POD_IP, float(mp.HEARTBEAT_SECONDS))
    assert cfg["http"]["http_host"] == "127.0.0.1" and cfg["serve"]["host"] == "127.0.0.1"
    mem = cfg["storage_manager"]["l1_manager_config"]["memory_config"]
    l1 = float(flag(started[case.case][0], "--l1-size-gb"))
    assert (mem["size_in_bytes"], mem["align_bytes"]) == (int(l1 * (1 << 30)), mp.L1_ALIGN_BYTES)
    assert m["hash_algorithm"] == "blake3" and m["chunk_size"] == 256
    extra = kv_config(case)["kv_connector_extra_config"]
    assert m["supported_transfer_mode"] == extra["lmcache.mp.mp_transfer_mode"]
    assert m["isolated_ipc"] is extra.get("lmcache.mp.isolated_ipc", False)
    assert not no_coordinator["ok"] and "P2P requires a coordinator" in no_coordinator["error"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_real_coordinator_takes_the_servers_chunk_size_and_hash(case, probed):
    server, coord, _, _ = probed[case.case]
    assert coord["ok"], coord
    c, s = coord["config"]["config"], server["config"]["mp"]
    assert (c["chunk_size"], c["hash_algorithm"]) == (s["chunk_size"], s["hash_algorithm"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lmcaches_connector_reaches_the_sidecar(case, probed):
    server, _, conn, _ = probed[case.case]
    assert conn["ok"], conn
    cfg, m = conn["config"], server["config"]["mp"]
    assert cfg["server_url"] == f"tcp://127.0.0.1:{m['port']}"
    assert not cfg["uses_server_urls"] and cfg["autostart"] is False
    r = cfg["resolved"]
    assert r["hash_algorithm"] == m["hash_algorithm"]
    assert r["isolated_ipc"] is m["isolated_ipc"]
    assert cfg["transfer_mode"] == m["supported_transfer_mode"]


@pytest.fixture(scope="module")
def vllm_results():
    return dict(zip(IDS, consumers.vllm_parse(
        [{"argv": vllm_argv(c), "load_connector": True} for c in CASES])))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vllm_accepts_the_mutated_command_line(case, vllm_results):
    r = vllm_results[case.case]
    assert r["ok"], r
    kv = r["kv_transfer_config"]
    assert kv["kv_connector"] == mp.CONNECTOR and kv["kv_connector_module_path"] == mp.CONNECTOR_MODULE
    assert kv["kv_connector_extra_config"] == kv_config(case)["kv_connector_extra_config"]
    assert r.get("connector_import") == "ok", r


def test_lmcaches_connector_maps_tensor_parallel_ranks_to_distinct_shards():
    """What LMCache's own connector builds for TP 2 x PP 1 and TP 2 x PP 2 against one server
    per pod: every rank a distinct KV piece, all writers. (The rank mapping only; that peers
    share such pieces over P2P is not shown here, so parallelism-unsupported stays.)"""
    out = consumers.run_probe(ENV, "probe_mp.py", {"cases": [
        {"cmd": "connector", "extra": {}, "parallel": [2, 1]},
        {"cmd": "connector", "extra": {}, "parallel": [2, 2]}]})
    for (tp, pp), r in zip([(2, 1), (2, 2)], out["results"]):
        assert r["ok"], r
        ranks = r["config"]["ranks"]
        assert [x["kv_worker_id"] for x in ranks] == list(range(tp * pp))
        assert {x["kv_world_size"] for x in ranks} == {tp * pp}
        assert all(x["is_kv_writer"] for x in ranks)
