"""Prefill/decode disaggregation through real gRPC groups and Ray's object store: the KV handoff is used,
its failure falls back to re-prefill, and both give the single engine's greedy tokens."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers.tiny import run_all, tiny_engine

from k2serve.config import ServingConfig
from k2serve.metrics import Metrics
from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc
from k2serve.stack.inproc import start_local_stack
from k2serve.worker.engine.requests import KVHandoffLost
from k2serve.worker.engine.sampling import SamplingParams
from k2serve.proto.convert import sampling_to_proto

PROMPT = [(7 * i + 3) % 500 for i in range(45)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def config(tmp_path: Path, **router: object) -> ServingConfig:
    return ServingConfig.model_validate({"chain_store": {"sqlite_path": str(tmp_path / "chains.sqlite3")},
                                         "router": router})


def single_engine_tokens(prompt: list[int], params: SamplingParams) -> list[int]:
    engine = tiny_engine()
    engine.add_request("r", prompt, params)
    return run_all(engine)["r"]


def test_pd_greedy_equals_single_engine_and_uses_the_handoff(ray_cluster: None, tmp_path: Path) -> None:
    async def go() -> tuple[list[int], list[int], Metrics, int]:
        stack = await start_local_stack(config(tmp_path))
        try:
            toks = [t async for t in stack.core.generate(PROMPT, GREEDY)]
            decode = next(g for g in stack.groups if g.service.role == "decode")
            return [t.token for t in toks], [t.index for t in toks], stack.core.metrics, decode.service.handoffs.ok
        finally:
            await stack.aclose()

    tokens, indices, metrics, group_ok = asyncio.run(go())
    assert tokens == single_engine_tokens(PROMPT, GREEDY)
    assert indices == list(range(GREEDY.max_tokens))
    assert metrics.registry.get_sample_value("k2serve_kv_handoffs_total", {"outcome": "ok"}) == 1
    assert metrics.registry.get_sample_value("k2serve_kv_handoffs_total", {"outcome": "fallback"}) == 0
    assert group_ok == 1


def test_aggregated_mode_equals_single_engine(tmp_path: Path) -> None:
    async def go() -> tuple[list[int], list[str]]:
        stack = await start_local_stack(config(tmp_path, aggregated=True))
        try:
            return [t.token async for t in stack.core.generate(PROMPT, GREEDY)], [g.service.role for g in stack.groups]
        finally:
            await stack.aclose()

    tokens, roles = asyncio.run(go())
    assert roles == ["both"]
    assert tokens == single_engine_tokens(PROMPT, GREEDY)


class _LosesHandoffs:
    """A group's engine whose import of a handed-off KV fails as a rank's does when the object is gone between
    the leader's check and the rank reading it."""

    kv_in_object_store = True

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def add_request(self, request_id: str, prompt: list[int], params: Any, **kwargs: Any) -> int:
        if kwargs.get("kv") is not None:
            raise KVHandoffLost("the object is gone")
        return self._engine.add_request(request_id, prompt, params, **kwargs)


@pytest.mark.parametrize("handle", ["guessed_id", "other_prompt", "lost_on_rank"])
def test_failed_handoff_falls_back_to_reprefill(ray_cluster: None, tmp_path: Path, handle: str) -> None:
    """A decode group given an unusable KV handle (an id the prefill group does not hold, another prompt's), or
    whose rank cannot read the KV, recomputes the prompt itself: same tokens, counted as fallback. (Handles
    from attackers: tests/worker/test_kv_handoff_attacks.py.)"""
    expected = single_engine_tokens(PROMPT, GREEDY)

    async def go() -> tuple[list[pb.TokenEvent], int]:
        stack = await start_local_stack(config(tmp_path))
        try:
            by_role = {g.service.role: g for g in stack.groups}
            async with grpc.aio.insecure_channel(by_role["prefill"].address) as ch:
                other = PROMPT[::-1] if handle == "other_prompt" else PROMPT
                resp = await pb_grpc.WorkerGroupStub(ch).Prefill(pb.PrefillRequest(
                    request_id="p", prompt=other, sampling=sampling_to_proto(GREEDY)))
            kv_handle = resp.kv_handle
            if handle == "guessed_id":
                kv_handle.id = bytes(len(kv_handle.id))
            if handle == "lost_on_rank":
                loop = by_role["decode"].service.loop
                loop.engine = _LosesHandoffs(loop.engine)
            assert resp.kv_tokens == len(PROMPT)
            async with grpc.aio.insecure_channel(by_role["decode"].address) as ch:
                events = [ev async for ev in pb_grpc.WorkerGroupStub(ch).Decode(pb.DecodeRequest(
                    request_id="d", prompt=PROMPT, sampling=sampling_to_proto(GREEDY),
                    output_prefix=expected[:1], kv_handle=kv_handle))]
            return events, by_role["decode"].service.handoffs.fallback
        finally:
            await stack.aclose()

    events, fallbacks = asyncio.run(go())
    assert events[0].kv_handoff == "fallback" and fallbacks == 1
    assert [ev.index for ev in events] == list(range(1, GREEDY.max_tokens))
    assert [ev.token for ev in events] == expected[1:]
    assert events[-1].finish_reason == "length"


def test_32_concurrent_streams_complete(ray_cluster: None, tmp_path: Path) -> None:
    lengths = [3 + (5 * i) % 40 for i in range(32)]
    max_tokens = [1 + (3 * i) % 11 for i in range(32)]

    async def one(stack_core: object, i: int) -> list[int]:
        prompt = [(i * 13 + j) % 500 for j in range(lengths[i])]
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens[i], ignore_eos=True)
        return [t.index async for t in stack_core.generate(prompt, params)]  # type: ignore[attr-defined]

    async def go() -> list[list[int]]:
        stack = await start_local_stack(config(tmp_path))
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(stack.core, i) for i in range(32))), 120)
        finally:
            await stack.aclose()

    results = asyncio.run(go())
    assert [r for r in results] == [list(range(n)) for n in max_tokens]
