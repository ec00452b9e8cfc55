"""A coalescing work queue of keys with two priorities (client-go's workqueue, small).

    q = WorkQueue()
    q.add(key)                  # urgent: a pod event changed this group
    q.add(key, urgent=False)    # the periodic full pass: only when nothing urgent waits
    key, urgent = await q.get()
    try: ... finally: q.done(key)

A key is queued at most once (adding it again while it waits is free; adding it urgently
raises a waiting low-priority entry); a key being worked on is never handed to a second worker:
adding it meanwhile queues it again for when `done` is called, so the last change is always
seen. Workers take every urgent key before any low-priority one, and a worker may be reserved
for urgent keys (`get(urgent_only=True)`), so a departure never waits behind a full pass over
all groups, not even behind the low-priority work in flight.
"""

from __future__ import annotations

import asyncio
import time
from typing import Hashable


class WorkQueue:
    def __init__(self) -> None:
        self._urgent: dict[Hashable, None] = {}  # insertion-ordered sets
        self._low: dict[Hashable, None] = {}
        self._active: set[Hashable] = set()
        self._again: dict[Hashable, bool] = {}  # added while active -> urgent?
        self._changed = asyncio.Event()
        self._since: dict[Hashable, float] = {}  # when a waiting key was first queued
        self.waited = 0.0  # how long the key `get` last returned had waited

    def add(self, key: Hashable, urgent: bool = True) -> None:
        if key in self._active:
            self._again[key] = urgent or self._again.get(key, False)
            return
        if key in self._urgent or (not urgent and key in self._low):
            return
        if urgent:
            self._low.pop(key, None)  # raised: its urgent wait starts now
            self._urgent[key] = None
        else:
            self._low[key] = None
        self._since[key] = time.monotonic()
        self._changed.set()

    async def get(self, urgent_only: bool = False) -> tuple[Hashable, bool]:
        while True:
            if self._urgent:
                queue, urgent = self._urgent, True
                break
            if self._low and not urgent_only:
                queue, urgent = self._low, False
                break
            self._changed.clear()
            await self._changed.wait()
        key = next(iter(queue))
        del queue[key]
        self.waited = time.monotonic() - self._since.pop(key, time.monotonic())
        self._active.add(key)
        return key, urgent

    def done(self, key: Hashable) -> None:
        self._active.discard(key)
        if key in self._again:
            self.add(key, self._again.pop(key))

    def __contains__(self, key: Hashable) -> bool:
        return key in self._urgent or key in self._low or key in self._again

    def __len__(self) -> int:
        return len(self._urgent) + len(self._low)

    @property
    def urgent(self) -> int:
        return len(self._urgent)
