"""A router's Decode streams to one group multiplexed on one `DecodeMany` call (router/mux.py over the worker
service): each request gets exactly the tokens of its own `Decode` stream, a message carries several requests'
tokens, a cancel or a bad request touches only its own stream, the group dying fails every open stream (and
the next open starts a new call), and a router that goes away leaves nothing running in the group."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from k2serve.config import ServingConfig
from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc
from k2serve.proto.convert import sampling_to_proto
from k2serve.worker.parallel.inproc_group import InProcessGroup
from k2serve.router.mux import DecodeMux, GroupFailed, MuxStream
from k2serve.worker.engine.sampling import SamplingParams
from k2serve.worker.loader import resolve_checkpoint

GREEDY = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
LONG = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
PROMPTS = [[(7 * i + j) % 250 + 1 for j in range(5 + 3 * i)] for i in range(4)]


Body = Callable[[InProcessGroup, pb_grpc.WorkerGroupStub, DecodeMux], Awaitable[None]]


def with_group(body: Body) -> None:
    """Runs `body(group, stub, mux)` against a fresh in-process decode group; the mux is closed after."""
    config = ServingConfig.model_validate({"model": {"max_context": 128}})

    async def go() -> None:
        group = await InProcessGroup.start(resolve_checkpoint("builtin:tiny-k2"), config.decode, config, group_id="g0",
                                       role="decode", eos_ids=[])
        try:
            async with grpc.aio.insecure_channel(group.address) as ch:
                stub = pb_grpc.WorkerGroupStub(ch)
                mux = DecodeMux(stub, "g0")
                try:
                    await body(group, stub, mux)
                finally:
                    await mux.aclose()
        finally:
            await group.stop()

    asyncio.run(go())


async def tokens(stream: MuxStream | grpc.aio.UnaryStreamCall) -> list[int]:
    return [ev.token async for ev in stream]


async def started(mux: DecodeMux, n: int, prefix: str) -> list[MuxStream]:
    """n long requests on `mux`, each past its first token (running in the group)."""
    streams = [mux.open(pb.DecodeRequest(request_id=f"{prefix}{i}", prompt=p, sampling=LONG))
               for i, p in enumerate(PROMPTS[:n])]
    for s in streams:
        await anext(s)
    return streams


def test_requests_share_one_call_and_get_their_own_tokens() -> None:
    async def body(group: InProcessGroup, stub: pb_grpc.WorkerGroupStub, mux: DecodeMux) -> None:
        alone = [await tokens(stub.Decode(pb.DecodeRequest(request_id=f"a{i}", prompt=p, sampling=GREEDY)))
                 for i, p in enumerate(PROMPTS)]
        assert all(len(t) == 12 for t in alone) and len({tuple(t) for t in alone}) == len(PROMPTS)
        streams = [mux.open(pb.DecodeRequest(request_id=f"m{i}", prompt=p, sampling=GREEDY))
                   for i, p in enumerate(PROMPTS)]
        assert await asyncio.gather(*(tokens(s) for s in streams)) == alone

        # The wire: one message carries the tokens of several requests (one per request and step).
        async def requests() -> AsyncIterator[pb.DecodeManyRequest]:
            for i, p in enumerate(PROMPTS):
                yield pb.DecodeManyRequest(decode=pb.DecodeRequest(request_id=f"w{i}", prompt=p, sampling=GREEDY))
            await asyncio.Event().wait()  # keep the call open: half-closing is not the end of the requests

        call = stub.DecodeMany(requests())
        got: dict[str, list[int]] = {f"w{i}": [] for i in range(len(PROMPTS))}
        sizes = []
        async for msg in call:
            sizes.append(len(msg.events))
            for ev in msg.events:
                got[ev.request_id].append(ev.token)
            if sum(map(len, got.values())) == 12 * len(PROMPTS):
                break
        call.cancel()
        assert [got[f"w{i}"] for i in range(len(PROMPTS))] == alone
        assert max(sizes) > 1 and len(sizes) < 12 * len(PROMPTS)

    with_group(body)


def test_cancel_and_bad_request_touch_only_their_stream() -> None:
    async def body(group: InProcessGroup, stub: pb_grpc.WorkerGroupStub, mux: DecodeMux) -> None:
        [doomed] = await started(mux, 1, "long")
        bad = mux.open(pb.DecodeRequest(request_id="bad", prompt=[1, 2], sampling=pb.SamplingParams(max_tokens=0)))
        with pytest.raises(ValueError, match="max_tokens"):
            await anext(bad)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await anext(doomed)
        ok = mux.open(pb.DecodeRequest(request_id="ok", prompt=PROMPTS[0], sampling=GREEDY))
        assert len(await tokens(ok)) == 12
        stats = await stub.Stats(pb.StatsRequest())
        assert stats.running == 0 and stats.kv_blocks_used == 0  # the cancelled request is gone too

    with_group(body)


def test_group_death_fails_every_open_stream_and_the_next_open_reconnects() -> None:
    async def body(group: InProcessGroup, stub: pb_grpc.WorkerGroupStub, mux: DecodeMux) -> None:
        streams = await started(mux, 2, "s")
        host, port = group.address.rsplit(":", 1)
        await group.service.stop()  # the group dies (its streams end with an error) ...
        for s in streams:
            with pytest.raises(GroupFailed, match="g0"):
                await tokens(s)
        group.service = group.build()  # ... and comes back on the same address, as a restarted pod
        await group.service.start(host, int(port))
        again = mux.open(pb.DecodeRequest(request_id="again", prompt=PROMPTS[0], sampling=GREEDY))
        assert len(await tokens(again)) == 12

    with_group(body)


def test_router_going_away_stops_its_requests_in_the_group() -> None:
    async def body(group: InProcessGroup, stub: pb_grpc.WorkerGroupStub, mux: DecodeMux) -> None:
        await started(mux, 3, "r")
        assert (await stub.Stats(pb.StatsRequest())).running == 3
        await mux.aclose()  # (closing it again after the body is harmless)
        for _ in range(100):
            if (await stub.Stats(pb.StatsRequest())).running == 0:
                break
            await asyncio.sleep(0.05)
        stats = await stub.Stats(pb.StatsRequest())
        assert stats.running == 0 and stats.kv_blocks_used == 0

    with_group(body)
