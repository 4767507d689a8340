"""`builtin:tiny-k2`: K2's layout exactly as transformers writes it, built deterministically and atomically into the
cache, with weights that keep the model's activations and routing alive."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from k2serve.worker.checkpoint import INDEX_FILE, checkpoint_shapes, read_weight_map
from k2serve.worker.loader import load_weights
from k2serve.worker.model.batch import ForwardBatch, LatentKVCache, SeqSlice
from k2serve.k2format.model_config import K2Config
from k2serve.worker.model.k2 import K2Model
from k2serve.worker.tiny import ensure_tiny, tiny_config, write_random_checkpoint
from k2serve.k2format.tokenizer import K2Tokenizer


def hf_config(config: K2Config) -> DeepseekV3Config:
    """transformers does not know `kimi_k2`: the same fields under an explicit DeepseekV3Config."""
    fields = config.to_hf_dict()
    for key in ("model_type", "architectures", "quantization_config"):
        fields.pop(key, None)
    return DeepseekV3Config(**fields)


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_tiny_config_is_k2_scaled_down() -> None:
    c = tiny_config()
    assert c.model_type == "kimi_k2" and c.moe_layers == [1, 2, 3]
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts) == (16, 4, 1)
    assert (c.scoring_func, c.topk_method, c.norm_topk_prob, c.routed_scaling_factor) == ("sigmoid", "noaux_tc",
                                                                                           True, 2.827)
    r = c.rope
    assert (r.rope_type, r.factor, r.mscale, r.mscale_all_dim) == ("yarn", 64.0, 1.0, 1.0)
    assert r.original_max_position_embeddings * r.factor == c.max_position_embeddings == 16384
    grouped = tiny_config(n_routed_experts=32, n_group=4, topk_group=2, num_hidden_layers=3)
    assert (grouped.n_group, grouped.topk_group, grouped.num_hidden_layers) == (4, 2, 3)


def test_layout_is_what_transformers_writes_and_reads(tmp_path: Path) -> None:
    config = tiny_config(n_routed_experts=4, num_hidden_layers=2)
    DeepseekV3ForCausalLM(hf_config(config)).save_pretrained(tmp_path / "hf", max_shard_size="1MB")
    hf_map, _ = read_weight_map(tmp_path / "hf")
    hf_shapes = {}
    for name, file in hf_map.items():
        with safe_open(str(tmp_path / "hf" / file), framework="pt") as f:
            hf_shapes[name] = tuple(f.get_slice(name).get_shape())
    assert hf_shapes == checkpoint_shapes(config)

    ours = write_random_checkpoint(tmp_path / "ours", config, seed=1, max_shard_bytes=200_000)
    model, info = DeepseekV3ForCausalLM.from_pretrained(ours, config=hf_config(config), dtype=torch.float32,
                                                        output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    with safe_open(str(ours / read_weight_map(ours)[0]["model.layers.1.self_attn.kv_b_proj.weight"]), "pt") as f:
        stored = f.get_tensor("model.layers.1.self_attn.kv_b_proj.weight")
    assert torch.equal(model.model.layers[1].self_attn.kv_b_proj.weight, stored.float())


def test_ensure_tiny_is_deterministic_cached_and_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = ensure_tiny(tmp_path / "a")
    monkeypatch.setenv("K2SERVE_CACHE", str(tmp_path / "b"))
    b = ensure_tiny()
    assert a.parent == tmp_path / "a" and b.parent == tmp_path / "b" and a.name == b.name
    assert files(a) == files(b)  # same bytes, every file
    assert len([n for n in files(a) if n.endswith(".safetensors")]) >= 4 and (a / INDEX_FILE).is_file()
    index_mtime = (a / INDEX_FILE).stat().st_mtime_ns
    assert ensure_tiny(tmp_path / "a") == a and (a / INDEX_FILE).stat().st_mtime_ns == index_mtime  # not rebuilt

    config = K2Config.from_dir(a)
    assert config.quantization is not None and config == tiny_config().model_copy(
        update={"quantization": config.quantization})
    tok = K2Tokenizer.from_dir(a)
    assert tok.vocab_size == config.vocab_size and tok.bos_id == config.bos_token_id == 256
    assert config.eos_token_id in tok.eos_ids
    assert load_weights(a).experts[3].quantized


def test_racing_builders_agree(tmp_path: Path) -> None:
    start = threading.Barrier(2)
    results: list[Path] = []

    def build() -> None:
        start.wait()
        results.append(ensure_tiny(tmp_path))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]  # no half-built temp folder left
    assert json.loads((results[0] / INDEX_FILE).read_text())["weight_map"]


def test_random_weights_keep_the_model_alive(tmp_path: Path) -> None:
    """Activations O(1), logits spread (not one token always winning), routing using the experts."""
    config = tiny_config()
    weights = load_weights(write_random_checkpoint(tmp_path, config, seed=5, quantize=True))
    model = K2Model(weights.config, weights.dense, weights.experts)
    T = 96
    ids = torch.randint(0, 256, (T,), generator=torch.Generator().manual_seed(0))
    kv = LatentKVCache(config, T // 16, 16, model.dtype, model.device)
    logits = model.forward(ForwardBatch(ids, torch.arange(T), [SeqSlice(0, T, 0, torch.arange(T))], torch.arange(T)),
                           kv)  # [T, V]
    assert bool(torch.isfinite(logits).all())
    assert 0.3 < logits.std().item() < 10
    assert torch.softmax(logits, -1).amax(-1).mean().item() < 0.5
    assert logits.argmax(-1).unique().numel() > T // 4
    load = model.expert_load.take()  # [moe layers, E] tokens per expert
    assert int(load.sum()) == T * config.num_experts_per_tok * len(config.moe_layers)
    assert bool(((load > 0).sum(-1) >= config.n_routed_experts * 3 // 4).all())
    assert weights.dense["model.layers.1.mlp.gate.e_score_correction_bias"].abs().max() > 0
