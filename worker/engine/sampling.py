"""Token sampling: greedy, and seeded temperature / min-p / top-k / top-p sampling whose random draw is a pure
function of (seed, token position), after the logits processors (repetition, presence and frequency penalties,
logit bias) and the constrained rows' token bitmask.

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
import xgrammar as xgr

from k2serve.sampling_params import MAX_TOP_LOGPROBS, SamplingParams, resolve_seed

__all__ = ["MAX_TOP_LOGPROBS", "SamplingParams", "resolve_seed", "sample", "draw_uniform", "SampleOutput", "History",
           "process_logits"]

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


@dataclass
class History:
    """A sequence's tokens so far, for the penalties (presence/frequency count the output, repetition both)."""

    prompt: list[int]
    output: list[int]


def sample(
    logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], positions: list[int], *,
    histories: list[History | None] | None = None, bitmask: torch.Tensor | None = None,
    masked_rows: list[int] | None = None,
) -> SampleOutput:
    """Pick one token per row. logits [B, V] float32; seeds[b] from `resolve_seed`; positions[b] is the index
    the sampled token takes in its sequence; histories[b] is needed where params[b] is `penalized`.
    bitmask [B, ceil(V / 32)] int32 (xgrammar's layout): the allowed tokens of `masked_rows`."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be a [B, V] float32 tensor, got {tuple(logits.shape)} {logits.dtype}")
    batch = logits.shape[0]
    if not len(params) == len(seeds) == len(positions) == batch:
        raise ValueError(
            f"logits have {batch} rows but got {len(params)} params, {len(seeds)} seeds, {len(positions)} positions"
        )
    if any(p < 0 for p in positions):
        raise ValueError(f"positions must be >= 0, got {positions}")
    raw = logits
    logits = process_logits(logits, params, histories, bitmask, masked_rows)
    tokens = logits.argmax(dim=-1)  # [B]; first maximum on ties, i.e. the lowest id
    rows = [b for b, p in enumerate(params) if not p.greedy]
    if rows:
        chosen = _sample_rows(
            logits[rows],
            [params[b] for b in rows],
            [draw_uniform(seeds[b], positions[b]) for b in rows],
        )
        tokens[rows] = chosen
    logprobs_all = torch.log_softmax(raw, dim=-1)  # [B, V]
    logprobs = logprobs_all.gather(1, tokens[:, None]).squeeze(1)  # [B]
    top: list[tuple[list[int], list[float]] | None] = []
    for b, p in enumerate(params):
        if p.top_logprobs:
            values, ids = logprobs_all[b].topk(min(p.top_logprobs, logits.shape[1]))
            top.append((ids.tolist(), values.tolist()))
        else:
            top.append(None)
    return SampleOutput(tokens=tokens, logprobs=logprobs, top_logprobs=top)


def process_logits(logits: torch.Tensor, params: list[SamplingParams], histories: list[History | None] | None,
                   bitmask: torch.Tensor | None, masked_rows: list[int] | None) -> torch.Tensor:
    """The logits sampling draws from: penalties (vLLM's definitions), then the logit bias, then the bitmask
    (a disallowed token gets -inf). Row by row, so a row's result does not depend on the others. logits [B, V]
    (not modified; a copy when anything applies)."""
    penalized = [b for b, p in enumerate(params) if p.penalized]
    biased = [b for b, p in enumerate(params) if p.logit_bias]
    if not penalized and not biased and not masked_rows:
        return logits
    out = logits.clone()  # [B, V]
    vocab = out.shape[1]
    for b in penalized:
        h = histories[b] if histories is not None else None
        if h is None:
            raise ValueError(f"row {b} has penalties but no token history")
        _penalize(out[b], params[b], h, vocab)
    for b in biased:
        bias = params[b].logit_bias
        ids = torch.tensor(list(bias), dtype=torch.int64)  # [K]
        if int(ids.max()) >= vocab:
            raise ValueError(f"logit_bias names token {int(ids.max())} outside the vocabulary [0, {vocab})")
        out[b].index_add_(0, ids, torch.tensor(list(bias.values()), dtype=out.dtype))
    if masked_rows:
        if bitmask is None:
            raise ValueError("masked_rows given without a bitmask")
        xgr.apply_token_bitmask_inplace(out, bitmask, vocab_size=vocab, indices=masked_rows)
        if bool(torch.isneginf(out[masked_rows]).all(dim=-1).any()):
            raise RuntimeError("a constrained row allows no token")
    return out


def _penalize(row: torch.Tensor, p: SamplingParams, h: History, vocab: int) -> None:
    """row [V], in place. Repetition divides a positive logit (multiplies a negative one) of every token seen in
    prompt or output; presence subtracts once per token seen in the output, frequency once per occurrence."""
    output = torch.tensor(h.output, dtype=torch.int64)  # [N]
    counts = torch.bincount(output, minlength=vocab)[:vocab].to(row.dtype)  # [V]
    if p.repetition_penalty != 1.0:
        seen = counts > 0  # [V]
        seen[torch.tensor(h.prompt, dtype=torch.int64)] = True
        scaled = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        row.copy_(torch.where(seen, scaled, row))
    if p.frequency_penalty:
        row.sub_(p.frequency_penalty * counts)
    if p.presence_penalty:
        row.sub_(p.presence_penalty * (counts > 0).to(row.dtype))


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], uniforms: list[float]) -> torch.Tensor:
    """Inverse-CDF draw over the temperature-scaled, min-p, top-k then top-p filtered distribution (vLLM's order).
    logits [R, V] float32 → token ids [R] int64."""
    rows, vocab = logits.shape
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float64, device=device)
    top_k = torch.tensor([p.top_k or vocab for p in params], device=device)  # [R]
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64, device=device)
    u = torch.tensor(uniforms, dtype=torch.float64, device=device)  # [R]

    # float64: the scan over ~160K probabilities must not drift.
    scaled = logits.double() / temperature[:, None]  # [R, V]
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float64, device=device)  # [R]
    if bool((min_p > 0).any()):
        # p < min_p * p_max  <=>  logit < max logit + log(min_p); the most likely token always stays.
        floor = scaled.max(dim=-1).values + torch.log(min_p)  # [R]; -inf where min_p is 0
        scaled = scaled.masked_fill(scaled < floor[:, None], float("-inf"))
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
