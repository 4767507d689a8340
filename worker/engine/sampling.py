"""Token sampling: greedy, and seeded temperature / top-k / top-p sampling whose random draw is a pure
function of (seed, token position).

Each sampled row draws one uniform number u from a stable hash of (seed, position) and takes the token at
u in the cumulative distribution of the filtered probabilities (inverse-CDF sampling, tokens in descending
probability order, ties by lowest id). No random generator state is carried between steps, so the same
(seed, position) gives the same token whatever else is in the batch, in whichever order, and a sequence
resumed elsewhere draws the same numbers. Every tensor op works row by row (sort, softmax and scan along
the vocabulary), so a row's result does not depend on the other rows.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch

from k2serve.sampling_params import MAX_TOP_LOGPROBS, SamplingParams, resolve_seed

__all__ = ["MAX_TOP_LOGPROBS", "SamplingParams", "resolve_seed", "sample", "draw_uniform", "SampleOutput"]

def draw_uniform(seed: int, position: int) -> float:
    """The uniform number in [0, 1) that the token at `position` of a `seed`ed sequence is drawn with."""
    digest = hashlib.blake2b(
        seed.to_bytes(16, "little", signed=True) + struct.pack("<q", position), digest_size=8
    ).digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0**-53  # 53 random bits: exact in float64


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32: of the chosen token under the raw model distribution
    top_logprobs: list[tuple[list[int], list[float]] | None]  # per row: (ids, logprobs), most likely first


def sample(
    logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], positions: list[int]
) -> SampleOutput:
    """Pick one token per row. logits [B, V] float32; seeds[b] from `resolve_seed`; positions[b] is the index
    the sampled token takes in its sequence."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be a [B, V] float32 tensor, got {tuple(logits.shape)} {logits.dtype}")
    batch = logits.shape[0]
    if not len(params) == len(seeds) == len(positions) == batch:
        raise ValueError(
            f"logits have {batch} rows but got {len(params)} params, {len(seeds)} seeds, {len(positions)} positions"
        )
    if any(p < 0 for p in positions):
        raise ValueError(f"positions must be >= 0, got {positions}")
    tokens = logits.argmax(dim=-1)  # [B]; first maximum on ties, i.e. the lowest id
    rows = [b for b, p in enumerate(params) if not p.greedy]
    if rows:
        chosen = _sample_rows(
            logits[rows],
            [params[b] for b in rows],
            [draw_uniform(seeds[b], positions[b]) for b in rows],
        )
        tokens[rows] = chosen
    logprobs_all = torch.log_softmax(logits, dim=-1)  # [B, V]
    logprobs = logprobs_all.gather(1, tokens[:, None]).squeeze(1)  # [B]
    top: list[tuple[list[int], list[float]] | None] = []
    for b, p in enumerate(params):
        if p.top_logprobs:
            values, ids = logprobs_all[b].topk(min(p.top_logprobs, logits.shape[1]))
            top.append((ids.tolist(), values.tolist()))
        else:
            top.append(None)
    return SampleOutput(tokens=tokens, logprobs=logprobs, top_logprobs=top)


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], uniforms: list[float]) -> torch.Tensor:
    """Inverse-CDF draw over the temperature-scaled, top-k then top-p filtered distribution (vLLM's order).
    logits [R, V] float32 → token ids [R] int64."""
    rows, vocab = logits.shape
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float64, device=device)
    top_k = torch.tensor([p.top_k or vocab for p in params], device=device)  # [R]
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64, device=device)
    u = torch.tensor(uniforms, dtype=torch.float64, device=device)  # [R]

    # float64: the scan over ~160K probabilities must not drift.
    scaled = logits.double() / temperature[:, None]  # [R, V]
    # Stable descending sort: equal logits keep ascending id order, so ties resolve to the lowest id.
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)  # [R, V]
    rank = torch.arange(vocab, device=device)  # [V]
    sorted_logits = sorted_logits.masked_fill(rank[None, :] >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)  # [R, V]: renormalised over the top-k
    # Top-p keeps the shortest prefix whose mass reaches top_p; the most likely token always stays.
    mass_before = probs.cumsum(dim=-1) - probs  # [R, V]
    keep = (mass_before < top_p[:, None]) & (rank[None, :] < top_k[:, None])
    keep[:, 0] = True
    probs = probs * keep
    cdf = probs.cumsum(dim=-1)  # [R, V]
    target = u * cdf[:, -1]  # [R]
    # First rank whose cumulative mass exceeds the target: never a zero-probability (filtered) token.
    idx = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)  # [R]
    # Rounding can put the target at the very end; the positive-probability ranks are a prefix.
    idx = torch.minimum(idx, (probs > 0).sum(dim=-1) - 1)
    return order.gather(1, idx[:, None]).squeeze(1)
