"""kvmesh.backends.lmcache_controller against the REAL ``lmcache_controller`` (lmcache 0.5.6).

One controller process per module, from the vllm-0.33.0 consumer venv, on 127.0.0.1 with free
ports and a heartbeat port; reaper off (workers must not vanish behind the tests' back). Workers
are simulated (TEST CODE, ``lmc_worker_sim.py``) with lmcache's own message classes, in that
venv's python. Every test uses its own instance ids and chunk hashes, so tests share the
controller without seeing each other.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid

import pytest

from kvmesh.backends import lmcache_controller as L
from lmc_worker_sim import WorkerSim
from lmcache_controller import ENV, LMCacheController, child_env, consumers
from support import free_port, wait_until

LOC = "LocalCPUBackend"


@pytest.fixture(scope="module")
def lmc(tmp_path_factory):
    """(controller, simulator): both started together, the controller's torch import dominating."""
    d = tmp_path_factory.mktemp("lmcache_controller")
    try:
        ctl = LMCacheController("127.0.0.1", d, port=free_port(), pull=free_port(),
                                reply=free_port(), heartbeat=free_port(),
                                extra_args=("--lmcache-worker-timeout", "300"))
    except consumers.ConsumerEnvMissing as e:
        pytest.fail(f"{e}\n(needed for the real lmcache_controller: "
                    f"bash tests/consumers/setup_envs.sh {ENV})")
    sim = None
    try:
        sim = WorkerSim(ctl.python, ctl.pull_url, ctl.reply_url, child_env(), d / "sim.stderr")
        ctl.wait_up()
        sim.wait_ready()
        yield ctl, sim
    finally:
        if sim is not None:
            sim.close()
        ctl.stop()


def uid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def hashes(n: int) -> list[int]:
    return [random.getrandbits(62) for _ in range(n)]




# Per-rank lists, the same in every pod (docs/lmcache-contract.md, "controller mode").
WPORTS, INIT = [18100, 18101], [18200, 18201]


def register_pod(sim, inst: str, ip: str, tp: int = 2) -> None:
    for r in range(tp):
        ret = sim.register(inst, r, ip, WPORTS[r], f"{ip}:{INIT[r]}")
        assert ret["type"] == "RegisterRetMsg"


# --------------------------------------------------------------------------------------------


async def test_message_schema_decodes_as_lmcache_deregister(lmc):
    """kvmesh's bytes go through the controller's exact JSON decode path into DeRegisterMsg."""
    _, sim = lmc
    parts = L.encode_deregister("pod-x", [0, 1], "10.0.0.7", [8100, 8101])
    assert parts[0] == (b'{"type":"DeRegisterMsg","instance_id":"pod-x","worker_id":0,'
                        b'"ip":"10.0.0.7","port":8100}')
    assert sim.decode(parts) == [
        {"type": "DeRegisterMsg", "instance_id": "pod-x", "worker_id": w, "ip": "10.0.0.7",
         "port": 8100 + w} for w in (0, 1)]


def test_malformed_input_is_rejected_before_sending():
    # One undecodable part would end the controller's PULL loop for good (no try/except there).
    for bad in ([True], [-1], [], [0, 0], "0", [0.0]):
        with pytest.raises(ValueError):
            L.encode_deregister("pod", bad, "10.0.0.1", [1, 2])
    with pytest.raises(ValueError):
        L.encode_deregister("", [0], "10.0.0.1", [1])
    with pytest.raises(ValueError):
        L.encode_deregister("pod", [0], "10.0.0.1", ["8100"])
    with pytest.raises(ValueError):
        L.encode_deregister("pod", [0], None, [8100])
    # ports: positional when one per worker id, else by rank, else 0
    assert [json.loads(p)["port"] for p in L.encode_deregister("p", [1], "i", [7])] == [7]
    assert [json.loads(p)["port"] for p in L.encode_deregister("p", [1], "i", [7, 8, 9])] == [8]
    assert [json.loads(p)["port"] for p in L.encode_deregister("p", [3], "i", [])] == [0]
    assert L.zmq_endpoint("ctl.ns.svc:8300") == ("tcp://ctl.ns.svc:8300", False)
    assert L.zmq_endpoint("tcp://10.0.0.1:8300") == ("tcp://10.0.0.1:8300", False)
    assert L.zmq_endpoint("fd00::1:8300") == ("tcp://[fd00::1]:8300", True)
    for bad in ("nohost", "h:", "http://h:1", "h:99999"):
        with pytest.raises(ValueError):
            L.zmq_endpoint(bad)


