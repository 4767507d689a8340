"""Both client-facing fronts of a router over an in-process stack: the HTTP app on a live server and the gRPC
service, each with a client, for tests that probe the two surfaces alike; plus a gRPC call's status code."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
from fastapi import FastAPI

from k2serve.config import ServingConfig
from k2serve.metrics import Metrics
from k2serve.router.grpc_api import start_router_server
from k2serve.router.http.app import create_app
from k2serve.router.http.uvicorn_runner import serving
from k2serve.stack.inproc import LocalStack, start_local_stack


@dataclass
class Fronts:
    stack: LocalStack
    app: FastAPI
    http: httpx.AsyncClient
    channel: grpc.aio.Channel


@contextlib.asynccontextmanager
async def router_fronts(config: ServingConfig) -> AsyncIterator[Fronts]:
    metrics = Metrics()
    stack = await start_local_stack(config, metrics)
    server, port = await start_router_server(stack.core, "127.0.0.1", 0)
    try:
        app = create_app(stack.core, config, metrics)
        async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as http, \
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Fronts(stack, app, http, channel)
    finally:
        await server.stop(0)
        await stack.aclose()


async def grpc_code(call: Any) -> grpc.StatusCode:
    """The status a unary call (or a coroutine that drains a stream) ends with."""
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK
