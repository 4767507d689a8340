"""Constrained requests through the engine on tiny-k2: the answer validates, a resumed request replays its prefix
through the matcher and continues exactly as the uninterrupted one (deterministic mode), and requests the engine
cannot steer are refused before they are queued."""

from __future__ import annotations

import json

import jsonschema
import pytest
from helpers.tiny import run_all, tiny_engine, tiny_tokenizer

from k2serve.sampling_params import Constraint, SamplingParams

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                          "maximum": 99},
                                           "tag": {"enum": ["a", "b"]}},
          "required": ["ok", "n", "tag"], "additionalProperties": False}


def test_constrained_answer_validates_and_resumes_identically() -> None:
    tok = tiny_tokenizer()
    params = SamplingParams(temperature=1.0, seed=4, max_tokens=80, max_reasoning_tokens=3,
                            constraint=Constraint(kind="json", json_schema=json.dumps(SCHEMA)))
    prompt = tok.encode("give me json")
    engine = tiny_engine(deterministic=True, guided=True)
    engine.add_request("a", prompt, params)
    full = run_all(engine)["a"]
    think_end = tok.token_id("</think>")
    assert full.index(think_end) <= 3 and full[-1] in tok.eos_ids
    jsonschema.validate(json.loads(tok.decode(full[full.index(think_end) + 1:-1])), SCHEMA)
    for cut in (2, full.index(think_end) + 3, len(full) - 2):  # in the reasoning, inside and at the end of the JSON
        resumed = tiny_engine(deterministic=True, guided=True)
        resumed.add_request("a", prompt, params, output_prefix=full[:cut])
        assert full[:cut] + run_all(resumed)["a"] == full


def test_unsteerable_requests_are_refused() -> None:
    json_params = SamplingParams(constraint=Constraint(kind="json", json_schema=json.dumps(SCHEMA)))
    with pytest.raises(ValueError, match="without a tokenizer"):
        tiny_engine().add_request("a", [1, 2, 3], json_params)
    engine = tiny_engine(deterministic=True, guided=True)
    with pytest.raises(ValueError, match="unusable JSON schema"):
        engine.add_request("b", [1, 2], SamplingParams(constraint=Constraint(kind="json", json_schema="[1, 2]")))
    with pytest.raises(ValueError, match="breaks the constrained answer"):  # a resumed prefix the schema forbids
        engine.add_request("c", [1, 2], json_params, output_prefix=[tiny_tokenizer().token_id("</think>"), 65])
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request("d", [1, 2], SamplingParams(logit_bias={10**6: 1.0}))
    assert not engine.has_work()
