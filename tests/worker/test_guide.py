"""Constrained decoding through the real sampler and xgrammar on the tiny tokenizer's vocabulary, with random
logits: every JSON answer validates against its (generated) schema, every forced tool call is well formed with
arguments valid against its tool, the reasoning budget closes the thinking section, and a guide rebuilt from a
replayed prefix steers exactly like the live one."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import jsonschema
import pytest
import torch
from helpers.tiny import tiny_tokenizer, tiny_weights
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2serve.sampling_params import Constraint, SamplingParams, ToolSchema
from k2serve.worker.engine.grammar import GrammarVocab, Grammars
from k2serve.worker.engine.guide import Guide, GuideViolation, Phase
from k2serve.worker.engine.sampling import sample

MAX_STEPS = 3000


@lru_cache(maxsize=1)
def grammars() -> Grammars:
    return Grammars(GrammarVocab.from_tokenizer(tiny_tokenizer(), tiny_weights().config.vocab_size))


_names = st.from_regex(r"[a-z]{1,6}", fullmatch=True)
_leaves = st.one_of(
    st.sampled_from([{"type": "integer"}, {"type": "boolean"}, {"type": "null"}, {"type": "number"}]),
    st.integers(0, 8).map(lambda n: {"type": "string", "maxLength": n}),
    st.tuples(st.integers(-50, 0), st.integers(0, 50)).map(lambda r: {"type": "integer", "minimum": r[0],
                                                                      "maximum": r[1]}),
    st.lists(st.sampled_from(["a", "b c", "ü", "x\"y"]), min_size=1, max_size=3, unique=True).map(
        lambda e: {"enum": e}),
)


def _objects(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    def with_required(props: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        required = st.lists(st.sampled_from(sorted(props)), unique=True) if props else st.just([])
        return required.map(lambda req: {"type": "object", "properties": props, "required": req,
                                         "additionalProperties": False})
    return st.dictionaries(_names, children, max_size=3).flatmap(with_required)


schemas = st.recursive(_leaves, lambda c: st.one_of(
    _objects(c), c.map(lambda i: {"type": "array", "items": i, "maxItems": 3}),
    st.lists(c, min_size=1, max_size=3).map(lambda cs: {"anyOf": cs})), max_leaves=6)
object_schemas = _objects(schemas)


def generate(guide: Guide, seed: int, temperature: float = 1.0) -> list[int]:
    """Samples until the guide's answer ends, from random logits: only the bitmask can make it valid."""
    g = torch.Generator().manual_seed(seed)
    vocab = guide.vocab
    params = SamplingParams(temperature=temperature)
    out: list[int] = []
    for step in range(MAX_STEPS):
        logits = torch.randn(1, vocab.size, generator=g) * 3  # [1, V]
        row = torch.full((1, -(-vocab.size // 32)), -1, dtype=torch.int32)  # [1, W]
        masked = [0] if guide.masks else []
        if masked:
            guide.fill(row[0])
        token = int(sample(logits, [params], [seed], [step], bitmask=row, masked_rows=masked).tokens[0])
        guide.accept(token)
        out.append(token)
        if token in vocab.eos_ids:
            return out
    raise AssertionError(f"no end within {MAX_STEPS} tokens: {out[:50]}")


def answer_text(tokens: list[int]) -> bytes:
    vocab = grammars().vocab
    end = tokens.index(vocab.think_end)
    return b"".join(vocab.encoded[t] for t in tokens[end + 1:-1])


@settings(max_examples=250, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(schema=schemas, seed=st.integers(0, 2**31), budget=st.integers(0, 4))
def test_json_answers_validate(schema: dict[str, Any], seed: int, budget: int) -> None:
    c = Constraint(kind="json", json_schema=json.dumps(schema))
    guide = Guide(SamplingParams(constraint=c, max_reasoning_tokens=budget), grammars().vocab, grammars().compile(c))
    tokens = generate(guide, seed)
    assert tokens.index(grammars().vocab.think_end) <= budget
    jsonschema.validate(json.loads(answer_text(tokens)), schema)


def parse_calls(tokens: list[int]) -> list[tuple[str, Any]]:
    """K2's tool-call section (after `</think>`, or ending the reasoning itself) → [(id, arguments)]; asserts its
    exact token structure."""
    v = grammars().vocab
    rest = tokens[tokens.index(v.section_begin):]
    assert v.think_end not in rest and rest[-2] == v.section_end and rest[-1] in v.eos_ids
    calls = []
    body = rest[1:-2]
    while body:
        assert body[0] == v.call_begin
        arg, end = body.index(v.argument_begin), body.index(v.call_end)
        text = lambda ts: b"".join(v.encoded[t] for t in ts).decode()  # noqa: E731
        calls.append((text(body[1:arg]), json.loads(text(body[arg + 1:end]))))
        body = body[end + 1:]
    return calls


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(tools=st.dictionaries(_names, object_schemas, min_size=1, max_size=3), parallel=st.booleans(),
       seed=st.integers(0, 2**31))
def test_forced_tool_calls_are_well_formed(tools: dict[str, dict[str, Any]], parallel: bool, seed: int) -> None:
    c = Constraint(kind="tool_calls", parallel=parallel,
                   tools=[ToolSchema(name=n, parameters=json.dumps(s)) for n, s in tools.items()])
    guide = Guide(SamplingParams(constraint=c, max_reasoning_tokens=2), grammars().vocab, grammars().compile(c))
    calls = parse_calls(generate(guide, seed))
    assert calls and (parallel or len(calls) == 1)
    for i, (call_id, args) in enumerate(calls):
        name, index = call_id.removeprefix("functions.").rsplit(":", 1)
        assert call_id.startswith("functions.") and int(index) == i
        jsonschema.validate(args, tools[name])


def test_replayed_guide_steers_like_the_live_one() -> None:
    schema = {"type": "object", "properties": {"k": {"type": "array", "items": {"type": "integer"}}},
              "required": ["k"], "additionalProperties": False}
    c = Constraint(kind="json", json_schema=json.dumps(schema))
    params = SamplingParams(constraint=c, max_reasoning_tokens=3)
    v, compiled = grammars().vocab, grammars().compile(c)
    tokens = generate(Guide(params, v, compiled), seed=11)
    width = -(-v.size // 32)
    for cut in (0, 2, 4, len(tokens) // 2, len(tokens) - 1):
        live, resumed = Guide(params, v, compiled), Guide(params, v, compiled)
        for t in tokens[:cut]:
            live.accept(t)
            resumed.accept(t)
        for t in tokens[cut:]:
            a, b = torch.zeros(width, dtype=torch.int32), torch.zeros(width, dtype=torch.int32)
            live.fill(a)
            resumed.fill(b)
            assert torch.equal(a, b)
            live.accept(t)
            resumed.accept(t)


def test_a_prefix_the_constraint_forbids_is_refused() -> None:
    c = Constraint(kind="json", json_schema='{"type": "integer"}')
    v = grammars().vocab
    guide = Guide(SamplingParams(constraint=c), v, grammars().compile(c))
    with pytest.raises(GuideViolation):
        guide.accept(v.eos_ids[0])  # the turn may not end inside the reasoning of a constrained answer
    guide.accept(v.think_end)
    assert guide.phase is Phase.JSON
    with pytest.raises(GuideViolation):
        guide.accept(tiny_tokenizer().encode("x")[0])
    with pytest.raises(ValueError, match="unusable JSON schema"):
        Grammars.check(Constraint(kind="json", json_schema='{"type": "no-such-type"}'))
