"""Training of `builtin:tiny-k2-agent` with transformers' DeepseekV3ForCausalLM (whose logits k2serve's model
matches) and torch autograd: fp32 training, then an INT4 quantization-aware phase in which the routed experts'
weights go through fake quantization exactly as `k2serve quantize` will store them (round-to-nearest, symmetric,
group 32, bf16 scales) with a straight-through gradient.

Every sample starts with the same tools declaration and system turn; that shared prefix runs once per batch and
its KV cache is repeated for the batch, which makes CPU training several times cheaper with the same gradients.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import parametrize

from k2serve.worker.agent_model.corpus import Sample
from k2serve.k2format.model_config import K2Config
from k2serve.worker.quant.int4 import GROUP_SIZE, dequantize, quantize_rtn
from k2serve.worker.quantize import quantize_checkpoint
from k2serve.worker.tiny import tiny_config


def agent_config() -> K2Config:
    """K2's architecture at the size CPU training in minutes allows (vocab: the tiny byte tokenizer's 512)."""
    return tiny_config(hidden_size=128, intermediate_size=384, moe_intermediate_size=64, q_lora_rank=64,
                       kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)


def hf_model(config: K2Config, seed: int) -> Any:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    fields = {k: v for k, v in config.to_hf_dict().items() if k not in ("model_type", "architectures")}
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(DeepseekV3Config(**fields)).float()


class FakeInt4(torch.nn.Module):
    """Stacked expert weights [E, out, in] -> the weights the INT4 checkpoint will hold, dequantized; the
    gradient passes straight through to the fp32 weights."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            flat = w.detach().to(torch.bfloat16).reshape(-1, w.shape[-1])  # [E*out, in], as the checkpoint stores it
            packed, scale = quantize_rtn(flat, GROUP_SIZE)
            q = dequantize(packed, scale).to(w.dtype).reshape(w.shape)
        return w + (q - w).detach()


def expert_modules(model: Any) -> list[Any]:
    # parametrize swaps the class for a subclass named Parametrized...: match the name's end
    return [m for m in model.modules() if type(m).__name__.endswith("DeepseekV3Experts")]


def enable_qat(model: Any) -> None:
    for experts in expert_modules(model):
        for name in ("gate_up_proj", "down_proj"):
            parametrize.register_parametrization(experts, name, FakeInt4())


def disable_qat(model: Any) -> None:
    """Back to plain parameters holding the latent fp32 weights (what the checkpoint is quantized from)."""
    for experts in expert_modules(model):
        for name in ("gate_up_proj", "down_proj"):
            if parametrize.is_parametrized(experts, name):
                parametrize.remove_parametrizations(experts, name, leave_parametrized=False)


def shared_prefix(samples: list[Sample]) -> int:
    """Length of the token prefix every sample starts with and none labels."""
    first = samples[0].ids
    n = min(len(s.ids) for s in samples)
    for s in samples:
        while n and s.ids[:n] != first[:n]:
            n -= 1
    while n and any(s.labels[n - 1] for s in samples):
        n -= 1
    return n


def batch_loss(model: Any, prefix: torch.Tensor, batch: list[Sample]) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens of `batch`, the shared prefix run once."""
    P = prefix.shape[0]
    L = max(len(s.ids) for s in batch) - P
    ids = torch.zeros(len(batch), L, dtype=torch.long)  # [B, L]
    mask = torch.zeros(len(batch), L, dtype=torch.long)  # [B, L]
    target = torch.full((len(batch), L), -100, dtype=torch.long)  # [B, L]
    for b, s in enumerate(batch):
        n = len(s.ids) - P
        ids[b, :n] = torch.tensor(s.ids[P:])
        mask[b, :n] = 1
        # position t predicts token t + 1
        target[b, :n - 1] = torch.tensor([t if lab else -100 for t, lab in zip(s.ids[P + 1:], s.labels[P + 1:],
                                                                                 strict=True)])
    out = model.model(input_ids=prefix[None], use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(batch))
    attention = torch.cat([torch.ones(len(batch), P, dtype=torch.long), mask], dim=1)  # [B, P + L]
    logits = model(input_ids=ids, past_key_values=cache, attention_mask=attention, use_cache=False).logits
    first = model.lm_head(out.last_hidden_state[:, -1])  # [1, V]: predicts the first suffix token
    loss_sum = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 reduction="sum")
    first_targets = torch.tensor([s.ids[P] if s.labels[P] else -100 for s in batch])
    loss_sum = loss_sum + torch.nn.functional.cross_entropy(first.expand(len(batch), -1), first_targets,
                                                            reduction="sum")
    count = (target != -100).sum() + (first_targets != -100).sum()
    return loss_sum / count.clamp(min=1)


@dataclass(frozen=True)
class TrainPlan:
    steps: int
    qat_steps: int  # the last qat_steps of `steps` train with fake-quantized experts
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 20
    seed: int = 0


def train(model: Any, samples: list[Sample], plan: TrainPlan,
          on_step: Callable[[int, float, bool], None], on_qat_start: Callable[[], None]) -> list[tuple[int, float]]:
    """Trains in place; returns the loss curve (step, loss). `on_qat_start` runs just before fake quantization
    is switched on (the caller saves the bf16 weights there)."""
    rng = random.Random(plan.seed)
    prefix = torch.tensor(samples[0].ids[:shared_prefix(samples)])
    opt = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=0.0, betas=(0.9, 0.98))
    order: list[int] = []
    curve = []
    model.train()
    for step in range(plan.steps):
        qat = step >= plan.steps - plan.qat_steps
        if step == plan.steps - plan.qat_steps:
            on_qat_start()
            enable_qat(model)
            opt = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=0.0, betas=(0.9, 0.98))
        warm = min(1.0, (step + 1) / plan.warmup)
        progress = step / max(1, plan.steps - 1)
        for group in opt.param_groups:
            group["lr"] = plan.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        if len(order) < plan.batch_size:
            order += rng.sample(range(len(samples)), len(samples))
        batch = [samples[i] for i in order[:plan.batch_size]]
        del order[:plan.batch_size]
        with parametrize.cached():
            loss = batch_loss(model, prefix, batch)
            opt.zero_grad()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append((step, loss.item()))
        on_step(step, loss.item(), qat)
    model.eval()
    return curve


def save_bf16(model: Any, directory: Path, config: K2Config) -> Path:
    """The model's latent weights as a bf16 checkpoint in K2's layout (config.json as K2 ships it)."""
    model.to(torch.bfloat16).save_pretrained(directory)
    model.float()
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    for extra in ("generation_config.json",):
        (directory / extra).unlink(missing_ok=True)
    return directory


def save_int4(bf16_dir: Path, directory: Path) -> Path:
    """`k2serve quantize` of the bf16 checkpoint: INT4 pack-quantized routed experts, everything else bf16."""
    if directory.exists():
        shutil.rmtree(directory)
    return quantize_checkpoint(bf16_dir, directory, progress=False)

