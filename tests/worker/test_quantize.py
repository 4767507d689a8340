"""INT4 layout against compressed-tensors itself, and `k2serve quantize` end to end: its output decompresses with
compressed-tensors' own checkpoint converter to exactly the weights k2serve computes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.entrypoints.convert.convert_checkpoint import convert_checkpoint
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
from safetensors import safe_open

from k2serve.cli import main as k2serve
from k2serve.worker.checkpoint import INDEX_FILE, expert_module, read_weight_map
from k2serve.worker.loader import load_weights
from k2serve.worker.quant.int4 import pack_int4, unpack_int4
from k2serve.worker.quant.moe import ExpertShard
from k2serve.worker.quantize import k2_quant_config, quantize_checkpoint
from k2serve.worker.tiny import tiny_config, write_random_checkpoint
from k2serve.k2format.tokenizer import write_tiny_tokenizer

CONFIG = tiny_config(n_routed_experts=8)


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    weight_map, _ = read_weight_map(directory)
    out = {}
    for name, file in weight_map.items():
        with safe_open(str(directory / file), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = write_random_checkpoint(tmp_path_factory.mktemp("bf16"), CONFIG, seed=7, max_shard_bytes=300_000)
    write_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def quantized_dir(bf16_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("int4") / "model"
    assert k2serve(["quantize", str(bf16_dir), str(dst), "--max-shard-bytes", "400000"]) == 0
    return dst


def test_pack_is_byte_identical_to_compressed_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (64, 256), generator=g, dtype=torch.int8)  # every nibble value occurs
    ours = pack_int4(q)
    theirs = pack_to_int32(q, 4)
    assert ours.dtype == theirs.dtype == torch.int32
    assert ours.numpy().tobytes() == theirs.numpy().tobytes()
    assert torch.equal(unpack_from_int32(ours, 4, torch.Size(q.shape)), q)
    assert torch.equal(unpack_int4(theirs), q)
    # K2-FORMAT.md's worked example: lowest nibble first, stored value q + 8.
    assert pack_int4(torch.tensor([[-8, -7, 0, 1, 2, 3, 4, 7]])).item() == 0xFCBA9810 - 2**32


def test_quantize_writes_k2_thinking_layout(bf16_dir: Path, quantized_dir: Path) -> None:
    cfg = json.loads((quantized_dir / "config.json").read_text())
    assert cfg["quantization_config"] == k2_quant_config().to_hf()
    assert cfg["quantization_config"]["ignore"] == [
        "lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == json.loads(
        (bf16_dir / "config.json").read_text())
    for f in ("tiktoken.model", "tokenizer_config.json"):
        assert (quantized_dir / f).read_bytes() == (bf16_dir / f).read_bytes()
    shards = sorted(p.name for p in quantized_dir.glob("*.safetensors"))
    assert len(shards) >= 3 and (quantized_dir / INDEX_FILE).is_file()

    tensors = read_all(quantized_dir)
    m = expert_module(1, 3, "down_proj")
    h, i = CONFIG.hidden_size, CONFIG.moe_intermediate_size
    assert tensors[m + ".weight_packed"].dtype == torch.int32 and tensors[m + ".weight_packed"].shape == (h, i // 8)
    assert tensors[m + ".weight_scale"].dtype == torch.bfloat16 and tensors[m + ".weight_scale"].shape == (h, i // 32)
    assert tensors[m + ".weight_shape"].tolist() == [h, i]
    assert m + ".weight" not in tensors
    plain = [n for n in tensors if n.endswith(".weight") and ".mlp.experts." in n]
    assert plain == []  # every routed expert packed ...
    for kept in ("lm_head.weight", "model.layers.1.self_attn.q_b_proj.weight", "model.layers.0.mlp.up_proj.weight",
                 "model.layers.2.mlp.shared_experts.down_proj.weight", "model.layers.3.mlp.gate.weight"):
        assert tensors[kept].dtype == torch.bfloat16  # ... nothing else


def test_progress_bar_counts_every_tensor(bf16_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert k2serve(["quantize", str(bf16_dir), str(tmp_path / "out")]) == 0
    n = len(read_weight_map(bf16_dir)[0])
    err = capsys.readouterr().err
    assert "quantize: 100%|" in err and f" {n}/{n} " in err


def test_compressed_tensors_decompresses_to_our_weights(bf16_dir: Path, quantized_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dequantized"
    convert_checkpoint(quantized_dir, out, CompressedTensorsDequantizer(quantized_dir, dtype=torch.bfloat16),
                       max_workers=1, device="cpu")
    theirs = read_all(out)
    source = read_all(bf16_dir)
    assert set(theirs) == set(source)
    ours = load_weights(quantized_dir, dtype=torch.float32)
    i = CONFIG.moe_intermediate_size
    for layer, shard in ours.experts.items():
        all_w13, all_w2 = shard.expert_weights(list(range(shard.num_local)))  # exact (float32) [E, 2I, H], [E, H, I]
        for e in range(shard.num_local):
            # compressed-tensors multiplies in the scale's dtype (bf16): our exact product rounded once to bf16
            # must be what it gets.
            w13, w2 = all_w13[e], all_w2[e]
            for proj, w in (("gate_proj", w13[:i]), ("up_proj", w13[i:]), ("down_proj", w2)):
                name = expert_module(layer, e, proj) + ".weight"
                assert torch.equal(theirs[name], w.to(torch.bfloat16)), name
                # Round to nearest: off by at most half a step; the absmax element of a group lands on 7.5 steps
                # and is clamped to 7, and the bf16-rounded scale adds a few thousandths of a step.
                step = shard_scale(shard, e, proj, i)
                err = (source[name].float() - w).abs().view(w.shape[0], -1, 32).amax(-1)
                assert bool((err <= 0.53 * step).all()), name
    untouched = [n for n in source if ".mlp.experts." not in n]
    assert all(torch.equal(theirs[n], source[n]) for n in untouched)


def shard_scale(shard: ExpertShard, e: int, proj: str, inter: int) -> torch.Tensor:
    assert shard.w13_scale is not None and shard.w2_scale is not None
    if proj == "down_proj":
        return shard.w2_scale[e].float()
    return shard.w13_scale[e, :inter].float() if proj == "gate_proj" else shard.w13_scale[e, inter:].float()


def test_tiny_builder_quantizes_like_the_cli(bf16_dir: Path, quantized_dir: Path, tmp_path: Path) -> None:
    built = write_random_checkpoint(tmp_path, CONFIG, seed=7, quantize=True)
    ours, cli = read_all(built), read_all(quantized_dir)
    assert set(ours) == set(cli)
    assert all(torch.equal(ours[n], cli[n]) for n in ours)


def test_refuses_quantized_source_and_non_empty_destination(quantized_dir: Path, bf16_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert k2serve(["quantize", str(quantized_dir), str(tmp_path / "again")]) == 1
    assert "already quantized" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert k2serve(["quantize", str(bf16_dir), str(busy)]) == 1
    err = capsys.readouterr().err
    assert str(busy) in err and "not an empty directory" in err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        quantize_checkpoint(tmp_path / "nowhere", tmp_path / "out")


def test_corrupted_source_shard_names_file_and_leaves_nothing(bf16_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(bf16_dir, src)
    weight_map, _ = read_weight_map(src)
    victim = src / sorted(set(weight_map.values()))[-1]
    victim.write_bytes(victim.read_bytes()[:-100])
    dst = tmp_path / "dst"
    with pytest.raises(ValueError, match=f"{victim}: corrupted safetensors file"):
        quantize_checkpoint(src, dst, progress=False)
    assert not dst.exists()
