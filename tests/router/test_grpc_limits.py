"""The router's gRPC under the same request limits as HTTP (`router.limits`), each at the limit and one past it:
a message over `max_body_bytes` is RESOURCE_EXHAUSTED, a request past another limit INVALID_ARGUMENT naming it,
before any turn starts (the store gains no chain); an unset max_tokens is `default_max_tokens`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from k2serve.config import RequestLimits, ServingConfig
from k2serve.metrics import Metrics
from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc
from k2serve.proto.convert import sampling_to_proto
from k2serve.router.grpc_api import start_router_server
from k2serve.sampling_params import SamplingParams
from k2serve.stack.inproc import start_local_stack

LIMITS = RequestLimits(max_body_bytes=64 << 10, max_messages=4, max_tools=2, max_tool_schema_bytes=256,
                       default_max_tokens=5, max_chain_id_chars=40)
USER = {"role": "user", "content": "hi"}
GREEDY = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))


def tool(pad: int = 0) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "t", "description": "x" * pad,
                                             "parameters": {"type": "object", "properties": {}}}}


def sized_tool(size: int) -> dict[str, Any]:
    base = len(json.dumps(tool(), ensure_ascii=False).encode())
    t = tool(size - base)
    assert len(json.dumps(t, ensure_ascii=False).encode()) == size
    return t


def chat_request(**doc: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(chat_json=json.dumps({"messages": [USER], **doc}), sampling=GREEDY)


def sized_request(size: int) -> pb.GenerateRequest:
    """A request of exactly `size` bytes on the wire (padding in a chat_json field the router ignores)."""
    req = chat_request(pad="")
    req = chat_request(pad="x" * (size - req.ByteSize() - 3))  # the string's length prefix grows by 2 bytes
    while req.ByteSize() < size:
        req = chat_request(pad=json.loads(req.chat_json)["pad"] + "x")
    assert req.ByteSize() == size, req.ByteSize()
    return req


CASES: dict[str, tuple[Callable[[], Any], Callable[[], Any], grpc.StatusCode, str]] = {
    "messages": (lambda: chat_request(messages=[USER] * LIMITS.max_messages),
                 lambda: chat_request(messages=[USER] * (LIMITS.max_messages + 1)),
                 grpc.StatusCode.INVALID_ARGUMENT, "max_messages"),
    "tools": (lambda: chat_request(tools=[tool()] * LIMITS.max_tools),
              lambda: chat_request(tools=[tool()] * (LIMITS.max_tools + 1)),
              grpc.StatusCode.INVALID_ARGUMENT, "max_tools"),
    "tool_schema": (lambda: chat_request(tools=[sized_tool(LIMITS.max_tool_schema_bytes)]),
                    lambda: chat_request(tools=[sized_tool(LIMITS.max_tool_schema_bytes + 1)]),
                    grpc.StatusCode.INVALID_ARGUMENT, "max_tool_schema_bytes"),
    "message_size": (lambda: sized_request(LIMITS.max_body_bytes), lambda: sized_request(LIMITS.max_body_bytes + 1),
                     grpc.StatusCode.RESOURCE_EXHAUSTED, "max"),
}


def test_grpc_limits_at_and_past_each(tmp_path: Path) -> None:
    config = ServingConfig.model_validate({"chain_store": {"sqlite_path": str(tmp_path / "chains.sqlite3")},
                                           "model": {"max_context": 2048},
                                           "router": {"aggregated": True, "limits": LIMITS.model_dump()}})

    async def code(call: Any) -> tuple[grpc.StatusCode, str, list[Any]]:
        try:
            return grpc.StatusCode.OK, "", [m async for m in call]
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or "", []

    async def unary(call: Any) -> tuple[grpc.StatusCode, str]:
        status, detail, _ = await code(_stream_of(call))
        return status, detail

    async def go() -> dict[str, Any]:
        stack = await start_local_stack(config, Metrics())
        server, port = await start_router_server(stack.core, "127.0.0.1", 0)
        out: dict[str, Any] = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
                    ("grpc.max_send_message_length", 1 << 20)]) as ch:
                stub = pb_grpc.RouterStub(ch)
                for name, (at, past, _, _) in CASES.items():
                    out[name] = (await code(stub.Generate(at())), len(stack.core.store.list_chains()),
                                 await code(stub.Generate(past())), len(stack.core.store.list_chains()))
                # Chain ids: one at the limit is looked up (and unknown), one past it refused unread.
                for n in (LIMITS.max_chain_id_chars, LIMITS.max_chain_id_chars + 1):
                    out[f"chain_{n}"] = [
                        (await code(stub.Generate(pb.GenerateRequest(chain_id="c" * n, prompt_token_ids=[1, 2],
                                                                     sampling=GREEDY))))[:2],
                        (await code(stub.ResumeChain(pb.ResumeChainRequest(chain_id="c" * n))))[:2],
                        await unary(stub.GetChain(pb.GetChainRequest(chain_id="c" * n))),
                        await unary(stub.Cancel(pb.CancelChainRequest(chain_id="c" * n)))]
                # No max_tokens on the wire: the default budget, not the whole context.
                unset = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
                unset.max_tokens = 0
                out["default_max_tokens"] = await code(stub.Generate(pb.GenerateRequest(
                    prompt_token_ids=[1, 2, 3], sampling=unset)))
        finally:
            await server.stop(0)
            await stack.aclose()
        return out

    out = asyncio.run(go())
    for name, (_, _, status, limit) in CASES.items():
        (at_code, at_detail, _), chains_at, (past_code, past_detail, _), chains_past = out[name]
        assert at_code == grpc.StatusCode.OK, (name, at_detail)
        assert past_code == status and limit in past_detail, (name, past_code, past_detail)
        assert chains_past == chains_at  # refused before any turn started
    at, past = out[f"chain_{LIMITS.max_chain_id_chars}"], out[f"chain_{LIMITS.max_chain_id_chars + 1}"]
    assert {c for c, _ in at} == {grpc.StatusCode.NOT_FOUND}, at
    assert {c for c, _ in past} == {grpc.StatusCode.INVALID_ARGUMENT}, past
    assert all("max_chain_id_chars" in detail for _, detail in past)
    status, _, chunks = out["default_max_tokens"]
    assert status == grpc.StatusCode.OK and len(chunks) == LIMITS.default_max_tokens


async def _stream_of(call: Any) -> Any:
    """A unary call as a one-item stream (one status helper for both kinds)."""
    yield await call
