"""How late the webhook's event loop runs while large AdmissionReviews are decided: in the
worker process (webhook.heavy, what the webhook does) beside the same work on a thread (what it
did before) and an idle loop, in one process, rounds alternated so the machine's other load
hits all three alike.

A 1 ms timer measures the loop's lag while ten 2.9 MB reviews are decided one after another.
On a thread, parsing holds the GIL for the whole body in one C call, and the OS descheduling
that thread stalls the loop until it runs again; in the worker process the loop only moves
bytes (written to the worker's pipe from a thread, so not even the copy is on the loop).

    .venv/bin/python bench/large_review.py [--rounds 3] [--size 2900000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import attacks as A  # noqa: E402
from support import review_for  # noqa: E402
from kvmesh.core.policy import PolicyDefaults  # noqa: E402
from kvmesh.webhook import heavy  # noqa: E402

POLICY = PolicyDefaults()


async def _lags(work, n: int) -> list[float]:
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            t0 = loop.time()
            await asyncio.sleep(0.001)
            lags.append(loop.time() - t0 - 0.001)
    t = asyncio.create_task(tick())
    for _ in range(n):
        await work()
    done.set()
    await t
    return sorted(lags)


def _show(lags: list[float]) -> str:
    def ms(x: float) -> str:
        return f"{x * 1000:.1f} ms"
    return (f"lag median {ms(lags[len(lags) // 2])}, p99 {ms(lags[int(len(lags) * 0.99)])}, "
            f"worst {ms(lags[-1])} ({len(lags)} ticks)")


async def main(rounds: int, size: int) -> None:
    raw = json.dumps(review_for(A.script_pod(size))).encode()
    thread, pool = ThreadPoolExecutor(1), heavy.Pool(timeout=30)
    await pool.start()
    loop = asyncio.get_running_loop()
    args = (raw, None, POLICY, None, (None, False), 10_000)

    async def idle() -> None:
        await asyncio.sleep(0.05)

    async def on_thread() -> None:
        await loop.run_in_executor(thread, heavy.decide_raw, *args)

    async def in_worker() -> None:
        await pool.decide(raw, None, 1, POLICY, (None, False), 10_000)

    kinds = {"idle loop (baseline)": idle, "on a thread (before)": on_thread,
             "in the worker process (now)": in_worker}
    got: dict[str, list[float]] = {k: [] for k in kinds}
    print(f"{len(raw) / 1e6:.1f} MB reviews, 10 per round, {rounds} rounds", file=sys.stderr)
    t0 = time.monotonic()
    for r in range(rounds):
        for kind, work in kinds.items():
            lags = await _lags(work, 10)
            got[kind] += lags
            print(f"  round {r + 1} {kind}: {_show(lags)}", file=sys.stderr, flush=True)
    await pool.close()
    print(f"all rounds ({time.monotonic() - t0:.0f} s):")
    for kind, lags in got.items():
        print(f"  {kind:<28} {_show(sorted(lags))}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=2_900_000, help="sh -c script bytes")
    a = ap.parse_args()
    sys.setswitchinterval(0.001)  # as the webhook sets it
    asyncio.run(main(a.rounds, a.size))