async def test_deregister_dead_pod_leaves_the_other(lmc):
    ctl, sim = lmc
    a, b = uid("pod-a"), uid("pod-b")
    register_pod(sim, a, "127.0.0.11")
    register_pod(sim, b, "127.0.0.12")
    assert sorted(w["worker_id"] for w in await L.workers(ctl.http_url, a)) == [0, 1]
    rec = {w["worker_id"]: w for w in await L.workers(ctl.http_url, b)}
    assert rec[1]["ip"] == "127.0.0.12" and rec[1]["peer_init_url"] == f"127.0.0.12:{INIT[1]}"
    sim.kill(a, 0), sim.kill(a, 1)                       # the pod dies, nothing deregisters it

    t0 = time.monotonic()
    await L.deregister(ctl.pull_url, a, [0, 1], "127.0.0.11", WPORTS)

    async def gone():
        return await L.workers(ctl.http_url, a) == []
    await wait_until(gone, timeout=5)
    took = time.monotonic() - t0
    assert took < 2.0, took
    assert sorted(w["worker_id"] for w in await L.workers(ctl.http_url, b)) == [0, 1]
    print(f"\ndead pod deregistered and unlisted in {took * 1000:.0f} ms")


async def test_p2p_lookup_forgets_dead_pod(lmc):
    ctl, sim = lmc
    a, b, c = uid("pod-a"), uid("pod-b"), uid("pod-c")
    register_pod(sim, a, "127.0.0.21")
    register_pod(sim, b, "127.0.0.22")
    hs = hashes(3)
    sim.admit(a, 0, hs)
    sim.admit(b, 0, hs[:1])

    async def indexed():
        ka = {w["worker_id"]: w["key_count"] for w in await L.workers(ctl.http_url, a)}
        kb = {w["worker_id"]: w["key_count"] for w in await L.workers(ctl.http_url, b)}
        return ka.get(0) == 3 and kb.get(0) == 1
    await wait_until(indexed)

    # requester c (rank 0): the first other instance holding hs[0] is a, with 3 consecutive hits
    assert sim.lookup(c, 0, hs) == [[a, LOC, 3, f"127.0.0.21:{INIT[0]}"]]
    assert sim.lookup(b, 0, hs) == [[a, LOC, 3, f"127.0.0.21:{INIT[0]}"]]

    took = await L.deregister_and_confirm(ctl.pull_url, ctl.http_url, a)   # ids/addr from records
    assert took < 2.0, took
    assert await L.workers(ctl.http_url, a) == []
    assert sim.lookup(c, 0, hs) == [[b, LOC, 1, f"127.0.0.22:{INIT[0]}"]]
    assert sim.lookup(b, 0, hs) == [["", "", 0, ""]]     # nobody else has it any more
    assert {w["worker_id"]: w["key_count"] for w in await L.workers(ctl.http_url, b)} == {0: 1, 1: 0}
    # nothing left to do: no push, 0.0
    assert await L.deregister_and_confirm(ctl.pull_url, ctl.http_url, a) == 0.0
    print(f"\nderegister_and_confirm: {took * 1000:.0f} ms")


async def test_reused_instance_id_keeps_old_address_until_deregistered(lmc):
    """Why kvmesh gives StatefulSet pods uid-based instance ids and deregisters every departure:
    a registration under a still-registered id keeps the OLD incarnation's address."""
    ctl, sim = lmc
    sts = uid("sts-0")                    # StatefulSet pod name reused across incarnations
    old_ip, new_ip = "127.0.0.31", "127.0.0.32"
    register_pod(sim, sts, old_ip)
    sim.admit(sts, 0, hashes(2))
    sim.kill(sts, 0), sim.kill(sts, 1)    # old incarnation dies, not deregistered

    register_pod(sim, sts, new_ip)        # new incarnation: same id, new IP -> "already registered"
    recs = await L.workers(ctl.http_url, sts)
    assert {r["ip"] for r in recs} == {old_ip}, recs                       # the trap, reproduced
    assert {r["peer_init_url"] for r in recs} == {f"{old_ip}:{INIT[0]}", f"{old_ip}:{INIT[1]}"}
    assert all(r["key_count"] == 0 for r in recs)                          # its KV set was cleared

    # What the mesh does for the old incarnation's departure: every rank goes.
    await L.deregister_and_confirm(ctl.pull_url, ctl.http_url, sts)
    assert await L.workers(ctl.http_url, sts) == []

    # The live new incarnation gets back in: rank 0 by its next heartbeat (unknown worker ->
    # re-registered with the address it sends + full sync), rank 1 by registering again.
    hb = sim.heartbeat(sts, 0)
    assert [c["type"] for c in hb["commands"]] == ["FullSyncCommand"], hb
    assert hb["commands"][0]["reason"] == "worker_re_registered"
    sim.register(sts, 1, new_ip, WPORTS[1], f"{new_ip}:{INIT[1]}")
    recs = await L.workers(ctl.http_url, sts)
    assert {(r["worker_id"], r["ip"], r["peer_init_url"]) for r in recs} == {
        (0, new_ip, f"{new_ip}:{INIT[0]}"), (1, new_ip, f"{new_ip}:{INIT[1]}")}


