"""The sampler's logits processors against hand-written references on fresh random logits: repetition, presence
and frequency penalties, logit bias, min-p and the token bitmask."""

from __future__ import annotations

import pytest
import torch

from k2serve.sampling_params import SamplingParams
from k2serve.worker.engine.guide import set_tokens
from k2serve.worker.engine.sampling import History, process_logits, sample

V = 300


def _reference_penalties(row: torch.Tensor, p: SamplingParams, h: History) -> torch.Tensor:
    out = row.clone()
    for t in set(h.prompt) | set(h.output):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(h.output):
        out[t] -= p.frequency_penalty * h.output.count(t) + p.presence_penalty
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_penalties_and_bias_match_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, V, generator=g) * 3  # [B, V]
    hist = [History(torch.randint(0, V, (40,), generator=g).tolist(), torch.randint(0, V, (25,), generator=g).tolist())
            for _ in range(3)]
    params = [SamplingParams(presence_penalty=0.7, frequency_penalty=0.3, repetition_penalty=1.3),
              SamplingParams(logit_bias={5: 100.0, 7: -100.0, 11: 2.5}),
              SamplingParams()]
    out = process_logits(logits, params, hist, None, None)
    torch.testing.assert_close(out[0], _reference_penalties(logits[0], params[0], hist[0]), rtol=1e-6, atol=1e-5)
    expected = logits[1].clone()
    expected[5] += 100.0
    expected[7] -= 100.0
    expected[11] += 2.5
    torch.testing.assert_close(out[1], expected)
    torch.testing.assert_close(out[2], logits[2])  # untouched rows stay as they were
    assert sample(logits, params, [1, 2, 3], [65, 65, 65], histories=hist).tokens[1] == 5  # the +100 wins


def test_min_p_never_samples_below_the_floor() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, V, generator=g) * 2
    probs = logits.softmax(-1)[0]
    floor = 0.2 * probs.max()
    p = SamplingParams(temperature=1.0, min_p=0.2)
    drawn = {int(sample(logits, [p], [s], [0]).tokens[0]) for s in range(300)}
    assert all(probs[t] >= floor for t in drawn)
    assert len(drawn) == int((probs >= floor).sum())  # and every token above it can be drawn


def test_bitmask_restricts_rows_and_logprobs_stay_raw() -> None:
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, V, generator=g)
    bitmask = torch.full((2, -(-V // 32)), -1, dtype=torch.int32)  # [B, W]
    allowed = [3, 31, 32, 63, 299]
    bitmask[1].zero_()
    set_tokens(bitmask[1], allowed)
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0)]
    seen = set()
    for s in range(200):
        out = sample(logits, params, [s, s], [4, 4], bitmask=bitmask, masked_rows=[1])
        seen.add(int(out.tokens[1]))
        raw = torch.log_softmax(logits[1], -1)[out.tokens[1]]
        torch.testing.assert_close(out.logprobs[1], raw)
    assert seen == set(allowed)
    greedy = sample(logits, [SamplingParams(temperature=0.0)] * 2, [0, 0], [0, 0], bitmask=bitmask, masked_rows=[1])
    assert int(greedy.tokens[1]) == max(allowed, key=lambda t: float(logits[1, t]))
    assert int(greedy.tokens[0]) == int(logits[0].argmax())


def test_bad_processor_input_is_refused() -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: 101.0})
    with pytest.raises(ValueError, match="history"):
        process_logits(torch.zeros(1, V), [SamplingParams(presence_penalty=1.0)], None, None, None)
