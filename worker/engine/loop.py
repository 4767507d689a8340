"""Drives a stepping engine from asyncio, so a gRPC server (or any async caller) can submit requests and stream
their tokens while the engine keeps batching.

Every call into the engine — add, cancel, step, KV export — runs on one dedicated thread, in order, so the
engine itself needs no locks and the event loop never blocks on a model step. A worker group's step is split
(`SplitStepping`): only its wait for the ranks runs off that thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

from k2serve.worker.engine.requests import TokenEvent

T = TypeVar("T")


class SteppingEngine(Protocol):
    """What the loop needs: the single-process `Engine` and an expert-parallel group both provide it."""

    def add_request(self, request_id: str, prompt: list[int], params: Any, **kwargs: Any) -> int: ...
    def cancel(self, request_id: str) -> bool: ...
    def has_work(self) -> bool: ...
    def step(self) -> list[TokenEvent]: ...


@runtime_checkable
class SplitStepping(Protocol):
    """`step` in three parts: launch and finish on the engine's thread, collect (the wait) on any thread."""

    def launch_step(self) -> Any: ...
    def collect_step(self, launched: Any) -> Any: ...
    def finish_step(self, collected: Any) -> list[TokenEvent]: ...


class EngineLoop:
    def __init__(self, engine: SteppingEngine, on_step: Callable[[list[TokenEvent]], None] | None = None,
                 thread_init: Callable[[], None] | None = None) -> None:
        """`thread_init` runs first on the engine's thread (e.g. to bind it to cores)."""
        self.engine = engine
        # Checked once (a Protocol isinstance is not cheap): the engine again, when it splits its step.
        self._split: SplitStepping | None = engine if isinstance(engine, SplitStepping) else None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2serve-engine",
                                                               initializer=thread_init)
        self._streams: dict[str, asyncio.Queue[TokenEvent | BaseException]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_step = on_step
        self.error: BaseException | None = None

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs fn on the engine thread, between steps."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="k2serve-engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception as e:  # the engine's failure: already in self.error and sent to every stream
                if e is not self.error:
                    raise
            self._task = None
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, request_id: str, prompt: list[int], params: Any, **kwargs: Any) -> tuple[int, AsyncIterator[TokenEvent]]:
        """Queues a request; returns (seed, the stream of its events). A bad request raises here, before
        anything is queued."""
        queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        seed = await self.attach(request_id, prompt, params, queue, **kwargs)
        return seed, self.stream(request_id, queue)

    async def attach(self, request_id: str, prompt: list[int], params: Any,
                     sink: asyncio.Queue[TokenEvent | BaseException], **kwargs: Any) -> int:
        """Queues a request whose events go to `sink`, which several requests may share (their events carry
        the request id); returns its seed. The sink also gets the engine's failure, and the CancelledError of a
        `cancel`. A bad request raises here, before anything is queued."""
        ids = [request_id, *(rid for rid, _ in kwargs.get("forks", ()))]  # a request's other choices share its sink
        for rid in ids:
            self._streams[rid] = sink
        try:
            seed = await self.call(self.engine.add_request, request_id, prompt, params, **kwargs)
        except BaseException:
            for rid in ids:
                self._streams.pop(rid, None)
            raise
        self._wake.set()
        return seed

    async def cancel(self, request_id: str) -> bool:
        cancelled = await self.call(self.engine.cancel, request_id)
        queue = self._streams.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(asyncio.CancelledError(f"request {request_id} cancelled"))
        return cancelled

    async def stream(self, request_id: str,
                     queue: asyncio.Queue[TokenEvent | BaseException]) -> AsyncIterator[TokenEvent]:
        """The events of a request `attach`ed with its own `queue`, up to its last (or its cancel)."""
        try:
            while True:
                item = await queue.get()
                if isinstance(item, asyncio.CancelledError):
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if self._streams.get(request_id) is queue:
                # The consumer went away (client disconnect) before the request finished: stop computing it.
                del self._streams[request_id]
                await self.call(self.engine.cancel, request_id)

    async def _step(self) -> list[TokenEvent]:
        """One step. An engine that splits it (`SplitStepping`: a worker group, whose step is mostly waiting on
        its ranks) is waited for on another thread, so calls on the engine's thread need not wait it out."""
        split = self._split
        if split is None:
            return await self.call(self.engine.step)
        refs = await self.call(split.launch_step)
        results = await asyncio.to_thread(split.collect_step, refs)
        return await self.call(split.finish_step, results)

    async def _run(self) -> None:
        while True:
            if not await self.call(self.engine.has_work):
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                events = await self._step()
            except Exception as e:  # a broken engine fails every stream instead of hanging it
                self.error = e
                for queue in self._streams.values():
                    queue.put_nowait(e)
                self._streams.clear()
                raise
            if self._on_step is not None:
                self._on_step(events)
            for ev in events:
                queue = self._streams.get(ev.request_id)
                if queue is not None:
                    queue.put_nowait(ev)
                    if ev.finish_reason is not None:
                        del self._streams[ev.request_id]
