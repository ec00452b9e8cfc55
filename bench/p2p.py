"""P2P KV sharing between real LMCache 0.3.6 engines configured by kvmesh, on the local control
plane: what a peer fetch costs, and how long a dead peer keeps hurting its peers, with kvmesh's
controller and without it. Prints figures; not a test.

Set-up (tests/p2p/scenario.py): the local control plane (kube-apiserver etc. + KWOK, pod IPs on
loopback), kvmesh's webhook and controller with a policy whose `redisAddress` is a redis-server
on 127.0.0.1, an opted-in 2-replica `lmcache/vllm-openai:v0.3.6` Deployment, and one real
LMCache engine process per pod (three test stand-ins: host allocator, two torch.cuda stubs, a
CPU KV connector; see tests/p2p/engine_node.py). KV is 8 KiB per token (2 layers x 8 heads x
128 dims x K,V x fp16), so one 256-token chunk is 2 MiB.

Part 1: B's retrieve of a prefix that only A holds (lookup in Redis, one TCP fetch per chunk),
for 1-32 chunks. The alternative, recomputing the prefix (prefill), cannot be measured here:
there is no GPU and no model on this machine.

Part 2: time from a peer's death, as Kubernetes shows it, to B's first clean miss (lookup 0, no
exception). With kvmesh's controller: the purge. Without it: B is observed for a bounded window;
the stale keys stay until someone deletes them, then B misses at once.

Part 3 (`--parts mp`): the same questions for the MP generation (LMCache 0.5.6 `lmcache server`
sidecars + the group's `lmcache coordinator`, tests/p2p/mpscenario.py): B's P2P fetch per chunk
count, and B's first clean miss after A's pod is deleted and after A's server restarts in place
(plus, then, when B hits A's new incarnation), with kvmesh (its controller's DELETE, the
sidecar's predecessor DELETE, 1 s heartbeat, 10 s coordinator eviction) and without it (LMCache's
defaults: 5 s heartbeat, 30 s eviction swept every 10 s, a random id per server start, nothing
deleted). Chunks are 16 tokens, 512 KiB of KV (8 layers x 8 heads x 128 dims x K,V x bf16).

Needs: cluster/build.sh (cached), tests/consumers/setup_envs.sh lmcache-0.3.6-engine,
redis-server, setarch; for mp also the vllm-0.33.0 venv, the nixl-1.5.1-cu13 overlay and root.
About 2 minutes on 2 cores for the legacy parts, 10-15 more for mp. Not part of `make bench`
(which does not build the engine venvs): run it directly.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "p2p"))

from kvmesh.local.devcluster import DevCluster, build_binaries  # noqa: E402
from kvmesh.local.localstack import LocalStack  # noqa: E402
from scenario import CHUNK, P2PScenario  # noqa: E402

KINDS = ("deleted", "not-ready", "ip-changed")
MIB_PER_CHUNK = CHUNK * 8 * 1024 / 2**20


def fetch_costs(s: P2PScenario, chunk_counts: list[int], reps: int) -> None:
    a = s.fresh_a()
    print("\n== Part 1: B fetches a prefix only A holds (real LMCache, Redis lookup, TCP) ==")
    print("recompute (prefill) baseline: NOT MEASURABLE here - no GPU, no model on this machine")
    print(f"{'chunks':>6} {'tokens':>7} {'MiB':>6} {'lookup ms':>10} {'retrieve ms (median, min-max)':>31}"
          f" {'GiB/s':>6} {'ms/chunk':>8}")
    for n in chunk_counts:
        seed, tokens = 5000 + n, n * CHUNK
        st = a.engine.call("store", seed=seed, tokens=tokens)
        assert st["ok"] and st["local_hit"] == tokens, st
        looks, times = [], []
        for _ in range(reps):
            lk = s.b_call("lookup", seed, tokens, timeout=10)
            r = s.b_call("retrieve", seed, tokens, timeout=30)
            assert r["ok"] and r["equal"] and r["local_hit_before"] == 0, r
            looks.append(lk["ms"])
            times.append(r["ms"])
        med = statistics.median(times)
        mib = n * MIB_PER_CHUNK
        print(f"{n:>6} {tokens:>7} {mib:>6.0f} {statistics.median(looks):>10.1f} "
              f"{med:>14.1f} ({min(times):.1f}-{max(times):.1f}) {mib / 1024 / (med / 1000):>12.2f}"
              f" {med / n:>8.2f}")
    print("(every retrieve byte-identical; B does not keep fetched chunks, so each rep is a "
          "network fetch)")
    s.retire(a)


def with_kvmesh(s: P2PScenario, reps: int, chunks: int) -> dict:
    out: dict[str, list[float]] = {k: [] for k in KINDS}
    for rep in range(reps):
        for kind in KINDS:
            seed = 6000 + 10 * rep + KINDS.index(kind)
            a = s.fresh_a()
            assert a.engine.call("store", seed=seed, tokens=chunks * CHUNK)["ok"]
            assert s.b_call("lookup", seed, chunks * CHUNK, timeout=5)["hit"] == chunks * CHUNK
            d = s.kill(kind, a)
            elapsed, seen = s.wait_clean_miss(seed, chunks * CHUNK, d.t0, bound=10)
            if elapsed is None:
                raise RuntimeError(f"{kind}: no clean miss within 10 s: {seen[-1]}")
            r = s.b_call("retrieve", seed, chunks * CHUNK, timeout=5)
            assert r["ok"] and r["retrieved"] == 0, r
            out[kind].append(elapsed * 1000)
            s.retire(a)
    return out


def without_kvmesh(s: P2PScenario, window: float, chunks: int) -> dict:
    """Controller stopped. For each death: observe B for `window` s, then delete the dead
    address's keys by hand ("flush") and time B's first clean miss after that."""
    s.stack.controller.stop()
    out = {}
    try:
        for i, kind in enumerate(KINDS):
            seed, tokens = 7000 + i, chunks * CHUNK
            a = s.fresh_a()
            assert a.engine.call("store", seed=seed, tokens=tokens)["ok"]
            d = s.kill(kind, a)
            stale = errors = blocked = clean = 0
            kinds_seen: set[str] = set()
            while time.monotonic() - d.t0 < window:
                lk = s.b_call("lookup", seed, tokens, timeout=5)
                if lk["ok"] and lk["hit"] == 0:
                    clean += 1
                    break
                stale += lk.get("hit", 0) == tokens
                left = window - (time.monotonic() - d.t0)
                r = s.b_call("retrieve", seed, tokens, timeout=max(0.5, left))
                if r.get("timeout"):
                    blocked += 1
                    break  # B's call never returns; the rest of the window is spent blocked
                if not r["ok"]:
                    errors += 1
                    kinds_seen.add(r["exception"])
                time.sleep(0.1)
            if blocked:
                s.replace_b()
            t_flush = time.monotonic()
            removed = s.redis.delete_address(d.address)
            miss, _ = s.wait_clean_miss(seed, tokens, t_flush, bound=5)
            out[kind] = dict(stale=stale, errors=errors, blocked=blocked, clean=clean,
                             exc=",".join(sorted(kinds_seen)) or "-", removed=removed,
                             after_flush_ms=None if miss is None else miss * 1000)
            s.retire(a)
    finally:
        s.stack.start_controller(*s.controller_args)
    return out


def mp_fetch_costs(s, chunk_counts: list[int], reps: int) -> None:
    from mpscenario import CHUNK as MP_CHUNK, KIB_PER_CHUNK
    b, a = s.members[0], s.members[1]
    print("\n== Part 3a: mp mode, B fetches a prefix only A holds (coordinator lookup, NIXL "
          "read over UCX/TCP on loopback) ==")
    print(f"{'chunks':>6} {'KiB':>6} {'B lookup ms (median, min-max)':>30} {'ms/chunk':>8} "
          f"{'copy into KV ms':>15}")
    for n in chunk_counts:
        looks, copies = [], []
        for rep in range(reps):
            got = s.share(a, b, seed=8000 + 100 * n + rep, chunks=n)
            assert got["hit"] == n * MP_CHUNK and got["equal"], got
            looks.append(got["lookup_ms"])
            copies.append(got["retrieve_ms"])
        med = statistics.median(looks)
        print(f"{n:>6} {n * KIB_PER_CHUNK:>6} {med:>14.1f} ({min(looks):.1f}-{max(looks):.1f})"
              f"{'':>3} {med / n:>8.2f} {statistics.median(copies):>15.1f}")
    print("(lookup = B's scheduler lookup, during which B's server asks A and reads the chunks "
          "into its L1 over NIXL; copy = the engine-driven CPU copy into B's KV tensors, which "
          "a GPU node does over CUDA IPC instead; every fetch byte-identical)")


def mp_events(s, bound: float) -> dict:
    """Deletion of one A's pod, then a restart in place of another A (last: without kvmesh
    it can wedge the restarted server for good)."""
    b = s.members[0]
    out = {}
    a = s.members[2]
    s.prime(a, b, seed=9200, chunks=8)
    out["deleted"] = s.delete_pod(a, b, seed=9200, chunks=8, bound=bound)
    a = s.members[1]
    s.prime(a, b, seed=9100, chunks=8)
    out["restart"] = s.restart_in_place(a, b, seed=9100, chunks=8, bound=bound)
    return out


def _fmt(o) -> str:
    def sec(x):
        return "never" if x is None else f"{x:.1f} s"
    txt = f"clean miss {sec(o.clean_miss_s)} ({o.slow_lookups} lookups waited 3 s on the dead peer)"
    if o.event == "restart in place":
        txt += (f"; new incarnation registered {sec(o.registered_s)}, B peered "
                f"{sec(o.peered_s)}, B's first hit {sec(o.first_hit_s)}")
    return txt


def mp_part(cluster, stack, tmp: Path, chunk_counts: list[int], reps: int, bound: float) -> None:
    from mpscenario import MpScenario
    rows = {}
    for kvmesh in (True, False):
        s = MpScenario(cluster, stack, tmp / ("mp-kvmesh" if kvmesh else "mp-defaults"),
                       kvmesh=kvmesh)
        try:
            s.start(replicas=3)
            if kvmesh:
                mp_fetch_costs(s, [n for n in chunk_counts if n <= 32], reps)
            rows[kvmesh] = mp_events(s, bound)
        finally:
            s.stop()
    print("\n== Part 3b: mp mode, A's death / restart in place -> B (8-chunk prefix only A "
          "held; clean miss = 0 tokens in < 1 s) ==")
    for ev in ("deleted", "restart"):
        print(f"{rows[True][ev].event}:")
        print(f"  with kvmesh (DELETE + 1 s heartbeat): {_fmt(rows[True][ev])}")
        print(f"  without (LMCache defaults)          : {_fmt(rows[False][ev])}"
              f"{'' if ev == 'deleted' else f' (watched {bound:.0f} s)'}")
    o = rows[False]["restart"]
    if o.registered_s is not None and o.clean_miss_s is not None:
        won = o.registered_s > o.clean_miss_s
        print(f"without kvmesh the restarted server registered {'after' if won else 'BEFORE'} B "
              f"dropped the dead one ({o.registered_s:.0f} s vs {o.clean_miss_s:.0f} s): "
              + ("healed only because its start outlasted eviction + 4 polls; a faster start "
                 "(6.5 s in shared/docs/research/lmcache-mp-on-cpu.md) gave no hit in 150 s"
                 if won else "the predecessor's entry can wedge it (docs/mp-mode.md §5)"))
    print("times from the kill of A's server; the Kubernetes action (kubectl delete / status "
          "patch) is started at the same moment beside B's lookups; a server start here takes "
          "30-90 s on a loaded 2-core machine")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", default="1,2,4,8,16,32")
    ap.add_argument("--reps", type=int, default=5, help="retrieves per chunk count")
    ap.add_argument("--death-reps", type=int, default=2, help="deaths per kind with kvmesh")
    ap.add_argument("--window", type=float, default=5.0,
                    help="seconds B is observed after a death without kvmesh's controller")
    ap.add_argument("--parts", default="legacy,mp",
                    help="legacy (LMCache 0.3.6 engines, Redis lookup) and/or mp")
    ap.add_argument("--mp-bound", type=float, default=150.0,
                    help="seconds B is watched after an mp death/restart")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    chunk_counts = [int(x) for x in args.chunks.split(",")]
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvmesh-bench-p2p-") as tmp:
        cluster = DevCluster(build_binaries(), nodes=2, workdir=Path(tmp) / "cluster")
        cluster.start()
        stack = LocalStack(cluster, Path(tmp) / "stack")
        s = None
        try:
            stack.apply_manifests()  # the scenario starts webhook and controller with its policy
            if "mp" in parts:
                mp_part(cluster, stack, Path(tmp), chunk_counts, args.reps, args.mp_bound)
            if "legacy" in parts:
                s = P2PScenario(cluster, stack, Path(tmp) / "p2p").start()
                fetch_costs(s, chunk_counts, args.reps)
                print("\n== Part 2: peer death -> B's first clean miss (8-chunk prefix) ==")
                w = with_kvmesh(s, args.death_reps, 8)
                wo = without_kvmesh(s, args.window, 8)
                print(f"{'death':>11} | {'with kvmesh: ms to clean miss':>30} | without kvmesh "
                      f"(observed {args.window:.0f} s)")
                for kind in KINDS:
                    ms = w[kind]
                    o = wo[kind]
                    if o["blocked"]:
                        what = f"retrieve BLOCKED for the whole window ({o['stale']} stale-hit lookups)"
                    else:
                        what = (f"{o['stale']} stale-hit lookups, {o['errors']} retrieves raised "
                                f"{o['exc']}, {o['clean']} clean misses")
                    flushed = (f"; keys deleted by hand ({o['removed']}) -> clean miss "
                               f"{o['after_flush_ms']:.0f} ms later" if o["after_flush_ms"] is not None
                               else "")
                    print(f"{kind:>11} | {'  '.join(f'{x:.0f}' for x in ms):>30} | {what}{flushed}")
                print("with kvmesh: from the Kubernetes action (kubectl delete / status patch) to the "
                      "first lookup that misses; includes kubectl's own start-up (~0.1 s)")
        finally:
            if s is not None:
                s.stop()
            stack.down()
            cluster.stop()
    print(f"\ntotal {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
