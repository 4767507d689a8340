"""Conversions between the wire types (protobuf) and the in-process types, done once at the process edge.

`SamplingParams` and its proto carry the same field names, so both directions go field by field over the model:
a field added to one side only fails loudly (an unknown proto field, or pydantic's `extra="forbid"`) instead of
being dropped (tests/test_sampling_wire.py round-trips every field)."""

from __future__ import annotations

from k2serve.proto import k2serve_pb2 as pb
from k2serve.sampling_params import SamplingParams


def sampling_from_proto(s: pb.SamplingParams) -> SamplingParams:
    """Proto → engine params; pydantic's validation error (a ValueError) names the bad field."""
    fields = {f.name: getattr(s, f.name) for f in s.DESCRIPTOR.fields}
    fields["seed"] = s.seed if s.HasField("seed") else None  # proto3 `optional`: unset is not 0
    fields["top_p"] = s.top_p or 1.0  # 0 is proto3's unset (and never a valid top_p)
    fields["stop_token_ids"] = list(s.stop_token_ids)
    return SamplingParams(**fields)


def sampling_to_proto(p: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(**p.model_dump())
