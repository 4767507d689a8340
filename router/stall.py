"""A stall deadline on the waits of a stream: `asyncio.timeout` semantics for each wait, without its per-wait cost.

A group's token stream is read one event at a time, each wait bounded (a stalled group must fail over). One
`asyncio.timeout` scope per event schedules and cancels a timer per token: 4.3 µs added to each event's wait
(measured: 8.9 vs 4.6 µs per queued event; this watch adds 0.85). `StallWatch` keeps one timer per stream: a
wait records its deadline; the timer, when it fires, re-arms itself at the deadline of the wait in progress,
or cancels the task if that wait has run past it (time between waits does not count, as with a scope per
wait).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class StallWatch:
    """`await watch.wait(aw, allowance)` is `async with asyncio.timeout(allowance): await aw` (TimeoutError past
    it); the watch must be used from one task at a time, and closed (`close()`) when the stream ends."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[object] | None = None  # the task that waits, from its first wait on
        self._deadline = 0.0  # of the wait in progress, in loop time; 0 when none is
        self._handle: asyncio.TimerHandle | None = None
        self._fired = False

    async def wait(self, aw: Awaitable[T], allowance: float) -> T:
        task = self._task
        if task is None:  # one task uses a watch: look it up once, not per event
            task = self._task = asyncio.current_task()
            assert task is not None, "StallWatch.wait runs in a task"
        deadline = self._loop.time() + allowance
        self._deadline = deadline
        if self._handle is None or self._handle.when() > deadline:  # the timer must fire by this deadline
            self._arm(deadline)
        try:
            return await aw
        except asyncio.CancelledError:
            if self._fired and task.uncancel() == 0:
                raise TimeoutError(f"no event within {allowance} s") from None
            raise
        finally:
            self._deadline = 0.0
            self._fired = False

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(when, self._check)

    def _check(self) -> None:
        self._handle = None
        if not self._deadline or self._task is None:
            return  # between waits: the next wait arms the timer again
        if self._loop.time() >= self._deadline:
            self._fired = True
            self._task.cancel()
        else:
            self._arm(self._deadline)
