"""Parallel sampling in the engine (engine/forks.py): a request's choices share one prefill — the prefill counter
counts its prompt once — and each choice is the same request alone with that choice's seed."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from helpers.tiny import run_all, tiny_engine, tiny_tokenizer

from k2serve.sampling_params import Constraint
from k2serve.worker.engine.sampling import SamplingParams

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
          "additionalProperties": False}


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("length", [37, 48])  # a partial last block, and whole blocks only
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_four_choices_prefill_once_and_equal_their_seed_alone(length: int, prefix_caching: bool) -> None:
    p = prompt(length, seed=length)
    params = SamplingParams(temperature=1.0, seed=40, max_tokens=10)
    engine = tiny_engine(deterministic=True, enable_prefix_caching=prefix_caching)
    engine.add_request("c0", p, params, forks=[(f"c{i}", 40 + i) for i in range(1, 4)])
    assert engine.has_request("c3") and sorted(engine.request_ids) == ["c0", "c1", "c2", "c3"]
    forked = run_all(engine)
    assert engine.stats.prefill_tokens == length  # the prompt once, not four times
    assert len({tuple(t) for t in forked.values()}) > 1  # the seeds differ, so do (some of) the choices
    for i in range(4):
        alone = tiny_engine(deterministic=True)
        alone.add_request("x", p, params.model_copy(update={"seed": 40 + i}))
        assert run_all(alone)["x"] == forked[f"c{i}"], f"choice {i}"
        assert alone.stats.prefill_tokens == length


def test_guided_choices_fork_and_stay_valid() -> None:
    tok = tiny_tokenizer()
    p = tok.encode(json.dumps({"q": "a number"}))
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=40,
                            constraint=Constraint(kind="json", json_schema=json.dumps(SCHEMA), after_think=False))
    engine = tiny_engine(deterministic=True, guided=True)
    engine.add_request("c0", p, params, forks=[("c1", 6), ("c2", 7)])
    forked = run_all(engine)
    assert engine.stats.prefill_tokens == len(p)
    for i, rid in enumerate(("c0", "c1", "c2")):
        jsonschema.validate(json.loads(tok.decode(forked[rid][:-1])), SCHEMA)  # the last token is the stop token
        alone = tiny_engine(deterministic=True, guided=True)
        alone.add_request("x", p, params.model_copy(update={"seed": 5 + i}))
        assert run_all(alone)["x"] == forked[rid]


def test_cancelled_parent_leaves_its_choices_to_prefill_alone() -> None:
    p = prompt(100, seed=1)
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=4)
    engine = tiny_engine(deterministic=True, max_batch_tokens=32)  # the prompt takes several steps
    engine.add_request("c0", p, params, forks=[("c1", 2), ("c2", 3)])
    engine.step()
    assert engine.cancel("c2") and engine.cancel("c0")  # a child, then the parent mid-prefill
    out = run_all(engine)
    assert set(out) == {"c1"} and len(out["c1"]) == 4
    alone = tiny_engine(deterministic=True)
    alone.add_request("x", p, params.model_copy(update={"seed": 2}))
    assert run_all(alone)["x"] == out["c1"]


def test_fork_refusals() -> None:
    engine = tiny_engine()
    params = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="distinct"):
        engine.add_request("a", [1, 2, 3], params, forks=[("b", 1), ("b", 2)])
    with pytest.raises(ValueError, match="only a fresh request forks"):
        engine.add_request("a", [1, 2, 3], params, output_prefix=[4], forks=[("b", 1)])
    engine.add_request("a", [1, 2, 3], params)
    with pytest.raises(ValueError, match="already in this engine"):
        engine.add_request("b", [1, 2, 3], params, forks=[("a", 1)])
