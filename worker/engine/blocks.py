"""Paged KV-cache block bookkeeping with prefix caching. No tensors live here: the engine owns the cache
tensors [layers, num_blocks, block_size, kv_dim] and indexes them with the block ids this module hands out.

A full block is identified by the chained hash of every token up to and including it, so two sequences
share a block only when their whole prefixes agree. Only full blocks are ever shared, and a sequence only
writes past its last full block, so shared blocks are read-only by construction. A hashed block whose
reference count drops to zero is kept (evictable, LRU order) until a fresh block is needed: an agent that
resends its whole conversation each turn then prefills only the new turn.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from k2serve.k2format.block_hash import ROOT_HASH, hash_block_tokens

class OutOfBlocks(RuntimeError):
    """Not enough free or evictable KV blocks for the request; nothing was allocated."""


@dataclass
class Allocation:
    block_table: list[int]
    num_cached_tokens: int  # leading prompt tokens whose KV is already in the cache: skip them in prefill


@dataclass
class _Block:
    ref_count: int = 0
    hash: bytes | None = None  # set while the block is registered in the prefix cache


@dataclass
class _Sequence:
    block_table: list[int]
    num_tokens: int  # token slots reserved in block_table
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of the committed full blocks


class BlockManager:
    """Hands out KV blocks to sequences, shares full prefix blocks between them, evicts cached ones LRU."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))  # unhashed, unreferenced
        self._evictable: OrderedDict[int, None] = OrderedDict()  # hashed, unreferenced; oldest first
        self._cached: dict[bytes, int] = {}  # block hash -> block id
        self._seqs: dict[Hashable, _Sequence] = {}
        self.prefix_queries_tokens = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hit_tokens = 0  # of those, tokens served from the cache

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: never-used or freed ones plus unreferenced cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self._num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, referenced or not."""
        return len(self._cached)

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self._block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a prompt of num_tokens surely fits (prefix hits can only make it fit more easily)."""
        return self._blocks_for(num_tokens) <= self.num_free_blocks

    def allocate(self, seq_id: Hashable, token_ids: Sequence[int]) -> Allocation:
        """Reserve blocks for a new sequence's prompt, reusing cached full prefix blocks.

        At most len(token_ids) - 1 tokens come from the cache (whole blocks): the last prompt token is always
        recomputed, because its logits give the first output token.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already has blocks; free it first")
        if not token_ids:
            raise ValueError(f"sequence {seq_id!r}: the prompt is empty")
        hit_blocks: list[int] = []
        hit_hashes: list[bytes] = []
        if self.enable_prefix_caching:
            parent = ROOT_HASH
            bs = self._block_size
            for i in range((len(token_ids) - 1) // bs):
                parent = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs])
                block_id = self._cached.get(parent)
                if block_id is None:
                    break
                hit_blocks.append(block_id)
                hit_hashes.append(parent)
        num_fresh = self._blocks_for(len(token_ids)) - len(hit_blocks)
        # Hit blocks that sit in the evictable pool stop being available once this sequence takes them.
        available = self.num_free_blocks - sum(1 for b in hit_blocks if self._blocks[b].ref_count == 0)
        if num_fresh > available:
            raise OutOfBlocks(
                f"sequence {seq_id!r}: a {len(token_ids)}-token prompt needs {num_fresh} new blocks "
                f"({len(hit_blocks)} cached), only {available} are free"
            )
        for block_id in hit_blocks:
            self._take(block_id)
        table = hit_blocks + [self._fresh_block() for _ in range(num_fresh)]
        self._seqs[seq_id] = _Sequence(block_table=table, num_tokens=len(token_ids), block_hashes=hit_hashes)
        num_cached = len(hit_blocks) * self._block_size
        if self.enable_prefix_caching:
            self.prefix_queries_tokens += len(token_ids)
            self.prefix_hit_tokens += num_cached
        return Allocation(block_table=list(table), num_cached_tokens=num_cached)

    def can_append(self, seq_id: Hashable, num_new_tokens: int) -> bool:
        seq = self._seq(seq_id)
        return self._blocks_for(seq.num_tokens + num_new_tokens) - len(seq.block_table) <= self.num_free_blocks

    def append(self, seq_id: Hashable, num_new_tokens: int) -> list[int]:
        """Reserve num_new_tokens more slots for a running sequence; returns the blocks added to its table."""
        if num_new_tokens < 0:
            raise ValueError(f"sequence {seq_id!r}: num_new_tokens must be >= 0, got {num_new_tokens}")
        seq = self._seq(seq_id)
        needed = self._blocks_for(seq.num_tokens + num_new_tokens) - len(seq.block_table)
        if needed > self.num_free_blocks:
            raise OutOfBlocks(
                f"sequence {seq_id!r}: {num_new_tokens} more tokens need {needed} new blocks, "
                f"only {self.num_free_blocks} are free"
            )
        new_blocks = [self._fresh_block() for _ in range(needed)]
        seq.block_table.extend(new_blocks)
        seq.num_tokens += num_new_tokens
        return new_blocks

    def num_committed_blocks(self, seq_id: Hashable) -> int:
        """The sequence's full blocks `commit` has hashed so far (a commit below a next full block is a no-op)."""
        return len(self._seq(seq_id).block_hashes)

    def commit(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
        """Register every now-full block of the sequence in the prefix cache.

        token_ids: the sequence's tokens from its start whose KV is written in the cache (call after the
        forward pass that wrote them — after each prefill chunk, and as decode fills blocks). Blocks already
        committed are not rehashed, so token_ids must extend what earlier calls passed.
        """
        seq = self._seq(seq_id)
        if len(token_ids) > seq.num_tokens:
            raise ValueError(
                f"sequence {seq_id!r}: {len(token_ids)} tokens committed but only {seq.num_tokens} slots reserved"
            )
        if not self.enable_prefix_caching:
            return
        bs = self._block_size
        for i in range(len(seq.block_hashes), len(token_ids) // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
            block_hash = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs])
            seq.block_hashes.append(block_hash)
            block = self._blocks[seq.block_table[i]]
            # Another sequence may have computed the same prefix concurrently; its copy stays the cached one.
            if block.hash is None and block_hash not in self._cached:
                block.hash = block_hash
                self._cached[block_hash] = seq.block_table[i]

    def free(self, seq_id: Hashable) -> None:
        """Release a sequence's blocks. Hashed blocks stay cached (evictable) until their space is needed."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise KeyError(f"sequence {seq_id!r} has no blocks")
        # Tail first: a prefix's later blocks are useless without its earlier ones, so they go first in LRU.
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    self._free.append(block_id)
                else:
                    self._evictable[block_id] = None

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._seq(seq_id).block_table)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix. Blocks in use stay with their sequences and return to the free list."""
        for block_id in self._evictable:
            self._blocks[block_id].hash = None
            self._free.append(block_id)
        self._evictable.clear()
        for block_id in self._cached.values():
            self._blocks[block_id].hash = None
        self._cached.clear()

    def _seq(self, seq_id: Hashable) -> _Sequence:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise KeyError(f"sequence {seq_id!r} has no blocks")
        return seq

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._evictable[block_id]
        block.ref_count += 1

    def _fresh_block(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            del self._cached[self._blocks[block_id].hash]
            self._blocks[block_id].hash = None
        self._blocks[block_id].ref_count = 1
        return block_id
