"""The shard-aware loader: expert ranges read only their own tensors, INT4 stays packed as stored, plain and
tied checkpoints load, and bad input (range, format, shape, missing or corrupted shards) names file and tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from k2serve.worker.checkpoint import INDEX_FILE, dense_shapes, expert_module, read_weight_map
from k2serve.k2format.source import BUILTIN_TINY, resolve_model
from k2serve.worker.loader import load_weights, resolve_checkpoint
from k2serve.worker.tiny import tiny_config, write_random_checkpoint

CONFIG = tiny_config()  # 16 experts, MoE layers 1..3
EXPERT_TENSORS_PER_EXPERT_LAYER = 9  # gate/up/down x (weight_packed, weight_scale, weight_shape)


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("int4"), CONFIG, seed=3, quantize=True,
                                   max_shard_bytes=500_000)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("bf16"), CONFIG, seed=3, max_shard_bytes=1_000_000)


def copy_of(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "model"))


def test_expert_ranges_of_a_4_shard_split_read_only_their_experts(int4_dir: Path) -> None:
    full = load_weights(int4_dir)
    full_bytes = sum(s.nbytes() for s in full.experts.values())
    dense_names = set(dense_shapes(CONFIG))
    assert len(full.stats.per_file) >= 5  # the checkpoint really is spread over several files
    parts = []
    for a in range(0, 16, 4):
        part = load_weights(int4_dir, expert_range=(a, a + 4))
        read = part.stats.names
        assert len(read) == len(set(read)) == part.stats.tensors_read  # nothing read twice
        experts_read = {n for n in read if ".mlp.experts." in n}
        wanted = {f"{expert_module(layer, e, proj)}.{suffix}" for layer in CONFIG.moe_layers for e in range(a, a + 4)
                  for proj in ("gate_proj", "up_proj", "down_proj")
                  for suffix in ("weight_packed", "weight_scale", "weight_shape")}
        assert experts_read == wanted
        assert len(experts_read) == EXPERT_TENSORS_PER_EXPERT_LAYER * 4 * len(CONFIG.moe_layers)
        assert set(read) - experts_read == dense_names
        resident = sum(s.nbytes() for s in part.experts.values())
        assert resident <= 1.05 * full_bytes / 4, (resident, full_bytes)
        assert part.stats.expert_bytes_read <= 1.05 * full.stats.expert_bytes_read / 4
        dense_bytes = full.stats.bytes_read - full.stats.expert_bytes_read
        assert part.stats.bytes_read == dense_bytes + part.stats.expert_bytes_read
        parts.append(part)
    for layer, shard in full.experts.items():  # the four shards together are the whole layer, bit for bit
        assert all(p.experts[layer].num_experts == 16 and p.experts[layer].num_local == 4 for p in parts)
        assert [p.experts[layer].start for p in parts] == [0, 4, 8, 12]
        for field in ("w13", "w2", "w13_scale", "w2_scale"):
            assert torch.equal(torch.cat([getattr(p.experts[layer], field) for p in parts]), getattr(shard, field))


def test_int4_experts_stay_packed_as_stored(int4_dir: Path) -> None:
    w = load_weights(int4_dir, expert_range=(5, 7), dtype=torch.bfloat16)
    weight_map, _ = read_weight_map(int4_dir)
    shard = w.experts[2]
    i = CONFIG.moe_intermediate_size
    assert shard.quantized and shard.w13.dtype == torch.int32 and shard.w13_scale.dtype == torch.bfloat16
    assert shard.w13.shape == (2, 2 * i, CONFIG.hidden_size // 8)
    assert shard.w2.shape == (2, CONFIG.hidden_size, i // 8)

    def stored(name: str) -> torch.Tensor:
        with safe_open(str(int4_dir / weight_map[name]), framework="pt") as f:
            return f.get_tensor(name)

    m = "model.layers.2.mlp.experts.6."
    assert torch.equal(shard.w13[1, :i], stored(m + "gate_proj.weight_packed"))
    assert torch.equal(shard.w13[1, i:], stored(m + "up_proj.weight_packed"))
    assert torch.equal(shard.w13_scale[1, i:], stored(m + "up_proj.weight_scale"))
    assert torch.equal(shard.w2[1], stored(m + "down_proj.weight_packed"))
    assert w.dense["model.layers.2.self_attn.kv_b_proj.weight"].dtype == torch.bfloat16
    bias = w.dense["model.layers.2.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and torch.equal(bias, stored("model.layers.2.mlp.gate.e_score_correction_bias"))


def test_plain_checkpoint_experts_cast_to_dtype(bf16_dir: Path) -> None:
    w = load_weights(bf16_dir, expert_range=(8, 16), dtype=torch.float32)
    shard = w.experts[3]
    assert not shard.quantized and shard.w13.dtype == torch.float32 and shard.start == 8
    weights = {}
    for f in sorted(set(read_weight_map(bf16_dir)[0].values())):
        weights.update(load_file(str(bf16_dir / f)))
    i = CONFIG.moe_intermediate_size
    assert torch.equal(shard.w13[0, i:], weights["model.layers.3.mlp.experts.8.up_proj.weight"].float())
    assert torch.equal(shard.w2[7], weights["model.layers.3.mlp.experts.15.down_proj.weight"].float())
    assert all(t.dtype == torch.float32 for t in w.dense.values())
    assert "lm_head.weight" in w.dense and w.dense["lm_head.weight"] is not w.dense["model.embed_tokens.weight"]


def test_single_file_tied_checkpoint_from_transformers(tmp_path: Path) -> None:
    hf = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                          num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                          n_shared_experts=1, n_group=1, topk_group=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None,
                          kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                          tie_word_embeddings=True)
    DeepseekV3ForCausalLM(hf).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / INDEX_FILE).exists()
    w = load_weights(tmp_path, expert_range=(1, 3))
    assert w.dense["lm_head.weight"] is w.dense["model.embed_tokens.weight"]
    assert "model.layers.0.self_attn.q_proj.weight" in w.dense  # no q_lora_rank: one query projection
    assert w.experts[1].num_local == 2 and w.stats.per_file.keys() == {"model.safetensors"}


@pytest.mark.parametrize("bad", [(0, 17), (4, 4), (-1, 2), (9, 3)])
def test_expert_range_out_of_bounds(int4_dir: Path, bad: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=r"expert_range .* 0 <= start < end <= n_routed_experts \(16\)"):
        load_weights(int4_dir, expert_range=bad)


def test_missing_tensor_names_tensor_and_index(int4_dir: Path, tmp_path: Path) -> None:
    d = copy_of(int4_dir, tmp_path)
    index = json.loads((d / INDEX_FILE).read_text())
    gone = "model.layers.3.mlp.experts.13.up_proj.weight_scale"
    del index["weight_map"][gone]
    (d / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{d / INDEX_FILE}: tensor '{gone}' is missing"):
        load_weights(d, expert_range=(12, 16))
    load_weights(d, expert_range=(0, 12))  # a worker that does not own expert 13 never needs it


def test_wrong_shape_names_file_tensor_and_shapes(bf16_dir: Path, tmp_path: Path) -> None:
    d = copy_of(bf16_dir, tmp_path)
    name = "model.layers.1.self_attn.o_proj.weight"
    file = d / read_weight_map(d)[0][name]
    tensors = load_file(str(file))
    tensors[name] = tensors[name][:, :-8].contiguous()
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=rf"{file}: tensor '{name}' has shape \[256, 120\], the config implies "
                                         rf"\[256, 128\]"):
        load_weights(d)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupted_shard_names_the_file(int4_dir: Path, tmp_path: Path, damage: str) -> None:
    d = copy_of(int4_dir, tmp_path)
    file = d / sorted(set(read_weight_map(d)[0].values()))[2]
    data = file.read_bytes()
    file.write_bytes(data[:-1000] if damage == "truncate" else b"\xff" * 8 + data[8:])
    with pytest.raises(ValueError, match=f"{file}: corrupted safetensors file"):
        load_weights(d)


def test_missing_shard_file_names_it(int4_dir: Path, tmp_path: Path) -> None:
    d = copy_of(int4_dir, tmp_path)
    file = d / sorted(set(read_weight_map(d)[0].values()))[0]
    file.unlink()
    with pytest.raises(FileNotFoundError, match=f"{file}: shard listed in {d / INDEX_FILE} is missing"):
        load_weights(d)


def test_format_must_match_quantization_config(int4_dir: Path, bf16_dir: Path, tmp_path: Path) -> None:
    plain = copy_of(bf16_dir, tmp_path / "a")
    cfg = json.loads((int4_dir / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps(cfg))  # claims INT4, holds bf16 experts
    with pytest.raises(ValueError, match=r"\.safetensors: tensor 'model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight' "
                                         r"is stored plain, but config.json's quantization_config makes .* packed"):
        load_weights(plain)

    packed = copy_of(int4_dir, tmp_path / "b")
    del cfg["quantization_config"]
    (packed / "config.json").write_text(json.dumps(cfg))  # claims bf16, holds packed experts
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight_packed' is stored "
                                         r"packed"):
        load_weights(packed)

    cfg = json.loads((int4_dir / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = ["lm_head"]  # would make attention INT4: not how K2 ships
    (packed / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: quantization_config.ignore leaves model\.layers\.0\.self_attn"
                                         r"\.q_a_proj quantized"):
        load_weights(packed)


def test_resolve_model(tmp_path: Path, bf16_dir: Path) -> None:
    assert resolve_model(str(bf16_dir)) == bf16_dir
    assert resolve_model(f"file://{bf16_dir}") == bf16_dir
    tiny = resolve_checkpoint(BUILTIN_TINY, cache_dir=tmp_path / "cache")
    assert tiny.parent == tmp_path / "cache" and tiny.name.startswith("tiny-k2-")
    assert load_weights(tiny, expert_range=(0, 8)).experts[1].quantized
    with pytest.raises(ValueError, match="not supported here; mount the model as a volume"):
        resolve_model("s3://bucket/Kimi-K2-Thinking")
    with pytest.raises(FileNotFoundError, match="never downloads models"):
        resolve_model("moonshotai/Kimi-K2-Thinking-not-here")
    with pytest.raises(ValueError, match="unknown built-in model 'builtin:k3'"):
        resolve_model("builtin:k3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
