"""TEST CODE, run by the vllm-0.33.0 consumer venv's python: registers MP-server instances with a
real `lmcache coordinator` through LMCache's OWN registration client, exactly as `lmcache server`
does it, without the engine (no GPU, no L1, no torch work beyond lmcache's import).

`lmcache server`'s HTTP lifespan starts one task
    keep_registered(httpx.AsyncClient(timeout=10.0), coordinator_url, http_port=..., instance_id=...,
                    advertise_ip=..., heartbeat_interval=..., p2p_advertised_url=...,
                    mq_port=<--port if P2P else 0>, on_registered=...)
(lmcache 0.5.6 `lmcache/v1/multiprocess/http_server.py:127-143`) and cancels it on shutdown,
which deregisters (`lmcache/v1/mp_coordinator/registrar.py:156-159`). This script runs one such
task per instance given, with the same client settings:

    python mp_registrant.py '{"coordinator": "http://127.0.0.1:PORT", "heartbeat": 0.5,
                              "instances": [{"instance_id": "a", "advertise_ip": "127.0.0.2",
                                             "http_port": 8080, "p2p_advertised_url": "127.0.0.2:8200",
                                             "mq_port": 5555}, ...]}'

stdout: one JSON line per (re-)registration {"registered": id, "t": unix time}.
SIGTERM: cancel every task (each DELETEs its instance, as a server's clean shutdown does), exit 0.
SIGKILL: a crash, nothing deregistered.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

import httpx

from lmcache.v1.mp_coordinator.registrar import keep_registered


def announce(instance_id: str) -> None:
    print(json.dumps({"registered": instance_id, "t": time.time()}), flush=True)


async def main(spec: dict) -> None:
    clients, tasks = [], []
    for inst in spec["instances"]:
        client = httpx.AsyncClient(timeout=10.0)  # http_server.py:128
        clients.append(client)
        iid = inst["instance_id"]
        tasks.append(asyncio.create_task(keep_registered(
            client, spec["coordinator"],
            http_port=inst["http_port"],
            instance_id=iid,
            advertise_ip=inst.get("advertise_ip", ""),
            heartbeat_interval=float(spec.get("heartbeat", 5.0)),
            p2p_advertised_url=inst.get("p2p_advertised_url", ""),
            mq_port=inst.get("mq_port", 0),
            on_registered=lambda iid=iid: announce(iid),
        )))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in clients:
        await c.aclose()
    print(json.dumps({"stopped": True, "t": time.time()}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
