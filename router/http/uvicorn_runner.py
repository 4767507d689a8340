"""Running the HTTP app under uvicorn: on the caller's event loop (`serving`), or on a loop of its own in a
background thread (`BackgroundServer`, for embedding the stack in a benchmark or a test process).

Port 0 picks a free port; both report the address actually bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI


@contextlib.asynccontextmanager
async def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serves `app` while the block runs; yields the base URL (`http://host:port`)."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises why it could not start (port in use, ...)
            raise RuntimeError(f"uvicorn exited before serving on {host}:{port}")
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        await task


class BackgroundServer:
    """`with BackgroundServer(build) as url:` — a thread runs an event loop, awaits `build()` there (the core's
    tasks must live on the serving loop), serves the app it returns, and on exit stops serving, then awaits the
    `close` coroutine function `build` returned alongside the app."""

    def __init__(self, build: Callable[[], Awaitable[tuple[FastAPI, Callable[[], Awaitable[Any]]]]],
                 host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 120.0) -> None:
        self._build = build
        self._host, self._port = host, port
        self._timeout = start_timeout_s
        self._ready = threading.Event()
        self._url: str | None = None
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name="k2serve-http", daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        if not self._ready.wait(self._timeout):
            raise TimeoutError(f"the HTTP server did not start within {self._timeout} s")
        if self._error is not None:
            raise RuntimeError("the HTTP server failed to start") from self._error
        assert self._url is not None
        return self._url

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

    def run_coroutine(self, coro: Awaitable[Any], timeout_s: float = 60.0) -> Any:
        """Runs a coroutine on the server's loop (where the core lives) and returns its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)  # type: ignore[arg-type]

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # reported to the thread that waits in __enter__
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app, close = await self._build()
        try:
            async with serving(app, self._host, self._port) as url:
                self._url = url
                self._ready.set()
                await self._stop.wait()
        finally:
            await close()
