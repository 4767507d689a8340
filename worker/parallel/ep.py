"""Expert parallelism for one rank: the `MoEExecutor` that sends each token to the ranks owning its experts
and gathers the weighted expert outputs back, over a `torch.distributed` process group.

Per MoE layer, on every rank (each with its own tokens, possibly none):
1. exchange per-destination token counts (all_to_all_single of a [N] tensor);
2. dispatch: each token row goes once to every rank owning at least one of its top-k experts, with its
   top-k ids and weights;
3. the receiving rank runs its local experts with the backend (`combine=False`: per-slot products) and returns
   one row per (token, slot) it owns;
4. combine: the sender places those rows into [T, k, H] and adds the slots in order 0..k-1 (`sum_slots`), the
   same order the single-process path uses, so deterministic mode matches it bit for bit.
The reply needs no count exchange: both sides derive it from the top-k ids they already hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from k2serve.worker.quant.moe import ExpertShard, MoEBackend, sum_slots


def expert_range(rank: int, world_size: int, num_experts: int) -> tuple[int, int]:
    """Experts [r·E/N, (r+1)·E/N) of rank r; N must divide E."""
    if world_size < 1 or num_experts % world_size:
        raise ValueError(f"expert_parallel {world_size} must divide the model's {num_experts} routed experts")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    per = num_experts // world_size
    return rank * per, (rank + 1) * per


@dataclass
class AllToAllCounter:
    """Bytes this rank sent to other ranks through all_to_all (counts, rows, routing, results; its own
    slice stays in memory and is not counted)."""

    bytes: int = 0
    calls: int = 0

    def take(self) -> int:
        out, self.bytes = self.bytes, 0
        return out


@dataclass
class ExpertParallelMoE:
    """The `MoEExecutor` of one rank in an expert-parallel group."""

    shards: dict[int, ExpertShard]  # MoE layer -> this rank's experts
    backend: MoEBackend
    rank: int
    world_size: int
    deterministic: bool = False
    group: dist.ProcessGroup | None = None  # None: the default group
    counter: AllToAllCounter = field(default_factory=AllToAllCounter)

    def _all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        out = send.new_empty((sum(recv_splits), *send.shape[1:]))
        dist.all_to_all_single(out, send.contiguous(), recv_splits, send_splits, group=self.group)
        row_bytes = send[0].numel() * send.element_size() if send.shape[0] else 0
        self.counter.bytes += (sum(send_splits) - send_splits[self.rank]) * row_bytes
        self.counter.calls += 1
        return out

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_ids [T, k] global ids, topk_weights [T, k] -> [T, H] (this rank's tokens)."""
        shard = self.shards[layer]
        n, (T, k), H = self.world_size, topk_ids.shape, x.shape[1]
        per = shard.num_experts // n
        owner = topk_ids // per  # [T, k] rank owning each slot's expert
        # Rows to send, grouped by destination rank, each token at most once per destination.
        goes = torch.stack([(owner == r).any(dim=1) for r in range(n)])  # [N, T]
        send_tok = torch.cat([goes[r].nonzero().flatten() for r in range(n)])  # [S]
        send_counts = goes.sum(dim=1)  # [N]
        recv_counts = self._all_to_all(send_counts, [1] * n, [1] * n)  # [N]
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()

        recv_x = self._all_to_all(x[send_tok], send_splits, recv_splits)  # [R, H]
        # Expert ids are < 2^24, exact in float32: routing travels as one [S, 2k] float tensor.
        route = torch.cat([topk_ids[send_tok].float(), topk_weights[send_tok].float()], dim=1)  # [S, 2k]
        recv_route = self._all_to_all(route, send_splits, recv_splits)  # [R, 2k]
        recv_ids, recv_w = recv_route[:, :k].long(), recv_route[:, k:]

        slots = self.backend(recv_x, recv_ids, recv_w, shard, deterministic=self.deterministic,
                             combine=False)  # [R, k, H]
        mine = (recv_ids // per) == self.rank  # [R, k]
        reply = slots[mine]  # [P, H] in (token, slot) order
        reply_splits = [int(m.sum()) for m in mine.split(recv_splits)]  # pairs back to each source rank
        pair_splits = [int((owner[goes[r]] == r).sum()) for r in range(n)]  # pairs each rank returns to us
        back = self._all_to_all(reply, reply_splits, pair_splits)  # [Q, H]

        out_slots = slots.new_zeros(T, k, H)  # [T, k, H]
        offset = 0
        for r in range(n):
            tok = goes[r].nonzero().flatten()
            owned = owner[tok] == r  # [t_r, k]
            pairs = int(owned.sum())
            rows, cols = owned.nonzero(as_tuple=True)
            out_slots[tok[rows], cols] = back[offset:offset + pairs]
            offset += pairs
        return sum_slots(out_slots).to(x.dtype)
