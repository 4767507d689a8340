"""The worker group's gRPC service on its own: Health, Stats and group gauges, a one-token Prefill that
finishes the request, Cancel, and bad requests answered INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from k2serve.config import ServingConfig
from k2serve.metrics import Metrics
from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc
from k2serve.worker.parallel.inproc_group import InProcessGroup
from k2serve.worker.engine.sampling import SamplingParams
from k2serve.worker.loader import resolve_checkpoint
from k2serve.proto.convert import sampling_to_proto


def test_worker_service_rpcs(tmp_path: Path) -> None:
    config = ServingConfig.model_validate({"model": {"max_context": 128}})
    metrics = Metrics()

    async def go() -> None:
        group = await InProcessGroup.start(resolve_checkpoint("builtin:tiny-k2"), config.decode, config, group_id="g0",
                                       role="decode", eos_ids=[], metrics=metrics)
        try:
            async with grpc.aio.insecure_channel(group.address) as ch:
                stub = pb_grpc.WorkerGroupStub(ch)
                health = await stub.Health(pb.HealthRequest())
                assert (health.healthy, health.role, health.group_id) == (True, "decode", "g0")

                one = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=1))
                resp = await stub.Prefill(pb.PrefillRequest(request_id="p", prompt=list(range(40)), sampling=one))
                assert resp.first.finish_reason == "length" and not resp.HasField("kv_handle") and resp.first.index == 0

                long = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True))
                stream = stub.Decode(pb.DecodeRequest(request_id="d", prompt=[1, 2, 3], sampling=long))
                first = await stream.read()
                assert first.index == 0 and first.seed != 0
                assert (await stub.Cancel(pb.CancelRequest(request_id="d"))).cancelled
                assert not (await stub.Cancel(pb.CancelRequest(request_id="d"))).cancelled

                stats = await stub.Stats(pb.StatsRequest())
                assert stats.running == 0 and stats.kv_blocks_used == 0  # nothing held after cancel/finish
                assert stats.prefill_tokens >= 43

                for bad, match in ((pb.SamplingParams(max_tokens=0), "max_tokens"),
                                   (pb.SamplingParams(max_tokens=200), "context limit")):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.Prefill(pb.PrefillRequest(request_id="x", prompt=[1, 2], sampling=bad))
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in err.value.details()
            await asyncio.sleep(0.7)  # one housekeeping round exports the gauges
        finally:
            await group.stop()

    asyncio.run(go())
    labels = {"role": "decode", "group": "g0"}
    assert metrics.registry.get_sample_value("k2serve_worker_group_healthy", labels) == 1
    assert metrics.registry.get_sample_value("k2serve_prefill_tokens_total", labels) >= 43
