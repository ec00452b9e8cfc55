"""controller.workqueue: coalescing, urgent before low priority, one worker per key."""

import asyncio

from kvmesh.controller.workqueue import WorkQueue


async def test_coalesces_and_serves_urgent_first():
    q = WorkQueue()
    for k in ("low1", "low2"):
        q.add(k, urgent=False)
    q.add("u1")
    q.add("u1")
    q.add("low2")  # raised to urgent, still once
    assert len(q) == 3 and q.urgent == 2
    got = [(await q.get()) for _ in range(3)]
    assert got == [("u1", True), ("low2", True), ("low1", False)]


async def test_a_key_in_work_is_requeued_once_when_done_never_given_twice():
    q = WorkQueue()
    q.add("g")
    key, _ = await q.get()
    q.add("g", urgent=False)
    q.add("g")
    assert len(q) == 0 and "g" in q  # not handed to a second worker while in work
    second = asyncio.create_task(q.get())
    await asyncio.sleep(0.01)
    assert not second.done()
    q.done(key)
    assert await asyncio.wait_for(second, 1) == ("g", True)
    q.done("g")
    assert len(q) == 0 and "g" not in q


async def test_an_urgent_only_worker_never_takes_low_priority_work():
    q = WorkQueue()
    q.add("low", urgent=False)
    reserved = asyncio.create_task(q.get(urgent_only=True))
    await asyncio.sleep(0.01)
    assert not reserved.done()
    q.add("event")
    assert await asyncio.wait_for(reserved, 1) == ("event", True)
    assert await q.get() == ("low", False)
