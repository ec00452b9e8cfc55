"""HA: two controller replicas, the leader SIGKILLed in the middle of a burst of pod deletions.
The standby takes the Lease within its duration and, reconciling against the live membership,
leaves no stale key and loses no live key."""

from __future__ import annotations

import signal
import time

from kvmesh.core import names
from kvmesh.local.net import free_port
from helpers import apply, publish_keys, running_pods, vllm_deployment, wait_for
from test_mesh import group_redis, keys_by_value, lookup_pod


def holder(cluster) -> str:
    lease = cluster.kubectl_json("get", "lease", "-n", names.SYSTEM_NAMESPACE,
                                 names.LEADER_LEASE)
    return lease["spec"].get("holderIdentity") or ""


def test_leader_killed_during_deletion_burst(stack, devcluster, namespace, tmp_path):
    # client-go's 15 s lease (kvmesh's default is 30 s, for slow API servers): failover
    # mechanics, not the default, are under test.
    fast = ("--group-grace-seconds", "30", "--resync-seconds", "1",
            "--leader-lease-seconds", "15", "--leader-renew-deadline-seconds", "10")
    stack.restart(controller_args=fast)
    standby = stack.controller_process("kvmesh-controller-standby", free_port(), *fast)
    try:
        wait_for("local controller leads", lambda: holder(devcluster) ==
                 "kvmesh-controller-local", 30)
        apply(devcluster, vllm_deployment("burst", namespace, replicas=6,
                                          labels={names.LABEL_INJECT: "enabled"},
                                          image="lmcache/vllm-openai:v0.3.6"))
        vllm = running_pods(devcluster, namespace, "app=burst", 6)
        rpod = wait_for("Redis lookup pod", lambda: lookup_pod(devcluster, namespace,
                                                               "redis-default"), 30)
        server, admin = group_redis(devcluster, namespace, rpod, tmp_path)
        try:
            addr = {p["metadata"]["name"]: f"{p['status']['podIP']}:8200" for p in vllm}
            for name, a in addr.items():
                publish_keys(server.client, name, a, 1000)
            doomed = sorted(addr)[:4]
            survivors = sorted(addr)[4:]
            time.sleep(2)  # let the leader index the keys it will purge
            for i, name in enumerate(doomed):
                devcluster.kubectl("delete", "pod", "-n", namespace, name, "--wait=false")
                if i == 1:
                    stack.controller.proc.send_signal(signal.SIGKILL)  # no lease release
                    killed_at = time.monotonic()
            wait_for("standby takes the lease", lambda: holder(devcluster) ==
                     "kvmesh-controller-standby", 30, 0.2)
            failover = time.monotonic() - killed_at
            assert failover < 20, failover  # lease 15 s + one retry period
            wait_for("no stale key of any deleted pod", lambda: not (
                set(keys_by_value(admin)) & {addr[d] for d in doomed}), 30, 0.2)
            kept = keys_by_value(admin)
            assert {a: kept.get(a) for a in (addr[s] for s in survivors)} == \
                {addr[s]: 1000 for s in survivors}
            print(f"\nfailover {failover:.1f}s; stale keys of 4 deleted pods gone, "
                  f"{len(survivors) * 1000} live keys intact")
        finally:
            server.stop()
    finally:
        standby.stop()
        stack.restart()
