"""Issue 5: real LMCache 0.3.6 engines, configured only by what kvmesh injects through the real
admission chain, fetch KV from each other; a dead peer becomes a clean miss with kvmesh's
controller, and an error or a hang without it.

Every link is asserted: injection (the pod's env), env expansion (the engine's config), lookup
address (the policy's Redis), bind address (the engine listens on its own pod IP only), chunk keys
equal across processes (so a zero-hit run fails loudly), byte-identical transfer that came over
the network from A's server, and the purge on each kind of peer death.

Needs the `lmcache-0.3.6-engine` venv (tests/consumers/setup_envs.sh), redis-server and setarch.
The engines use three test-side stand-ins (see tests/p2p/engine_node.py); LMCache is unpatched.
"""

from __future__ import annotations

import time

import pytest

from scenario import CHUNK, P2PScenario, Peer, wait_for

CHUNKS = 8  # a "long prefix": 8 chunks of 256 tokens, 16 MiB of KV
TOKENS = CHUNKS * CHUNK
PURGE_BOUND_S = 5.0  # generous for a loaded 2-core CI box; the bench shows the real figures


@pytest.fixture(scope="module")
def mesh(devcluster, stack, tmp_path_factory):
    s = P2PScenario(devcluster, stack, tmp_path_factory.mktemp("p2p"))
    try:
        s.start()
        yield s
    finally:
        s.stop()
        stack.restart()  # back to the session's default webhook and controller


def share(mesh: P2PScenario, a: Peer, seed: int) -> list[str]:
    """A stores a prefix; B finds it through Redis and pulls it from A, byte-identical.
    Returns the chunk keys."""
    b = mesh.b
    assert a.engine.ready["hash_none"] == b.engine.ready["hash_none"], \
        "hash(None) differs between engines: chunk keys differ, B can never hit (setarch -R?)"
    stored = a.engine.call("store", seed=seed, tokens=TOKENS)
    assert stored["ok"], stored
    assert stored["local_hit"] == TOKENS and len(stored["keys"]) == CHUNKS
    # Each chunk key points at A's own pod address in the policy's Redis.
    assert mesh.redis.client.mget(stored["keys"]) == [a.address] * CHUNKS
    # B computes the same keys for the same tokens (asserted, so a zero-hit run fails loudly).
    assert b.engine.call("keys", seed=seed, tokens=TOKENS)["keys"] == stored["keys"]
    look = b.engine.call("lookup", seed=seed, tokens=TOKENS, timeout=5)
    assert look["ok"] and look["local_hit"] == 0 and look["hit"] == TOKENS, look
    served = a.engine.call("stats")["served_connections"]
    got = b.engine.call("retrieve", seed=seed, tokens=TOKENS, timeout=10)
    assert got["ok"], got
    assert got["local_hit_before"] == 0  # B had nothing locally ...
    assert got["retrieved"] == TOKENS and got["equal"]  # ... and now has A's exact bytes
    assert got["sha256"] == got["expected_sha256"] == stored["sha256"]
    # ... which came over TCP from A's server: one accepted connection per chunk.
    assert a.engine.call("stats")["served_connections"] - served == CHUNKS
    assert got["self_served"] == 0
    print(f"\nB fetched {CHUNKS} chunks ({TOKENS} tokens) from A in {got['ms']:.1f} ms")
    return stored["keys"]


def test_injected_engines_share_kv_over_the_network(mesh):
    b = mesh.b
    env = {e["name"]: e for e in b.pod["spec"]["containers"][0]["env"]}
    ip_var = env["LMCACHE_DISTRIBUTED_URL"]["value"].split(":")[0]  # "$(KVMESH_POD_IP)"
    assert ip_var.startswith("$(") and \
        env[ip_var[2:-1]]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["LMCACHE_LOOKUP_URL"]["value"] == mesh.redis.address
    assert env["LMCACHE_ENABLE_P2P"]["value"] == "True"

    a = mesh.fresh_a()
    for peer in (a, b):  # expanded with the pod's own IP, bound there and nowhere else
        ready = peer.engine.ready
        assert ready["enable_p2p"] is True and ready["lookup_url"] == mesh.redis.address
        assert ready["distributed_url"] == f"{peer.ip}:8200"
        assert ready["bound"] and ready["listen"] == [f"{peer.ip}:8200"]
    assert a.ip != b.ip

    share(mesh, a, seed=101)
    mesh.retire(a)


