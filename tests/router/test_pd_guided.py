"""A JSON-constrained turn across the prefill → decode handoff: the prefill group samples the first token under
the constraint, the decode group rebuilds the matcher by replaying it, and the turn equals the single engine's."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
from helpers.tiny import run_all, tiny_engine, tiny_tokenizer

from k2serve.config import ServingConfig
from k2serve.stack.inproc import start_local_stack
from k2serve.sampling_params import Constraint, SamplingParams

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["a", "b"]}},
          "required": ["ok", "tag"], "additionalProperties": False}
PARAMS = SamplingParams(temperature=0.0, max_tokens=60, max_reasoning_tokens=2,
                        constraint=Constraint(kind="json", json_schema=json.dumps(SCHEMA)))


def test_constrained_turn_across_the_handoff(ray_cluster: None, tmp_path: Path) -> None:
    prompt = tiny_tokenizer().encode("json please")

    async def go() -> tuple[list[int], int]:
        config = ServingConfig.model_validate({"chain_store": {"sqlite_path": str(tmp_path / "chains.sqlite3")}})
        stack = await start_local_stack(config)
        try:
            tokens = [t.token async for t in stack.core.generate(prompt, PARAMS)]
            decode = next(g for g in stack.groups if g.service.role == "decode")
            return tokens, decode.service.handoffs.ok
        finally:
            await stack.aclose()

    tokens, handoffs = asyncio.run(go())
    engine = tiny_engine(guided=True)
    engine.add_request("r", prompt, PARAMS)
    assert tokens == run_all(engine)["r"] and handoffs == 1
    tok = tiny_tokenizer()
    answer = tokens[tokens.index(tok.token_id("</think>")) + 1:-1]
    jsonschema.validate(json.loads(tok.decode(answer)), SCHEMA)
