"""Conversions between the wire types (protobuf) and the in-process types, done once at the process edge."""

from __future__ import annotations

from k2serve.proto import k2serve_pb2 as pb
from k2serve.sampling_params import SamplingParams


def sampling_from_proto(s: pb.SamplingParams) -> SamplingParams:
    """Proto → engine params; pydantic's validation error (a ValueError) names the bad field."""
    return SamplingParams(temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k,
                          seed=s.seed if s.HasField("seed") else None, max_tokens=s.max_tokens,
                          stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos, logprobs=s.logprobs,
                          top_logprobs=s.top_logprobs)


def sampling_to_proto(p: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed,
                             max_tokens=p.max_tokens, stop_token_ids=p.stop_token_ids, ignore_eos=p.ignore_eos,
                             logprobs=p.logprobs, top_logprobs=p.top_logprobs)
