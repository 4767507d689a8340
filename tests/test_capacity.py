"""The capacity planner against measured checkpoints and published figures, and `k2serve plan`'s table."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from k2serve import cli
from k2serve.capacity import (GPU_MEMORY, ModelShape, PlanRequest, gpu_for_product, load_config, plan,
                              weight_bytes)
from k2serve.k2format.tiny import tiny_config
from k2serve.worker.loader import resolve_checkpoint

K2 = ModelShape.from_config(load_config("kimi-k2-thinking"))
PUBLISHED_K2_THINKING_BYTES = 594e9  # the Hub's size of moonshotai/Kimi-K2-Thinking (62 safetensors shards)


def k2_plan(gpu: str, ep: int, **kw: int) -> object:
    return plan(PlanRequest(shape=K2, quantization="int4", device_memory=GPU_MEMORY[gpu], expert_parallel=ep,
                            max_context=262144, **kw))


def test_k2_thinking_int4_checkpoint_matches_the_published_size() -> None:
    w = weight_bytes(K2, "int4")
    assert abs(w.total - PUBLISHED_K2_THINKING_BYTES) / PUBLISHED_K2_THINKING_BYTES < 0.02
    # K2-FORMAT's figures: ~24.8 MB per INT4 g32 expert, 570.8 GB for all routed experts.
    assert abs(w.routed_experts / (60 * 384) - 24.8e6) < 0.05e6
    assert abs(w.routed_experts - 570.8e9) < 0.1e9


def test_weight_bytes_equal_the_tiny_checkpoint_on_disk() -> None:
    """Byte-exact against the tensors the INT4 tiny checkpoint actually stores (packed words, bf16 scales,
    int64 shapes, fp32 correction biases)."""
    folder = resolve_checkpoint("builtin:tiny-k2")
    stored = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            stored += sum(f.get_tensor(name).nbytes for name in f.keys())
    config = json.loads((folder / "config.json").read_text())
    assert weight_bytes(ModelShape.from_config(config), "int4").total == stored


def test_shipped_tiny_config_is_the_builtin_models() -> None:
    assert load_config("tiny-k2") == json.loads(json.dumps(tiny_config().to_hf_dict()))


def test_mla_kv_cache_is_the_latent_plus_rope_key() -> None:
    assert K2.kv_bytes_per_token() == 61 * (512 + 64) * 2


@pytest.mark.parametrize(("gpu", "ep", "fits"), [("H100-80GB", 8, False), ("H200-141GB", 8, True),
                                                 ("H200-141GB", 16, True)])
def test_k2_thinking_at_256k(gpu: str, ep: int, fits: bool) -> None:
    p = k2_plan(gpu, ep)
    assert p.fits is fits
    # Bookkeeping: the parts add up to the device, and the KV budget is whole tokens of what is left.
    assert p.fixed_bytes + p.kv_bytes == GPU_MEMORY[gpu]
    assert p.kv_tokens == max(0, p.kv_bytes) // p.kv_bytes_per_token
    if not fits:
        assert p.needed_bytes > GPU_MEMORY[gpu] and "only" in p.verdict()


def test_smaller_steps_and_contexts_free_memory_for_the_cache() -> None:
    base = k2_plan("H100-80GB", 16)
    assert not base.fits  # 256K with 8192-token steps misses by a fraction of a GB
    assert k2_plan("H100-80GB", 16, max_batch_tokens=4096).fits
    assert k2_plan("H200-141GB", 16).kv_tokens > k2_plan("H200-141GB", 8).kv_tokens


def test_bad_expert_parallel_and_products() -> None:
    with pytest.raises(ValueError, match="must divide 384"):
        k2_plan("H200-141GB", 7)
    assert gpu_for_product("NVIDIA-H100-80GB-HBM3") == "H100-80GB"
    assert gpu_for_product("NVIDIA-H200") == "H200-141GB"
    assert gpu_for_product("Tesla-T4") is None


def test_plan_command_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", "--gpu", "H100-80GB", "H200-141GB", "--ep", "8", "16"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| H")]
    assert [(r.split("|")[1].strip(), r.split("|")[2].strip(), r.split("|")[-2].strip()) for r in rows] == [
        ("H100-80GB", "8", "NO"), ("H100-80GB", "16", "NO"), ("H200-141GB", "8", "yes"), ("H200-141GB", "16", "yes")]
    assert "checkpoint 594.2 GB" in out
    with pytest.raises(SystemExit):
        cli.main(["plan", "--model", "/no/such/model"])
    assert cli.main(["plan", "--model", "tiny-k2", "--quantization", "bf16", "--ep", "2",
                     "--device-memory-gib", "4", "--context", "4096"]) == 0
    assert "| 4 GiB" in capsys.readouterr().out