async def test_heartbeat_reregisters_a_deregistered_live_worker(lmc):
    """Why kvmesh only deregisters dead pods: a live heartbeating worker comes straight back."""
    ctl, sim = lmc
    p = uid("pod-live")
    register_pod(sim, p, "127.0.0.41", tp=1)
    sim.heartbeat(p, 0)                   # known worker: heartbeat accepted (may ask a full sync)
    await L.deregister_and_confirm(ctl.pull_url, ctl.http_url, p, [0], "127.0.0.41", WPORTS)
    hb = sim.heartbeat(p, 0)
    assert [(c["type"], c["reason"]) for c in hb["commands"]] == [("FullSyncCommand", "worker_re_registered")]
    assert [r["ip"] for r in await L.workers(ctl.http_url, p)] == ["127.0.0.41"]
    await L.deregister_and_confirm(ctl.pull_url, ctl.http_url, p)             # clean up


async def test_listing_fallback_and_unknown_instance(lmc):
    ctl, sim = lmc
    p = uid("pod-q")
    register_pod(sim, p, "127.0.0.51")
    import aiohttp
    async with aiohttp.ClientSession() as s:
        old = await L._query_worker_info(s, L.http_base(ctl.http_url), p, 5.0)
    new = await L.workers(ctl.http_url.removeprefix("http://"), p)
    strip = lambda rs: sorted((r["worker_id"], r["ip"], r["port"], r["peer_init_url"]) for r in rs)  # noqa: E731
    assert strip(old) == strip(new) and len(new) == 2
    assert await L.workers(ctl.http_url, uid("never-registered")) == []
    await L.deregister_and_confirm(ctl.pull_url, ctl.http_url, p)


async def test_controller_down_raises_clear_error_quickly(lmc):
    ctl, _ = lmc
    dead = free_port()                                       # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(L.ControllerUnreachable, match="NOT sent"):
        await L.deregister(f"127.0.0.1:{dead}", "pod-z", [0, 1], "10.0.0.9", WPORTS, timeout=1.0)
    assert time.monotonic() - t0 < 2.0
    # A TCP port that is not a ZMQ PULL (here uvicorn): bounded either way. libzmq may take the
    # HTTP 400 reply for an unversioned (ZMTP 1.0) peer and "send", so only
    # deregister_and_confirm can tell; it must not hang.
    t0 = time.monotonic()
    try:
        await L.deregister(ctl.http_url.removeprefix("http://"), "pod-z", [0], "10.0.0.9", WPORTS,
                           timeout=1.0)
    except L.ControllerUnreachable:
        pass
    assert time.monotonic() - t0 < 2.0
    t0 = time.monotonic()
    with pytest.raises(L.ControllerUnreachable):
        await L.workers(f"http://127.0.0.1:{dead}", "pod-z", timeout=1.0)
    with pytest.raises(L.ControllerUnreachable):
        await L.deregister_and_confirm(f"127.0.0.1:{dead}", ctl.http_url, "pod-z", [0], "10.0.0.9",
                                       WPORTS, send_timeout=1.0)
    assert time.monotonic() - t0 < 3.0
    # and the real controller's PULL loop is still alive after all that
    p = uid("pod-after")
    _, sim = lmc
    register_pod(sim, p, "127.0.0.61", tp=1)
    assert await L.deregister_and_confirm(ctl.pull_url, ctl.http_url, p) < 2.0
