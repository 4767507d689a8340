"""Every `SamplingParams` field crosses the wire (router → worker protos) and comes back unchanged."""

from __future__ import annotations

import pytest

from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto.convert import sampling_from_proto, sampling_to_proto
from k2serve.sampling_params import Constraint, SamplingParams, ToolSchema

# A value for every field, each unlike its default (and exact in the proto's float32).
EVERY_FIELD = {"temperature": 0.5, "top_p": 0.75, "top_k": 7, "seed": 2**62 + 3, "max_tokens": 123,
               "stop_token_ids": [5, 9], "ignore_eos": True, "logprobs": True, "top_logprobs": 4, "min_p": 0.125,
               "presence_penalty": 0.5, "frequency_penalty": -0.25, "repetition_penalty": 1.5,
               "logit_bias": {3: 2.5, 7: -100.0}, "max_reasoning_tokens": 17,
               # the Constraint's flags unlike their defaults too (a json constraint's schema: below)
               "constraint": Constraint(kind="tool_calls",
                                        tools=[ToolSchema(name="f.x", parameters='{"type": "object", "required": []}')],
                                        parallel=False, required=False, after_think=False)}


def test_the_proto_and_the_model_have_the_same_fields() -> None:
    assert set(SamplingParams.model_fields) == {f.name for f in pb.SamplingParams.DESCRIPTOR.fields}
    assert set(EVERY_FIELD) == set(SamplingParams.model_fields)


def test_every_field_round_trips() -> None:
    params = SamplingParams(**EVERY_FIELD)
    defaults = SamplingParams()
    assert all(getattr(params, name) != getattr(defaults, name) for name in EVERY_FIELD)
    wire = pb.SamplingParams.FromString(sampling_to_proto(params).SerializeToString())
    assert sampling_from_proto(wire) == params


def test_defaults_and_an_unset_seed_round_trip() -> None:
    assert sampling_from_proto(sampling_to_proto(SamplingParams())) == SamplingParams()
    assert not sampling_to_proto(SamplingParams()).HasField("seed")


def test_a_bad_value_from_the_wire_names_its_field() -> None:
    with pytest.raises(ValueError, match="top_logprobs"):
        sampling_from_proto(pb.SamplingParams(max_tokens=1, top_logprobs=99, logprobs=True))


def test_a_json_constraint_round_trips() -> None:
    params = SamplingParams(constraint=Constraint(kind="json", json_schema='{"type": "array"}'))
    assert sampling_from_proto(pb.SamplingParams.FromString(sampling_to_proto(params).SerializeToString())) == params
