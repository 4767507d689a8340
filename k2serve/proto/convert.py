"""Conversions between the wire types (protobuf) and the in-process types, done once at the process edge."""

from __future__ import annotations

from k2serve.proto import k2serve_pb2 as pb
from k2serve.sampling_params import Constraint, SamplingParams, ToolSchema


def sampling_from_proto(s: pb.SamplingParams) -> SamplingParams:
    """Proto → engine params; pydantic's validation error (a ValueError) names the bad field."""
    constraint = None
    if s.HasField("constraint"):
        c = s.constraint
        constraint = Constraint(kind=c.kind, json_schema=c.json_schema if c.HasField("json_schema") else None,
                                tools=[ToolSchema(name=t.name, parameters=t.parameters) for t in c.tools],
                                parallel=c.parallel, required=not c.optional, after_think=c.after_think)
    return SamplingParams(temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k, min_p=s.min_p,
                          seed=s.seed if s.HasField("seed") else None, max_tokens=s.max_tokens,
                          stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos, logprobs=s.logprobs,
                          top_logprobs=s.top_logprobs, presence_penalty=s.presence_penalty,
                          frequency_penalty=s.frequency_penalty, repetition_penalty=s.repetition_penalty or 1.0,
                          logit_bias=dict(s.logit_bias), constraint=constraint,
                          max_reasoning_tokens=s.max_reasoning_tokens if s.HasField("max_reasoning_tokens") else None)


def sampling_to_proto(p: SamplingParams) -> pb.SamplingParams:
    c = p.constraint
    constraint = None if c is None else pb.Constraint(
        kind=c.kind, json_schema=c.json_schema, parallel=c.parallel, optional=not c.required, after_think=c.after_think,
        tools=[pb.ToolSchema(name=t.name, parameters=t.parameters) for t in c.tools])
    return pb.SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, seed=p.seed,
                             max_tokens=p.max_tokens, stop_token_ids=p.stop_token_ids, ignore_eos=p.ignore_eos,
                             logprobs=p.logprobs, top_logprobs=p.top_logprobs, presence_penalty=p.presence_penalty,
                             frequency_penalty=p.frequency_penalty, repetition_penalty=p.repetition_penalty,
                             logit_bias=p.logit_bias, constraint=constraint,
                             max_reasoning_tokens=p.max_reasoning_tokens)
