"""The single-process engine on tiny-k2: batch invariance in deterministic mode, prefix caching, the latent
KV cache's size, long prompts, preemption, and bad input."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import run_all, tiny_engine, tiny_weights

from k2serve.worker.engine.sampling import SamplingParams
from k2serve.worker.model.batch import LatentKVCache


def mixed_prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 180, (n,), generator=g).tolist()
    return [torch.randint(0, 256, (length,), generator=g).tolist() for length in lengths]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_deterministic_mode_is_batch_invariant(temperature: float) -> None:
    prompts = mixed_prompts(16, seed=7)
    params = [SamplingParams(temperature=temperature, seed=100 + i, max_tokens=12) for i in range(16)]
    batched = tiny_engine(deterministic=True, max_batch_tokens=256)
    for i, p in enumerate(prompts):
        batched.add_request(str(i), p, params[i])
    together = run_all(batched)
    assert max(batched.forward_rows) > 16  # requests really shared steps
    for i, p in enumerate(prompts):
        alone = tiny_engine(deterministic=True)
        alone.add_request(str(i), p, params[i])
        assert run_all(alone)[str(i)] == together[str(i)], f"request {i} changed with its batch"


def test_per_request_determinism_switch() -> None:
    engine = tiny_engine(deterministic=False)
    prompts = mixed_prompts(4, seed=3)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=8), deterministic=(i % 2 == 0))
    mixed = run_all(engine)
    for i in (0, 2):
        alone = tiny_engine(deterministic=True)
        alone.add_request(str(i), prompts[i], SamplingParams(temperature=0.0, max_tokens=8))
        assert run_all(alone)[str(i)] == mixed[str(i)]


def test_prefix_cache_prefills_only_new_tokens_and_keeps_output() -> None:
    g = torch.Generator().manual_seed(11)
    prefix = torch.randint(0, 256, (200,), generator=g).tolist()
    first, second = prefix + [1, 2, 3, 4, 5], prefix + [9, 8, 7]
    params = SamplingParams(temperature=0.0, max_tokens=10)

    cached = tiny_engine(deterministic=True, block_size=8)
    cached.add_request("a", first, params)
    run_all(cached)
    before = cached.stats.prefill_tokens
    cached.add_request("b", second, params)
    with_cache = run_all(cached)["b"]
    assert cached.stats.prefill_tokens - before == len(second) - 200
    assert cached.blocks.prefix_hit_tokens == 200

    uncached = tiny_engine(deterministic=True, block_size=8, enable_prefix_caching=False)
    uncached.add_request("b", second, params)
    assert run_all(uncached)["b"] == with_cache
    assert uncached.stats.prefill_tokens == len(second)


def test_blocks_filled_while_decoding_join_the_prefix_cache() -> None:
    """A chain's next turn (prompt + the previous turn's output + more) reuses every block the previous turn
    filled, generated tokens included: the engine commits a block when its step fills it."""
    g = torch.Generator().manual_seed(12)
    prompt = torch.randint(0, 256, (21,), generator=g).tolist()
    engine = tiny_engine(block_size=8)
    engine.add_request("turn-1", prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    output = run_all(engine)["turn-1"]
    assert len(output) == 30
    before = engine.stats.prefill_tokens
    engine.add_request("turn-2", prompt + output + [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=2))
    run_all(engine)
    # the KV of the last token sampled was never computed: 21 + 29 = 50 tokens have KV, 48 of them in full blocks
    assert engine.blocks.prefix_hit_tokens == 48
    assert engine.stats.prefill_tokens - before == len(prompt) + 30 + 3 - 48


def test_kv_cache_holds_only_the_latent_per_token() -> None:
    config = tiny_weights().config
    engine = tiny_engine(num_blocks=64, block_size=16)
    per_token = (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * 4  # fp32
    assert LatentKVCache.bytes_per_token(config, torch.float32) == per_token
    assert engine.kv.data.numel() * engine.kv.data.element_size() == per_token * 64 * 16
    # Far below what full per-head K and V would need.
    full_kv = config.num_hidden_layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * 4
    assert per_token * 3 < full_kv


def test_runs_an_8k_token_prompt() -> None:
    engine = tiny_engine(num_blocks=520, block_size=16, max_batch_tokens=2048)
    prompt = torch.randint(0, 256, (8192,), generator=torch.Generator().manual_seed(5)).tolist()
    engine.add_request("long", prompt, SamplingParams(temperature=0.0, max_tokens=4))
    out = run_all(engine)
    assert len(out["long"]) == 4
    assert engine.stats.prefill_tokens == 8192


def test_preemption_recomputes_and_keeps_greedy_output() -> None:
    prompts = mixed_prompts(6, seed=13)
    params = SamplingParams(temperature=0.0, max_tokens=40)
    tight = tiny_engine(deterministic=True, num_blocks=40, block_size=8)
    for i, p in enumerate(prompts):
        tight.add_request(str(i), p, params)
    squeezed = run_all(tight)
    assert tight.stats.preemptions > 0
    for i, p in enumerate(prompts):
        roomy = tiny_engine(deterministic=True)
        roomy.add_request(str(i), p, params)
        assert run_all(roomy)[str(i)] == squeezed[str(i)]


def test_resumed_request_continues_identically() -> None:
    prompt = mixed_prompts(1, seed=21)[0]
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=20)
    full = tiny_engine(deterministic=True)
    full.add_request("r", prompt, params)
    expected = run_all(full)["r"]
    resumed = tiny_engine(deterministic=True)
    resumed.add_request("r", prompt, params, output_prefix=expected[:9])
    assert expected[:9] + run_all(resumed)["r"] == expected


def test_deterministic_decode_logits_equal_prefill_logits_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """What resumption rests on: the logits after decoding token j alone equal the last row of one prefill of
    the prompt + the first j outputs, to the bit — CPU int4 experts, router sigmoid and rope angles included
    (each has a vectorized and a scalar path on CPU; see model/rowwise.py)."""
    prompt = mixed_prompts(1, seed=41)[0]
    captured: list[torch.Tensor] = []

    def capturing(engine):  # noqa: ANN001, ANN202 - records each step's logits [B, V]
        forward = engine.model.forward

        def record(batch, kv):  # noqa: ANN001, ANN202
            captured.append(forward(batch, kv))
            return captured[-1]

        monkeypatch.setattr(engine.model, "forward", record)
        return engine

    decoding = capturing(tiny_engine(deterministic=True))
    decoding.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    outputs = run_all(decoding)["r"]
    decoded = [row[0].clone() for row in captured]  # step j's logits predict output j
    assert len(decoded) == 40
    for j in (1, 9, 26, 39):
        captured.clear()
        prefill = capturing(tiny_engine(deterministic=True))
        prefill.add_request("r", prompt + outputs[:j], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        run_all(prefill)
        assert torch.equal(captured[0][0], decoded[j]), f"position {len(prompt) + j}"


def test_kv_handoff_between_engines_matches_one_engine() -> None:
    prompt = mixed_prompts(1, seed=31)[0]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    one = tiny_engine(deterministic=True)
    one.add_request("r", prompt, params)
    expected = run_all(one)["r"]

    prefill = tiny_engine(deterministic=True)
    prefill.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=1), hold_kv=True)
    first = run_all(prefill)["r"]
    handoff = prefill.export_kv("r")
    assert prefill.blocks.num_used_blocks == 0
    decode = tiny_engine(deterministic=True)
    decode.add_request("r", prompt, params, output_prefix=first, kv=handoff)
    rest = run_all(decode)["r"]
    assert first + rest == expected
    assert decode.stats.prefill_tokens == 0  # nothing recomputed but the first token


@pytest.mark.parametrize("prompt,params,match", [
    ([], SamplingParams(), "empty prompt"),
    ([600], SamplingParams(), "token ids"),
    ([1] * 16380, SamplingParams(max_tokens=5), "context limit"),
])
def test_bad_requests_get_clear_errors(prompt: list[int], params: SamplingParams, match: str) -> None:
    engine = tiny_engine()
    with pytest.raises(ValueError, match=match):
        engine.add_request("x", prompt, params)
    assert not engine.has_work()


@pytest.mark.parametrize("chunk_bytes", [None, 40_000])
def test_batched_decode_attention_matches_one_sequence_at_a_time(chunk_bytes: int | None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The default mode attends for all decoding sequences in padded chunks (one, or with a small chunk budget
    several); it must agree with attending for each alone (up to float rounding). The experts run the float32
    reference: the CPU int4 GEMM rounds its activations to bf16, which turns a last-bit difference into a bf16
    step."""
    from k2serve.worker.model import batch as batch_module
    from k2serve.worker.model.batch import ForwardBatch, SeqSlice
    from k2serve.worker.model.ffn import LocalExperts
    from k2serve.worker.model.k2 import K2Model
    from k2serve.worker.quant.moe import reference_moe

    if chunk_bytes is not None:
        monkeypatch.setattr(batch_module, "CPU_CHUNK_BYTES", chunk_bytes)
    w = tiny_weights()
    model = K2Model(w.config, w.dense, LocalExperts(w.experts, reference_moe))
    kv = LatentKVCache(w.config, 64, 16, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    lengths = [5, 37, 16, 90]
    bases = [i * 256 for i in range(len(lengths))]  # disjoint slot ranges
    for base, n in zip(bases, lengths):  # prefill each sequence's context into the cache
        ids = torch.randint(0, 256, (n,), generator=g)
        model.forward(ForwardBatch(ids, torch.arange(n), [SeqSlice(0, n, 0, torch.arange(base, base + n))],
                                   torch.tensor([n - 1])), kv)
    nxt = torch.randint(0, 256, (len(lengths),), generator=g)
    seqs = [SeqSlice(i, 1, n, torch.arange(base, base + n + 1)) for i, (base, n) in enumerate(zip(bases, lengths))]
    step = ForwardBatch(nxt, torch.tensor(lengths), seqs, torch.arange(len(lengths)))
    gather = step.decode_gather(kv)
    assert gather is not None and len(gather.chunks) == (1 if chunk_bytes is None else 3)
    together = model.forward(step, kv)
    for i, s in enumerate(seqs):
        alone = model.forward(ForwardBatch(nxt[i : i + 1], torch.tensor([lengths[i]]), [SeqSlice(0, 1, s.start_pos, s.slots)],
                                           torch.tensor([0])), kv)
        torch.testing.assert_close(together[i], alone[0], rtol=1e-5, atol=1e-5)
