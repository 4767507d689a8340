"""The whole serving stack in one process, without Ray: in-process worker groups plus a started `RouterCore` over
them, for tests, benchmarks and `--groups-in inproc`; `local_app` puts the OpenAI HTTP app on top."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI

from k2serve.config import ServingConfig
from k2serve.metrics import Metrics
from k2serve.router.core import RouterCore
from k2serve.router.http.app import create_app
from k2serve.router.schedule import StaticDirectory
from k2serve.worker.parallel.inproc_group import InProcessGroup, start_inprocess_groups


@dataclass
class LocalStack:
    core: RouterCore
    groups: list[InProcessGroup] = field(default_factory=list)

    async def aclose(self) -> None:
        await self.core.aclose()
        for g in self.groups:
            await g.stop()


async def start_local_stack(config: ServingConfig, metrics: Metrics | None = None) -> LocalStack:
    """In-process groups plus a started `RouterCore` over them (store from `config.chain_store`)."""
    metrics = metrics or Metrics()
    groups = await start_inprocess_groups(config, metrics)
    core = RouterCore(config, StaticDirectory([g.group_address for g in groups]), metrics)
    await core.start()
    return LocalStack(core, groups)


async def local_app(config: ServingConfig, metrics: Metrics | None = None
                    ) -> tuple[FastAPI, Callable[[], Awaitable[None]]]:
    """The HTTP app over `start_local_stack(config)`, and the coroutine function that tears the stack down."""
    metrics = metrics or Metrics()
    stack = await start_local_stack(config, metrics)
    return create_app(stack.core, config, metrics), stack.aclose
