"""KV block manager: prefix reuse, the len - 1 rule, refcounts, LRU eviction, OutOfBlocks without leaks."""

import pytest

from k2serve.k2format.block_hash import ROOT_HASH, hash_block_tokens
from k2serve.worker.engine.blocks import BlockManager, OutOfBlocks

BS = 4


def run_prompt(mgr: BlockManager, seq_id: str, tokens: list[int]) -> int:
    """Allocate, 'prefill' and commit a prompt as the engine does; returns the cached token count."""
    alloc = mgr.allocate(seq_id, tokens)
    mgr.commit(seq_id, tokens)
    return alloc.num_cached_tokens


def test_prefix_reuse_across_sequences() -> None:
    mgr = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    assert run_prompt(mgr, "a", prompt) == 0
    table_a = mgr.block_table("a")
    mgr.free("a")
    alloc = mgr.allocate("b", prompt + [50, 51, 52])
    assert alloc.num_cached_tokens == 8
    assert alloc.block_table[:2] == table_a[:2]
    assert len(alloc.block_table) == 4
    assert mgr.prefix_queries_tokens == 10 + 13
    assert mgr.prefix_hit_tokens == 8


def test_partial_block_prompt_is_not_shared() -> None:
    mgr = BlockManager(num_blocks=16, block_size=BS)
    run_prompt(mgr, "a", [1, 2, 3])  # less than one block: nothing to cache
    assert mgr.num_cached_blocks == 0
    assert mgr.allocate("b", [1, 2, 3, 4, 5]).num_cached_tokens == 0


def test_whole_prompt_is_never_cached_last_token_recomputed() -> None:
    mgr = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(8))  # exactly two full blocks
    run_prompt(mgr, "a", prompt)
    assert mgr.num_cached_blocks == 2
    alloc = mgr.allocate("b", prompt)
    assert alloc.num_cached_tokens == 4  # second block holds the last token: recomputed into a fresh block
    assert alloc.block_table[0] == mgr.block_table("a")[0]
    assert alloc.block_table[1] != mgr.block_table("a")[1]
    assert mgr.allocate("c", prompt + [9]).num_cached_tokens == 8


def test_shared_blocks_refcounts() -> None:
    mgr = BlockManager(num_blocks=8, block_size=BS)
    prefix = list(range(8))
    run_prompt(mgr, "a", prefix + [100])
    used_after_a = mgr.num_used_blocks
    assert used_after_a == 3
    run_prompt(mgr, "b", prefix + [200])  # shares 2 blocks, 1 fresh
    assert mgr.num_used_blocks == 4
    mgr.free("a")
    # The shared prefix is still referenced by b: only a's private tail is released.
    assert mgr.num_used_blocks == 3
    assert mgr.allocate("c", prefix + [300]).num_cached_tokens == 8
    mgr.free("b")
    mgr.free("c")
    assert mgr.num_used_blocks == 0
    assert mgr.num_free_blocks == 8
    with pytest.raises(KeyError, match="'b'"):
        mgr.free("b")


def test_decode_fills_blocks_and_commit_registers_them() -> None:
    mgr = BlockManager(num_blocks=8, block_size=BS)
    tokens = [1, 2, 3]
    mgr.allocate("a", tokens)
    mgr.commit("a", tokens)
    for t in range(4, 10):  # decode: reserve a slot for each token, commit once its KV is written
        new = mgr.append("a", 1)
        assert len(new) == (1 if len(tokens) % BS == 0 else 0)
        tokens.append(t)
        mgr.commit("a", tokens)
    assert len(mgr.block_table("a")) == 3
    assert mgr.num_cached_blocks == 2
    with pytest.raises(ValueError, match="only 9 slots reserved"):
        mgr.commit("a", tokens + [10])
    mgr.free("a")
    assert mgr.allocate("b", tokens + [10, 11]).num_cached_tokens == 8


