"""The group Redis's ACLs (core.lookup.redis_acl_args) on a real redis-server started with them:
a pod-level client (Redis's default user, which LMCache 0.3.6 is: it cannot authenticate) can
run none of the commands that would let it take the lookup tier over, LMCache's own
RedisLookupServer still inserts, looks up and removes, and kvmesh's index (its own user) still
subscribes, indexes and purges."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
import redis.asyncio as aredis
from redis.exceptions import ResponseError

from kvmesh.backends import redis_index as I
from kvmesh.core import lookup
from lmcache_keys import DEAD, LIVE_A, key, load
from support import RedisServer

PASSWORD = "kvmesh-test-password"


@pytest.fixture
def acl_redis(tmp_path):
    args = lookup.redis_acl_args(hashlib.sha256(PASSWORD.encode()).hexdigest())
    srv = RedisServer(tmp_path, "--notify-keyspace-events", "E$", *args).start()
    yield srv
    srv.stop()


FORBIDDEN = [("CONFIG", "SET", "notify-keyspace-events", ""), ("CONFIG", "GET", "*"),
             ("REPLICAOF", "127.0.0.1", "1"), ("SLAVEOF", "127.0.0.1", "1"), ("FLUSHALL",),
             ("FLUSHDB",), ("DEBUG", "SLEEP", "0"), ("SCRIPT", "FLUSH"), ("KEYS", "*"),
             ("EVAL", "return 1", "0"), ("SCAN", "0"), ("SUBSCRIBE", "x"),
             ("SHUTDOWN", "NOSAVE"), ("ACL", "SETUSER", "default", "+@all"), ("MONITOR",),
             ("CLIENT", "KILL", "TYPE", "pubsub"), ("SET", "kvmesh:addr:x", "1"),
             ("GET", "kvmesh:members"), ("DEL", "kvmesh:addr:10.1.0.9:8200"),
             ("SET", "app:other", "1")]


@pytest.mark.parametrize("cmd", FORBIDDEN, ids=lambda c: " ".join(c[:2]))
async def test_pod_client_cannot_run_forbidden_commands(acl_redis, cmd):
    r = aredis.Redis(port=acl_redis.port)  # no credentials, as any pod of the namespace
    try:
        # NOPERM from the ACL (DEBUG is refused even earlier, by enable-debug-command).
        with pytest.raises(ResponseError, match="no permissions|DEBUG command not allowed"):
            await r.execute_command(*cmd)
        assert await r.ping()  # the connection is fine; only that command is refused
    finally:
        await r.aclose()


LMCACHE_CLIENT = r"""
import json, sys, types
from lmcache.utils import CacheEngineKey
from lmcache.v1.lookup_server.redis_server import RedisLookupServer
port = int(sys.argv[1])
cfg = types.SimpleNamespace(lookup_url=f"127.0.0.1:{port}", distributed_url="10.1.0.10:8200")
srv = RedisLookupServer(cfg)
keys = [CacheEngineKey("vllm", "Qwen/Qwen2.5-0.5B-Instruct", 1, 0, h) for h in (1, -2, 3)]
srv.insert(keys[0]); srv.batched_insert(keys[1:])
found = [srv.lookup(k) for k in keys]
srv.remove(keys[0])
after = srv.lookup(keys[0])
print(json.dumps({"found": found, "after": after, "names": [k.to_string() for k in keys]}))
"""


def test_lmcache_own_lookup_client_still_works(acl_redis):
    # By path: "consumers" is a module or a namespace package depending on which tests ran.
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "kvmesh_tests_consumers", Path(__file__).parents[1] / "consumers" / "consumers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ConsumerEnvMissing, _child_env, env_python = mod.ConsumerEnvMissing, mod._child_env, \
        mod.env_python
    try:
        py = env_python("lmcache-0.3.6-engine")
    except ConsumerEnvMissing as e:
        pytest.skip(str(e))
    got = subprocess.run([str(py), "-c", LMCACHE_CLIENT, str(acl_redis.port)],
                         capture_output=True, text=True, timeout=300, env=_child_env())
    assert got.returncode == 0, got.stderr[-3000:]
    out = json.loads(got.stdout.strip().splitlines()[-1])
    assert out["found"] == [["10.1.0.10", 8200]] * 3 and out["after"] is None
    assert all(n.startswith("vllm@") for n in out["names"])  # the ACL's key pattern


async def test_kvmesh_user_subscribes_indexes_and_purges(acl_redis):
    pod = aredis.Redis(port=acl_redis.port)  # LMCache's writes: the default user
    try:
        idx = I.AddressIndex(port=acl_redis.port, username=lookup.REDIS_KVMESH_USER,
                             password=PASSWORD, live_addrs=lambda: {LIVE_A, DEAD},
                             prune_interval=None)
        assert await idx.start(wait=15)
        try:
            await load(pod, DEAD, 300, "d")
            await load(pod, LIVE_A, 100, "a")
            res = await idx.purge_address(DEAD)
            assert res.deleted == 300 and not res.full_scan  # from the index, via notifications
            assert (await idx.reconcile(lambda: {LIVE_A})).purged == 0
            assert await pod.get(key("a", 0)) == LIVE_A.encode()
        finally:
            await idx.stop()
        wrong = I.AddressIndex(port=acl_redis.port, username=lookup.REDIS_KVMESH_USER,
                               password="wrong", backoff_base=0.01, prune_interval=None)
        try:
            assert not await wrong.start(wait=1.5)  # refused, never half-working
        finally:
            await wrong.stop()
    finally:
        await pod.aclose()