@pytest.mark.parametrize("kind", ["deleted", "not-ready", "ip-changed"])
def test_with_kvmesh_a_dead_peer_is_a_clean_miss(mesh, kind):
    seed = {"deleted": 201, "not-ready": 202, "ip-changed": 203}[kind]
    b_seed = 900 + seed  # B's own chunks: a live pod's keys, which must survive the purge
    assert mesh.b.engine.call("store", seed=b_seed, tokens=4 * CHUNK)["ok"]
    b_keys = mesh.redis.values()[mesh.b.address]
    a = mesh.fresh_a()
    share(mesh, a, seed)

    death = mesh.kill(kind, a)
    elapsed, seen = mesh.wait_clean_miss(seed, TOKENS, death.t0, bound=PURGE_BOUND_S)
    assert elapsed is not None, f"B still hits A's keys {PURGE_BOUND_S}s after {kind}: {seen[-1]}"
    assert all(r["ok"] for r in seen), seen  # lookups never raise, stale hit or not
    miss = mesh.b_call("retrieve", seed, TOKENS, timeout=5)
    assert miss["ok"] and miss["retrieved"] == 0, miss  # no exception, no hang
    assert miss["ms"] < 1000
    values = mesh.redis.values()
    assert death.address not in values  # A's lookup state is gone ...
    assert values.get(mesh.b.address) == b_keys  # ... a live pod's is not
    print(f"\n{kind}: B's first clean miss {elapsed * 1000:.0f} ms after the Kubernetes "
          f"action; retrieve then returned nothing in {miss['ms']:.1f} ms")

    if kind == "not-ready":
        # KWOK must not undo the kubelet-style status patch (else this case proves nothing).
        time.sleep(1.0)
        assert mesh.ready_condition(a.name) == "False"
    if kind == "ip-changed":
        # The restarted container: the same injected env, expanded with the pod's new IP.
        pod = mesh.pod(a.name)
        assert pod["status"]["podIP"] == death.detail["new_ip"]
        again = Peer(pod, mesh.runner.start(pod))
        assert again.engine.ready["listen"] == [f"{death.detail['new_ip']}:8200"]
        assert mesh.b_call("lookup", seed, TOKENS, timeout=5)["hit"] == 0
        again.engine.close()
    mesh.retire(a)


def test_without_kvmesh_controller_a_dead_peer_is_an_error_or_a_hang(mesh, stack):
    """The same deaths with kvmesh's controller stopped: B keeps seeing A's stale keys; its
    retrieve raises ConnectionRefusedError (A gone) or blocks (A frozen), for as long as the
    keys stay. On this shared Redis a restarted controller does not delete them either: it
    never saw those peers, and it deletes only what it can prove is its own (issue 12).

    KWOK, like real IPAM, hands a freed pod IP to the next pod: a dead peer's stale keys can
    then point at a live pod's address, which reconciliation (by address) must keep. So the
    Deployment is scaled down to B alone before the controller comes back."""
    stack.controller.stop()
    dead: list[str] = []
    stale_keys: list[str] = []
    try:
        for kind, seed in (("deleted", 301), ("ip-changed", 302), ("not-ready", 303)):
            a = mesh.fresh_a()
            keys = share(mesh, a, seed)
            stale_keys += keys
            death = mesh.kill(kind, a)
            dead.append(death.address)
            time.sleep(1.5)  # several times what kvmesh needs to purge (see the test above)
            look = mesh.b_call("lookup", seed, TOKENS, timeout=5)
            assert look["ok"] and look["hit"] == TOKENS, look  # a stale full hit
            assert mesh.redis.client.mget(keys) == [death.address] * CHUNKS  # still there
            if kind == "not-ready":
                # The frozen peer's kernel accepts B's connection; nothing ever answers.
                hung = mesh.b_call("retrieve", seed, TOKENS, timeout=3)
                assert hung.get("timeout") is True, hung
                assert hung["elapsed_s"] >= 3
                mesh.replace_b()  # B's call is stuck for good; a new B process takes over
            else:
                for _ in range(2):  # every call, for as long as the keys stay
                    err = mesh.b_call("retrieve", seed, TOKENS, timeout=5)
                    assert not err["ok"] and err["exception"] == "ConnectionRefusedError", err
            print(f"\nwithout kvmesh, {kind}: lookup {look['hit']}/{TOKENS} (stale), retrieve "
                  f"{'blocked (3 s bound)' if kind == 'not-ready' else 'ConnectionRefusedError'}")
            mesh.retire(a)
        mesh.cluster.kubectl("scale", "deployment", "-n", mesh.namespace, mesh.deployment,
                             "--replicas=1")
        wait_for("only B's pod left", lambda: [p["metadata"]["name"] for p in mesh.pods()]
                 == [mesh.b.name], 60, 0.2)
    finally:
        stack.start_controller(*mesh.controller_args)
    # With the controller back: this Redis is shared (`redisAddress`), so kvmesh deletes only
    # what it can prove is its own — LMCache-named keys of addresses it recorded as live peers
    # (kvmesh:members). These deaths happened while it was stopped; whether their keys go
    # depends on whether KWOK handed the dead pods an IP that an earlier test's peer had (then
    # the address is recorded), so only what must hold either way is asserted: the live peer's
    # keys stay, and kvmesh records it.
    wait_for("the restarted controller records B as a live peer",
             lambda: mesh.b.address in {k.decode() if isinstance(k, bytes) else k
                                        for k in mesh.redis.client.hkeys("kvmesh:members")},
             60, 0.1)
    time.sleep(2)  # a reconcile pass after the index caught up
    left = sum(v is not None for v in mesh.redis.client.mget(stale_keys))
    print(f"\nrestarted controller: {len(stale_keys) - left} of {len(stale_keys)} stale keys "
          "purged (addresses it had recorded), the rest kept")
    assert mesh.b.address in mesh.redis.values()  # B is live: its keys stay
