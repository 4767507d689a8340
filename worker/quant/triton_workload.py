"""Synthetic K2 expert-shard workloads and timing shared by the kernel benchmark and the tuning script."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from k2serve.worker.quant.int4 import GROUP_SIZE, PACK_FACTOR
from k2serve.worker.quant.moe import ExpertShard


@dataclass(frozen=True)
class MoEShape:
    """One expert shard of a MoE layer: `num_experts` in the layer split evenly over `ep` ranks."""

    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    ep: int

    @property
    def num_local(self) -> int:
        return self.num_experts // self.ep

    def __post_init__(self) -> None:
        if self.num_experts % self.ep:
            raise ValueError(f"{self.num_experts} experts do not split evenly over EP {self.ep}")
        if self.top_k > self.num_local:
            raise ValueError(f"top_k {self.top_k} exceeds the {self.num_local} experts of one shard")


K2_HIDDEN, K2_INTERMEDIATE, K2_EXPERTS, K2_TOP_K = 7168, 2048, 384, 8


def random_shard(shape: MoEShape, device: torch.device, seed: int = 0) -> ExpertShard:
    """Random packed words (every nibble value) and bf16 scales in K2's layout; rank 0's experts."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    E, H, I = shape.num_local, shape.hidden, shape.intermediate

    def words(*dims: int) -> torch.Tensor:
        return torch.randint(-(2**31), 2**31, dims, generator=gen, dtype=torch.int64).to(torch.int32).to(device)

    def scales(*dims: int) -> torch.Tensor:
        return (torch.rand(dims, generator=gen) * 0.02 + 0.005).to(torch.bfloat16).to(device)

    return ExpertShard(
        0, shape.num_experts,
        words(E, 2 * I, H // PACK_FACTOR), words(E, H, I // PACK_FACTOR),
        scales(E, 2 * I, H // GROUP_SIZE), scales(E, H, I // GROUP_SIZE),
    )


def shard_routing(
    shape: MoEShape, tokens: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens an EP dispatch delivers to rank 0: each token's top_k distinct experts all on this shard.
    -> topk_ids [T, k] int64, topk_weights [T, k] float32."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.rand(tokens, shape.num_local, generator=gen).argsort(dim=1)[:, : shape.top_k]  # [T, k]
    weights = torch.rand(tokens, shape.top_k, generator=gen) + 0.1  # [T, k]
    return ids.to(device), weights.to(device)


def touched_experts(topk_ids: torch.Tensor, num_local: int) -> int:
    return int(torch.unique(topk_ids[(topk_ids >= 0) & (topk_ids < num_local)]).numel())


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int = 5) -> float:
    """Median wall time of fn(): triton.testing.do_bench on CUDA, plain perf_counter elsewhere (the CPU
    interpreter, where the number only proves the path runs)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median")) / 1e3
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src), device)
