"""Conversions between the wire types (protobuf) and the in-process types, done once at the process edge.

`SamplingParams` and its proto carry the same field names, so both directions go field by field over the model:
a field added to one side only fails loudly (an unknown proto field, or pydantic's `extra="forbid"`) instead of
being dropped (tests/test_sampling_wire.py round-trips every field)."""

from __future__ import annotations

from k2serve.proto import k2serve_pb2 as pb
from k2serve.sampling_params import Constraint, SamplingParams, ToolSchema


def sampling_from_proto(s: pb.SamplingParams) -> SamplingParams:
    """Proto → engine params; pydantic's validation error (a ValueError) names the bad field."""
    fields = {f.name: getattr(s, f.name) for f in s.DESCRIPTOR.fields}
    # proto3 `optional` and message fields: unset is None, not the zero value
    fields["seed"] = s.seed if s.HasField("seed") else None
    fields["max_reasoning_tokens"] = s.max_reasoning_tokens if s.HasField("max_reasoning_tokens") else None
    fields["constraint"] = _constraint_from_proto(s.constraint) if s.HasField("constraint") else None
    fields["top_p"] = s.top_p or 1.0  # 0 is proto3's unset (and never a valid top_p)
    fields["repetition_penalty"] = s.repetition_penalty or 1.0  # likewise
    fields["stop_token_ids"] = list(s.stop_token_ids)
    fields["logit_bias"] = dict(s.logit_bias)
    return SamplingParams(**fields)


def sampling_to_proto(p: SamplingParams) -> pb.SamplingParams:
    c = p.constraint
    constraint = None if c is None else pb.Constraint(
        kind=c.kind, json_schema=c.json_schema, parallel=c.parallel, optional=not c.required, after_think=c.after_think,
        tools=[pb.ToolSchema(name=t.name, parameters=t.parameters) for t in c.tools])
    return pb.SamplingParams(**p.model_dump(exclude={"constraint"}), constraint=constraint)


def _constraint_from_proto(c: pb.Constraint) -> Constraint:
    return Constraint(kind=c.kind, json_schema=c.json_schema if c.HasField("json_schema") else None,
                      tools=[ToolSchema(name=t.name, parameters=t.parameters) for t in c.tools],
                      parallel=c.parallel, required=not c.optional, after_think=c.after_think)
