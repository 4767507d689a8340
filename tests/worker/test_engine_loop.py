"""EngineLoop over an engine that splits its step (as a worker group does): while the step's wait runs off the
engine's thread, requests are added on it; the split engine's events reach their streams as a plain step's
would; a failure in the wait fails every stream."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from k2serve.worker.engine.requests import TokenEvent
from k2serve.worker.engine.loop import EngineLoop, SplitStepping


class SplitEngine:
    """Each step emits one token per request; `collect_step` blocks until the test lets it go."""

    def __init__(self, fail: bool = False) -> None:
        self.requests: dict[str, int] = {}  # request id -> tokens left
        self.collecting = threading.Event()
        self.go = threading.Event()
        self.added_while_collecting: list[str] = []
        self.threads: dict[str, set[str]] = {"add": set(), "launch": set(), "collect": set(), "finish": set()}
        self.fail = fail
        self.emitted: dict[str, int] = {}

    def add_request(self, request_id: str, prompt: list[int], params: Any, **kwargs: Any) -> int:
        self.threads["add"].add(threading.current_thread().name)
        if self.collecting.is_set():
            self.added_while_collecting.append(request_id)
        self.requests[request_id] = int(params)
        return 7

    def cancel(self, request_id: str) -> bool:
        return self.requests.pop(request_id, None) is not None

    def has_work(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[TokenEvent]:
        raise AssertionError("a split engine is stepped in parts")

    def launch_step(self) -> list[str]:
        self.threads["launch"].add(threading.current_thread().name)
        return sorted(self.requests)

    def collect_step(self, launched: list[str]) -> list[str]:
        self.threads["collect"].add(threading.current_thread().name)
        self.collecting.set()
        assert self.go.wait(10)
        self.collecting.clear()
        if self.fail:
            raise RuntimeError("rank 0 died")
        return launched

    def finish_step(self, collected: list[str]) -> list[TokenEvent]:
        self.threads["finish"].add(threading.current_thread().name)
        events = []
        for rid in collected:
            if rid not in self.requests:
                continue
            self.requests[rid] -= 1
            done = self.requests[rid] == 0
            events.append(TokenEvent(rid, self.emitted.get(rid, 0), 100 + len(events), 0.0, None,
                                     "length" if done else None))
            self.emitted[rid] = self.emitted.get(rid, 0) + 1
            if done:
                del self.requests[rid]
        return events


def test_requests_are_added_while_a_split_step_waits() -> None:
    engine = SplitEngine()
    assert isinstance(engine, SplitStepping)

    async def go() -> tuple[list[int], list[int]]:
        loop = EngineLoop(engine)  # type: ignore[arg-type]
        loop.start()
        try:
            _, first = await loop.submit("a", [1], 3)
            while not engine.collecting.is_set():  # a's first step is waiting on its "ranks"
                await asyncio.sleep(0.001)
            seed, second = await asyncio.wait_for(loop.submit("b", [2], 2), 5)  # not behind that wait
            assert seed == 7
            engine.go.set()
            return [ev.index async for ev in first], [ev.index async for ev in second]
        finally:
            await loop.stop()

    a, b = asyncio.run(go())
    assert (a, b) == ([0, 1, 2], [0, 1])
    assert engine.added_while_collecting == ["b"]
    engine_thread = engine.threads["launch"] | engine.threads["finish"] | engine.threads["add"]
    assert len(engine_thread) == 1 and not engine.threads["collect"] & engine_thread


def test_a_failed_wait_fails_every_stream() -> None:
    engine = SplitEngine(fail=True)
    engine.go.set()

    async def go() -> BaseException | None:
        loop = EngineLoop(engine)  # type: ignore[arg-type]
        loop.start()
        try:
            _, events = await loop.submit("a", [1], 3)
            with pytest.raises(RuntimeError, match="rank 0 died"):
                [ev async for ev in events]
            return loop.error
        finally:
            await loop.stop()

    assert isinstance(asyncio.run(go()), RuntimeError)
