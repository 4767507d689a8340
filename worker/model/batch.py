"""What one model step reads: the flattened tokens of every scheduled sequence, and the paged latent KV cache.

MLA caches, per token and layer, only the normalised compressed latent (kv_lora_rank) and the shared rope key
(qk_rope_head_dim) — 576 numbers for K2 instead of 64 heads × (192 + 128) for full K/V — which is what makes
256K contexts fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

from k2serve.k2format.model_config import K2Config

# Keys one decode-attention chunk gathers on CPU: under a core's L2 (2 MiB on the machines measured), so the
# scores and the weighted sum re-read them from cache. Measured on tiny-k2, one thread, 32 decoding sequences of
# ~300 keys (fp32 latents of 80: a 2.6 MB gather per layer in one chunk): attention 5.9 -> 5.2 ms per step, and
# the engine's closed loop at 32 concurrent +3-6% tokens/s in 3 alternating pairs.
# A decode whose own keys exceed it attends alone, in tiles (`attention_tiles`). (CUDA attends through the Triton
# kernel, `PagedPlan`, which reads keys through the block tables and gathers nothing.)
CPU_CHUNK_BYTES = 1 << 20


@dataclass
class SeqSlice:
    """One sequence's part of a step: `num_new` tokens starting at position `start_pos`, rows
    [row, row + num_new) of the flattened batch; `slots` [>= start_pos + num_new] holds the cache slot of every
    token of the sequence so far (the block table expanded; what lies past context_len is not read)."""

    row: int
    num_new: int
    start_pos: int
    slots: torch.Tensor  # [>= ctx] int64

    @property
    def context_len(self) -> int:
        return self.start_pos + self.num_new


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    seqs: list[SeqSlice]
    logits_rows: torch.Tensor  # [B] int64: rows whose next-token logits the step returns
    # [len(seqs), nb] int64: each sequence's block table, padded with block 0 (derived from the slots if not given)
    block_tables: torch.Tensor | None = None
    # [T] int64: the cache slot each new token's latent is written to (gathered from the slots if not given)
    token_slots: torch.Tensor | None = None
    _decode: "DecodeGather | None" = field(default=None, repr=False)
    _paged: "PagedPlan | None" = field(default=None, repr=False)

    def decode_gather(self, kv: "LatentKVCache") -> "DecodeGather | None":
        """The one-token sequences of the step, in chunks that each attend at once (computed once per step,
        shared by the layers). Gathering whole blocks copies contiguous runs of `block_size` keys instead of one
        index per key (slots come from block tables: slot = block * block_size + offset). Sequences are taken
        shortest context first, each chunk padded only to its own longest, and on CPU a chunk's gathered keys
        stay within `CPU_CHUNK_BYTES` so both products over them read from cache, not memory (the torch path)."""
        if self._decode is None:
            bs = kv.block_size
            key_bytes = kv.data.shape[-1] * kv.data.element_size()
            longest = CPU_CHUNK_BYTES // key_bytes // bs * bs
            decodes = sorted((i for i, s in enumerate(self.seqs) if s.num_new == 1 and s.context_len <= longest),
                             key=lambda i: self.seqs[i].context_len)
            if len(decodes) < 2:
                return None
            contexts = [self.seqs[i].context_len for i in decodes]  # ascending
            ends: list[int] = []  # chunk j is decodes[ends[j-1]:ends[j]]
            for n, ctx in enumerate(contexts):  # the newest member of a chunk is its longest
                padded = -(-ctx // bs) * bs
                start = ends[-1] if ends else 0
                if n > start and (n - start + 1) * padded * key_bytes > CPU_CHUNK_BYTES:
                    ends.append(n)
            ends.append(len(decodes))
            self._decode = self._chunks(decodes, contexts, ends, bs, kv.data.dtype, kv.data.device)
        return self._decode

    def _chunks(self, decodes: list[int], contexts: list[int], ends: list[int], bs: int, dtype: torch.dtype,
                device: torch.device) -> "DecodeGather":
        """Every chunk's tensors as views of one set built for all decodes (a few ops per step, not per chunk)."""
        context = torch.tensor(contexts)  # [n]
        blocks = self._tables(bs)[decodes].to(device)  # [n, nb]: padded with block 0
        pad = torch.arange(blocks.shape[1] * bs)[None, :] >= context[:, None]  # [n, nb * bs]
        bias = torch.zeros(pad.shape, dtype=dtype).masked_fill_(pad, float("-inf")).unsqueeze(1).to(device)
        rows = torch.tensor([self.seqs[i].row for i in decodes], dtype=torch.int64, device=device)  # [n]
        chunks, start = [], 0
        for end in ends:
            nb = -(-contexts[end - 1] // bs)  # the chunk's longest context, in blocks
            chunks.append(DecodeChunk(rows[start:end], blocks[start:end, :nb], bias[start:end, :, : nb * bs]))
            start = end
        return DecodeGather(chunks, {id(self.seqs[i]) for i in decodes})

    def paged_plan(self, page: int, block_q: int, device: torch.device, skip: frozenset[int] = frozenset()
                   ) -> "PagedPlan":
        """The work of a paged-attention kernel launch over the sequences of the step but those indexed in `skip`,
        `block_q` queries of one sequence per program (computed once per step, shared by the layers)."""
        if self._paged is None or (self._paged.block_q, self._paged.skip) != (block_q, skip):
            tables = self._tables(page) if self.seqs else torch.zeros(0, 1, dtype=torch.int64)  # [S, nb]
            work = [(i, q0) for i, s in enumerate(self.seqs) if i not in skip for q0 in range(0, s.num_new, block_q)]
            info = [(s.row, s.start_pos, s.num_new) for s in self.seqs]
            self._paged = PagedPlan(tables.to(device=device, dtype=torch.int32),
                                    torch.tensor(work, dtype=torch.int32).view(-1, 2).to(device),
                                    torch.tensor(info, dtype=torch.int32).view(-1, 3).to(device), page, block_q, skip)
        return self._paged

    def _tables(self, block_size: int) -> torch.Tensor:
        if self.block_tables is None:
            self.block_tables = pad_sequence([s.slots[: s.context_len : block_size] // block_size for s in self.seqs],
                                             batch_first=True)
        return self.block_tables

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def write_slots(self) -> torch.Tensor:
        """[T] cache slot each new token's latent is written to (computed once per step, shared by the layers)."""
        if self.token_slots is None:
            self.token_slots = torch.cat([s.slots[s.start_pos : s.context_len] for s in self.seqs]) if self.seqs \
                else torch.empty(0, dtype=torch.int64)
        return self.token_slots


@dataclass
class PagedPlan:
    """One launch of a paged-attention kernel: each program takes `block_q` queries of one sequence."""

    tables: torch.Tensor  # [S, nb] int32 block table of each sequence (padded with block 0)
    work: torch.Tensor  # [P, 2] int32 (sequence, first of its new tokens) of each program
    seqs: torch.Tensor  # [S, 3] int32 (first row in the flattened batch, position of the first new token, new tokens)
    page: int  # cache block size
    block_q: int
    skip: frozenset[int]  # sequences left to another kernel


@dataclass
class DecodeChunk:
    rows: torch.Tensor  # [b] rows of the flattened batch
    blocks: torch.Tensor  # [b, nb] cache blocks of each sequence's keys, padded (padding reads block 0)
    bias: torch.Tensor  # [b, 1, nb * block_size] added to the scores: 0 for a key, -inf for padding


@dataclass
class DecodeGather:
    chunks: list[DecodeChunk]
    seq_ids: set[int]  # id() of the SeqSlices covered


class LatentKVCache:
    """[layers, num_blocks * block_size, kv_lora_rank + qk_rope_head_dim]; a slot is block * block_size + offset."""

    def __init__(
        self, config: K2Config, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.kv_lora_rank = config.kv_lora_rank
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.data = torch.zeros(
            config.num_hidden_layers, num_blocks * block_size, config.kv_cache_dim, dtype=dtype, device=device
        )

    @staticmethod
    def bytes_per_token(config: K2Config, dtype: torch.dtype) -> int:
        return config.kv_cache_dim * config.num_hidden_layers * torch.empty(0, dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """latent [T, kv_lora_rank], k_rope [T, r] -> their slots."""
        self.data[layer, slots] = torch.cat([latent, k_rope], dim=-1)

    def rows(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """-> [n, kv_dim] cached rows (latent, then rope key) of the given slots."""
        return self.data[layer, slots]

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> latent [n, kv_lora_rank], k_rope [n, r] of the given slots."""
        rows = self.rows(layer, slots)  # [n, kv_dim]
        return rows[:, : self.kv_lora_rank], rows[:, self.kv_lora_rank :]

    def gather_blocks(self, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        """blocks [B, nb] -> their keys [B, nb * block_size, kv_dim]."""
        rows = self.data[layer].view(self.num_blocks, -1)  # [num_blocks, block_size * kv_dim]
        # index_select copies whole rows; advanced indexing would compute an offset per element
        return rows.index_select(0, blocks.flatten()).view(blocks.shape[0], -1, self.data.shape[-1])

    def export_blocks(self, blocks: list[int]) -> torch.Tensor:
        """[layers, len(blocks), block_size, kv_dim] copy of whole blocks (for a KV handoff)."""
        view = self.data.view(self.data.shape[0], self.num_blocks, self.block_size, -1)
        return view[:, blocks].clone()

    def import_blocks(self, blocks: list[int], data: torch.Tensor) -> None:
        view = self.data.view(self.data.shape[0], self.num_blocks, self.block_size, -1)
        view[:, blocks] = data.to(self.data.dtype)
