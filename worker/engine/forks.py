"""Parallel sampling (`n` > 1): the choices of one request share its prefill. The request (the parent) carries its
other choices as children that wait, outside the queue, for its first sample; then each child gets the parent's
prompt KV — full blocks shared through the prefix cache, the rest copied — and samples its own first token from the
parent's logits row with its own seed. The prompt is computed once, whatever `n` is.
"""

from __future__ import annotations

from collections.abc import Sequence

from k2serve.worker.engine.blocks import BlockManager
from k2serve.worker.engine.requests import Request
from k2serve.worker.model.batch import LatentKVCache


def fork_children(parent: Request, forks: Sequence[tuple[str, int]]) -> list[Request]:
    """The children of `parent`, one per (request id, seed): its prompt and settings, their own seed."""
    if not forks:
        return []
    if parent.output or parent.kv is not None or parent.hold_kv:
        raise ValueError(f"request {parent.request_id!r}: only a fresh request forks (no output_prefix, KV handoff "
                         "or held KV)")
    ids = [rid for rid, _ in forks]
    if len(set(ids)) != len(ids) or parent.request_id in ids:
        raise ValueError(f"request {parent.request_id!r}: fork request ids must be distinct")
    return [Request(rid, list(parent.prompt), [], parent.params.model_copy(update={"seed": seed}), seed,
                    parent.deterministic, False) for rid, seed in forks]


def share_prompt_kv(blocks: BlockManager, kv: LatentKVCache, parent: Request, child: Request) -> bool:
    """Gives `child` the KV of `parent`'s computed prompt; False (nothing allocated) when the blocks are short."""
    n = len(child.prompt)
    if not blocks.can_allocate(n):
        return False
    alloc = blocks.allocate(child.request_id, child.prompt)
    bs = blocks.block_size
    first, last = alloc.num_cached_tokens // bs, -(-n // bs)  # blocks not shared through the prefix cache
    if last > first:
        source = blocks.block_table(parent.request_id)[first:last]
        kv.import_blocks(alloc.block_table[first:last], kv.export_blocks(source))
    child.num_computed = n
    return True
