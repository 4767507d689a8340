"""Issue 6's first acceptance point on the stack a user runs: `k2serve up` (pool controller, worker groups as Ray
actors, P/D with a KV handoff) with a configured `kill_actor` fault that kills a decode group's rank actor
mid-stream. Every gRPC `Router.Generate` stream completes with contiguous indices and, in deterministic mode,
exactly the tokens of a fault-free single engine — greedy and seeded temperature 1.0."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import yaml
from helpers.tiny import tiny_tokenizer, tiny_weights
from helpers.up import k2serve_up

from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc
from k2serve.proto.convert import sampling_to_proto
from k2serve.sampling_params import SamplingParams
from k2serve.worker.engine.engine import Engine
from k2serve.worker.engine.settings import EngineConfig
from k2serve.worker.model.k2 import K2Model

PROMPTS = [[(7 * i + 3 * j) % 256 for j in range(40 + 9 * i)] for i in range(4)]
PARAMS = [SamplingParams(temperature=0.0, max_tokens=40), SamplingParams(temperature=1.0, seed=11, max_tokens=40),
          SamplingParams(temperature=0.0, max_tokens=40), SamplingParams(temperature=1.0, seed=23, max_tokens=40)]


def fault_free(prompt: list[int], params: SamplingParams) -> list[int]:
    w = tiny_weights()
    engine = Engine(K2Model(w.config, w.dense, w.experts, deterministic=True), EngineConfig(deterministic=True),
                    eos_token_ids=tiny_tokenizer().eos_ids)
    engine.add_request("r", prompt, params)
    out: list[int] = []
    while engine.has_work():
        out += [e.token for e in engine.step()]
    return out


def test_killed_decode_actor_mid_stream_gives_identical_tokens(tmp_path: Path) -> None:
    config = tmp_path / "up.yaml"
    config.write_text(yaml.safe_dump({
        "deterministic": True, "decode": {"groups": 2},
        "chain_store": {"sqlite_path": str(tmp_path / "chains.sqlite3")},
        # decode-0's rank 0 dies once decode-0 has streamed 10 tokens: the router re-dispatches to decode-1.
        "faults": [{"kind": "kill_actor", "pool": "decode", "group": 0, "rank": 0, "after_tokens": 10}],
    }))
    with k2serve_up(config, tmp_path) as stack, grpc.insecure_channel(stack.grpc) as channel:
        router = pb_grpc.RouterStub(channel)
        for prompt, params in zip(PROMPTS, PARAMS):
            chunks = list(router.Generate(pb.GenerateRequest(prompt_token_ids=prompt, sampling=sampling_to_proto(params),
                                                             deterministic=True), timeout=120))
            assert [c.index for c in chunks] == list(range(len(chunks)))  # nothing missing or repeated
            assert chunks[-1].finish_reason
            assert [c.token for c in chunks] == fault_free(prompt, params)
        metrics = httpx.get(f"{stack.url}/metrics").text
    migrated = [line for line in metrics.splitlines() if line.startswith("k2serve_migrations_total ")]
    assert migrated and float(migrated[0].split()[1]) >= 1, "the fault never fired: no stream was re-dispatched"