def test_lru_eviction_order() -> None:
    mgr = BlockManager(num_blocks=4, block_size=BS)
    run_prompt(mgr, "a", [1] * 4 + [0])  # blocks: A0 (hashed), A1
    run_prompt(mgr, "b", [2] * 4 + [0])  # B0 (hashed), B1
    mgr.free("a")
    mgr.free("b")
    assert mgr.num_free_blocks == 4 and mgr.num_cached_blocks == 2
    # Touch a's prefix again so b's becomes the least recently used.
    run_prompt(mgr, "a2", [1] * 4 + [0])
    mgr.free("a2")
    # Needs 3 fresh blocks: 2 unhashed free ones first, then the LRU cached block (b's).
    mgr.allocate("c", [3] * 9)
    assert mgr.num_cached_blocks == 1
    mgr.free("c")
    assert mgr.allocate("a3", [1] * 4 + [0]).num_cached_tokens == 4
    assert mgr.allocate("b3", [2] * 4 + [0]).num_cached_tokens == 0


def test_free_releases_tail_blocks_first_into_lru() -> None:
    mgr = BlockManager(num_blocks=3, block_size=BS)
    run_prompt(mgr, "a", list(range(9)))  # two hashed blocks + one partial
    mgr.free("a")
    mgr.allocate("x", [7] * 5)  # 2 fresh: the unhashed block, then the LRU cached one = a's tail block
    mgr.free("x")
    assert mgr.allocate("a2", list(range(9))).num_cached_tokens == 4


def test_out_of_blocks_leaks_nothing() -> None:
    mgr = BlockManager(num_blocks=4, block_size=BS)
    run_prompt(mgr, "a", list(range(9)))
    mgr.free("a")
    state = (mgr.num_free_blocks, mgr.num_cached_blocks, mgr.prefix_queries_tokens, mgr.prefix_hit_tokens)
    assert not mgr.can_allocate(17)
    with pytest.raises(OutOfBlocks, match="needs 3 new blocks \\(2 cached\\), only 2 are free"):
        mgr.allocate("big", list(range(9)) + [0] * 8)  # 5 blocks, 2 of them cached but evictable
    assert (mgr.num_free_blocks, mgr.num_cached_blocks, mgr.prefix_queries_tokens, mgr.prefix_hit_tokens) == state
    with pytest.raises(KeyError):
        mgr.block_table("big")
    mgr.allocate("b", [5] * 4)
    assert mgr.can_append("b", 12) and not mgr.can_append("b", 13)
    with pytest.raises(OutOfBlocks, match="only 3 are free"):
        mgr.append("b", 13)
    assert len(mgr.block_table("b")) == 1 and mgr.num_free_blocks == 3
    assert len(mgr.append("b", 12)) == 3 and mgr.num_free_blocks == 0


def test_hash_chain_distinguishes_prefixes() -> None:
    block = (7, 7, 7, 7)
    assert hash_block_tokens(hash_block_tokens(ROOT_HASH, (1, 2, 3, 4)), block) != hash_block_tokens(
        hash_block_tokens(ROOT_HASH, (1, 2, 3, 5)), block
    )
    assert hash_block_tokens(ROOT_HASH, (1, 2)) == hash_block_tokens(ROOT_HASH, [1, 2])
    mgr = BlockManager(num_blocks=16, block_size=BS)
    run_prompt(mgr, "a", [1, 2, 3, 4] + list(block) + [0])
    # Same second block, different first block: nothing may be reused.
    assert mgr.allocate("b", [1, 2, 3, 5] + list(block) + [0]).num_cached_tokens == 0


def test_prefix_caching_off_and_reset() -> None:
    off = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    run_prompt(off, "a", list(range(9)))
    off.free("a")
    assert off.allocate("b", list(range(9))).num_cached_tokens == 0
    assert off.num_cached_blocks == 0 and off.prefix_queries_tokens == 0

    mgr = BlockManager(num_blocks=8, block_size=BS)
    run_prompt(mgr, "a", list(range(9)))
    run_prompt(mgr, "b", [9] * 9)
    mgr.free("a")
    mgr.reset_prefix_cache()
    assert mgr.num_cached_blocks == 0 and mgr.num_free_blocks == 5
    assert mgr.allocate("c", list(range(9))).num_cached_tokens == 0
    mgr.free("b")  # its blocks lost their hashes: back to the free list, not the evictable pool
    assert mgr.num_free_blocks == 5


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=4, block_size=0)
    mgr = BlockManager(num_blocks=4, block_size=BS)
    with pytest.raises(ValueError, match="empty"):
        mgr.allocate("a", [])
    mgr.allocate("a", [1])
    with pytest.raises(ValueError, match="already has blocks"):
        mgr.allocate("a", [1])
