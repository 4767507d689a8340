"""The engine's counters reach /metrics through one snapshot: `EngineStats`, exported field by field by the
worker service under its group's labels. A counter added to `EngineStats` without a Prometheus counter fails here."""

from __future__ import annotations

import asyncio
import random
from dataclasses import asdict, fields

from helpers.tiny import run_all, tiny_engine

from k2serve.metrics import Metrics
from k2serve.worker.engine.requests import EngineStats
from k2serve.worker.engine.loop import EngineLoop
from k2serve.worker.engine.sampling import SamplingParams
from k2serve.worker.grpc_service import WorkerService


def test_every_engine_counter_has_a_metric() -> None:
    assert {f.name for f in fields(EngineStats)} == set(Metrics().engine_counters)


def test_every_engine_counter_is_exported_with_its_value() -> None:
    # Three 16-token prompts fill the 6 blocks of 8 at admission: decoding on, sequences get preempted.
    engine = tiny_engine(deterministic=True, num_blocks=6, block_size=8)
    rng = random.Random(13)
    for i in range(3):
        prompt = [rng.randrange(256) for _ in range(16)]
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=20))
    run_all(engine)
    assert engine.stats.preemptions > 0 and engine.stats.steps > 0
    metrics = Metrics()

    async def export() -> None:
        loop = EngineLoop(engine)
        service = WorkerService(loop, group_id="decode-0", role="decode", block_size=8, metrics=metrics)
        loop.start()
        try:
            await service._export_gauges()
            await service._export_gauges()  # a second export adds only what changed since: nothing
        finally:
            await loop.stop()

    asyncio.run(export())
    labels = {"role": "decode", "group": "decode-0"}
    for name, value in asdict(engine.stats).items():
        totals = [s.value for family in metrics.engine_counters[name].collect() for s in family.samples
                  if s.name.endswith("_total") and s.labels == labels]
        assert totals == [value], name
