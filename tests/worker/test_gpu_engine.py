"""The engine on CUDA (marker `gpu`: bench/gpu_check.sh runs these on a GPU machine; the default run deselects
them). tiny-k2 in float32 on the GPU, with the Triton INT4 experts, against the CPU engine; and a deterministic
request resumed with its `output_prefix` in a batch of others continuing exactly like the uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import run_all, tiny_engine

from k2serve.worker.engine.engine import Engine
from k2serve.worker.engine.sampling import SamplingParams

pytestmark = pytest.mark.gpu

CUDA = "cuda"
# A greedy token can only flip between devices where its top-2 logits are this close; the CPU run of every prompt
# below keeps a wider gap at every step (asserted), far above float32 rounding differences between the devices.
MIN_MARGIN = 2e-3
STEPS = 24


def prompts(picks: list[int], seed: int = 1) -> list[list[int]]:
    """Seeded prompts of 4..119 tokens; `picks` chooses which of the drawn ones."""
    g = torch.Generator().manual_seed(seed)
    drawn = []
    for _ in range(max(picks) + 1):
        n = int(torch.randint(4, 120, (1,), generator=g))
        drawn.append(torch.randint(0, 256, (n,), generator=g).tolist())
    return [drawn[i] for i in picks]


def greedy_with_margin(prompt: list[int]) -> tuple[list[int], float]:
    """CPU deterministic engine, one request alone: its tokens and the smallest top-1/top-2 logit gap it saw."""
    engine = tiny_engine(deterministic=True)
    logits: list[torch.Tensor] = []
    forward = engine.model.forward

    def record(batch, kv):  # noqa: ANN001, ANN202 - each step's logits [1, V]
        logits.append(forward(batch, kv))
        return logits[-1]

    engine.model.forward = record  # type: ignore[method-assign]
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True))
    tokens = run_all(engine)["r"]
    top2 = torch.stack([row[0].topk(2).values for row in logits])  # [steps, 2]
    return tokens, float((top2[:, 0] - top2[:, 1]).min())


def batched(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams, list[int]]]) -> dict[str, list[int]]:
    """Every request queued before the first step, so they share the engine's steps; id -> generated tokens."""
    for rid, (prompt, params, prefix) in requests.items():
        engine.add_request(rid, prompt, params, output_prefix=prefix)
    return run_all(engine)


def test_greedy_tokens_on_cuda_equal_the_cpu_engines() -> None:
    chosen = prompts([0, 3, 4, 5, 6])
    expected = {}
    for i, prompt in enumerate(chosen):
        tokens, margin = greedy_with_margin(prompt)
        assert margin >= MIN_MARGIN, f"prompt {i}: a near-tie ({margin:.1e}) would make the comparison luck"
        expected[str(i)] = tokens
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    for deterministic in (False, True):
        engine = tiny_engine(deterministic=deterministic, device=CUDA)
        assert engine.model.device.type == torch.device(CUDA).type
        got = batched(engine, {str(i): (p, params, []) for i, p in enumerate(chosen)})
        assert max(engine.forward_rows) > 1  # the requests really shared steps
        assert got == expected, f"deterministic={deterministic}"


def test_deterministic_resume_on_cuda_continues_identically() -> None:
    chosen = prompts([1, 2, 7, 9], seed=5)
    params = [SamplingParams(temperature=1.0, seed=40 + i, max_tokens=20, ignore_eos=True) for i in range(4)]
    alone = tiny_engine(deterministic=True, device=CUDA)
    full = batched(alone, {"r": (chosen[0], params[0], [])})["r"]
    assert len(full) == 20
    for cut in (1, 9, 19):
        # The resumed request comes back beside three others: batch invariance is what makes this exact.
        engine = tiny_engine(deterministic=True, device=CUDA)
        requests = {"r": (chosen[0], params[0], full[:cut])}
        requests.update({f"o{i}": (chosen[i], params[i], []) for i in (1, 2, 3)})
        rest = batched(engine, requests)["r"]
        assert full[:cut] + rest == full, f"resumed after {cut} tokens"
