"""K2's real attention dimensions on CPU: greedy tokens against transformers on the same INT4 weights, and the
rank's resident memory against its weight bytes + KV cache.

    python bench/real_dims.py [--layers 2] [--experts 4] [--prompt 300] [--new 8]

The checkpoint has K2 Thinking's per-layer attention (hidden 7168, 64 heads, q_lora 1536, kv_lora 512, nope 128,
rope 64, v 128, YaRN as K2) with few layers and experts, a 1024-token vocabulary and 2048-wide MLPs (the MoE's
width; the dense layer's 18432 would only add load time). Random bf16 weights, experts quantized to INT4 by
`k2serve quantize`; transformers runs the same experts dequantized. k2serve runs in a child process so that its
RSS is its own (resident = RSS over the interpreter's before loading: after building the engine, after
serving, and the peak, which includes the loader's transient bf16 -> fp32 conversions and the prefill); a
prompt long enough for the tiled attention (decompressed form) is prefilled in chunks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from k2serve.worker.engine.capacity import proc_status_kib

BLOCK = 16


def serve(model_dir: str, prompt: list[int], new: int, chunk: int) -> dict[str, object]:
    """k2serve's side, in this (child) process."""
    from k2serve.worker.engine.engine import Engine
    from k2serve.worker.engine.settings import EngineConfig
    from k2serve.worker.engine.sampling import SamplingParams
    from k2serve.worker.loader import load_weights
    from k2serve.worker.model.k2 import K2Model

    before = proc_status_kib("VmRSS")
    w = load_weights(model_dir)
    weight_bytes = sum(t.nbytes for t in w.dense.values()) + sum(s.nbytes() for s in w.experts.values())
    model = K2Model(w.config, w.dense, w.experts)
    blocks = -(-(len(prompt) + new) // BLOCK) + 1
    engine = Engine(model, EngineConfig(num_blocks=blocks, block_size=BLOCK, max_batch_tokens=chunk), eos_token_ids=[])
    built = proc_status_kib("VmRSS")
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=new))
    start, out = time.perf_counter(), []
    while engine.has_work():
        out += [e.token for e in engine.step()]
    return {"tokens": out, "weight_bytes": weight_bytes, "kv_bytes": engine.kv.data.nbytes,
            "rss_before_load_mib": before / 1024, "built_rise_mib": (built - before) / 1024,
            "served_rise_mib": (proc_status_kib("VmRSS") - before) / 1024,
            "peak_rise_mib": (proc_status_kib("VmHWM") - before) / 1024, "serve_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--serve", nargs=4, metavar=("DIR", "PROMPT_JSON", "NEW", "CHUNK"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve:
        print(json.dumps(serve(a.serve[0], json.loads(a.serve[1]), int(a.serve[2]), int(a.serve[3]))))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers.hf_reference import load_hf_fp32, random_hf_model, save_bf16, tiny_hf_config

    from k2serve.worker.loader import load_weights
    from k2serve.worker.quant.int4 import dequantize
    from k2serve.worker.quantize import quantize_checkpoint

    hf_config = tiny_hf_config(
        7, a.experts, vocab_size=1024, hidden_size=7168, intermediate_size=2048, moe_intermediate_size=2048,
        num_hidden_layers=a.layers, num_experts_per_tok=2, num_attention_heads=64, num_key_value_heads=64,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        max_position_embeddings=262144,
        rope_parameters=dict(rope_type="yarn", rope_theta=50000.0, factor=64.0, original_max_position_embeddings=4096,
                             mscale=1.0, mscale_all_dim=1.0, beta_fast=1.0, beta_slow=1.0))
    with tempfile.TemporaryDirectory() as tmp:
        save_bf16(random_hf_model(hf_config, 7), Path(tmp) / "bf16")
        quantize_checkpoint(Path(tmp) / "bf16", Path(tmp) / "int4")
        prompt = torch.randint(3, 1024, (a.prompt,), generator=torch.Generator().manual_seed(7)).tolist()
        cmd = [sys.executable, "-P", __file__, "--serve", str(Path(tmp) / "int4"), json.dumps(prompt), str(a.new),
               str(a.chunk)]
        ours = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        reference = load_hf_fp32(Path(tmp) / "bf16", hf_config)
        experts = load_weights(Path(tmp) / "int4").experts
        with torch.no_grad():
            for layer, shard in experts.items():
                mlp = reference.model.layers[layer].mlp.experts
                mlp.gate_up_proj.copy_(dequantize(shard.w13, shard.w13_scale))
                mlp.down_proj.copy_(dequantize(shard.w2, shard.w2_scale))
            hf = reference.generate(torch.tensor([prompt]), max_new_tokens=a.new, min_new_tokens=a.new,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)[0, a.prompt:].tolist()
    budget = 1.15 * ours["weight_bytes"] / 2**20 + ours["kv_bytes"] / 2**20
    print(json.dumps({**ours, "hf_tokens": hf, "equal": ours["tokens"] == hf, "budget_mib": budget}))
    return 0 if ours["tokens"] == hf else 1


if __name__ == "__main__":
    sys.exit(main())
