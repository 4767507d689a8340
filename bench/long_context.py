"""Long-context prefill on CPU: peak memory, prefill time and decode time per token of one prompt, each size in a
fresh process (its peak RSS is its own).

    python bench/long_context.py scaling [--tokens 1024 4096 16384]     # built-in tiny-k2, one prefill chunk
    python bench/long_context.py demo [--tokens 200000] [--chunks 16384 4096] [--decode 16]

`scaling` prefills each prompt in a single chunk (the step whose attention used to build prompt × context scores)
and reports the rise of peak RSS over the loaded model. `demo` serves one long prompt with a K2-architecture tiny
config whose context is K2's (262144 positions, YaRN factor 64 over 4096) in each prefill chunk size, greedy, and
checks the generated tokens agree; it reports the MLA latent cache's bytes per token against what a multi-head
K/V cache of the same model would need.
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
from k2serve.worker.engine.engine import Engine
from k2serve.worker.engine.settings import EngineConfig
from k2serve.worker.engine.sampling import SamplingParams
from k2serve.worker.loader import load_weights, resolve_checkpoint
from k2serve.worker.model.batch import LatentKVCache
from k2serve.k2format.model_config import K2Config
from k2serve.worker.model.k2 import K2Model
from k2serve.worker.tiny import tiny_config, write_random_checkpoint

BLOCK = 16


def demo_config() -> K2Config:
    """tiny-k2 with K2's context: 262144 positions, YaRN as K2 (factor 64 over an original 4096); 2 layers (one
    dense, one MoE) and 2 heads so that 200K² attention fits a 2-core machine's patience."""
    return tiny_config(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, hidden_size=128,
                       q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                       max_position_embeddings=262144,
                       rope_scaling={"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
                                     "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 1.0, "beta_slow": 1.0})


def peak_rss_reset() -> None:
    """Resets this process's VmHWM (Linux: clear_refs 5), so the next reading is the peak from here on."""
    Path("/proc/self/clear_refs").write_text("5")


def one(model_dir: str, tokens: int, chunk: int, decode: int) -> dict[str, object]:
    """Serves one random prompt of `tokens` in prefill chunks of `chunk`, then `decode` greedy tokens."""
    w = load_weights(model_dir)
    model = K2Model(w.config, w.dense, w.experts)
    blocks = -(-(tokens + decode) // BLOCK) + 1
    engine = Engine(model, EngineConfig(num_blocks=blocks, block_size=BLOCK, max_batch_tokens=chunk,
                                        enable_prefix_caching=False), eos_token_ids=[])
    prompt = torch.randint(0, w.config.vocab_size - 2, (tokens,), generator=torch.Generator().manual_seed(0))
    engine.add_request("r", prompt.tolist(), SamplingParams(temperature=0.0, max_tokens=decode))
    loaded = proc_status_kib("VmRSS")
    peak_rss_reset()
    start, out, first = time.perf_counter(), [], 0.0
    while engine.has_work():
        out += [e.token for e in engine.step()]
        if len(out) == 1 and not first:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    c = w.config
    mha = c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * 4
    peak = proc_status_kib("VmHWM")
    return {"tokens": tokens, "chunk": chunk, "loaded_mib": loaded / 1024, "peak_mib": peak / 1024,
            "rise_mib": (peak - loaded) / 1024, "prefill_s": first,
            "decode_ms_per_token": 1000 * (total - first) / max(1, len(out) - 1), "output": out,
            "mla_bytes_per_token": LatentKVCache.bytes_per_token(c, torch.float32), "mha_bytes_per_token": mha,
            "threads": torch.get_num_threads()}


def child(model_dir: str, tokens: int, chunk: int, decode: int) -> dict[str, object]:
    cmd = [sys.executable, "-P", __file__, "one", model_dir, str(tokens), str(chunk), str(decode)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{cmd}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["scaling", "demo", "one"])
    ap.add_argument("args", nargs="*")
    ap.add_argument("--tokens", type=int, nargs="+")
    ap.add_argument("--chunks", type=int, nargs="+", default=[16384, 4096])
    ap.add_argument("--decode", type=int, default=16)
    a = ap.parse_args(argv)
    if a.mode == "one":
        print(json.dumps(one(a.args[0], int(a.args[1]), int(a.args[2]), int(a.args[3]))))
        return 0
    if a.mode == "scaling":
        model_dir = str(resolve_checkpoint("builtin:tiny-k2"))
        for n in a.tokens or [1024, 4096, 16384]:
            r = child(model_dir, n, n, 2)
            print(f"| {n} | {r['rise_mib']:.0f} | {r['prefill_s']:.1f} |", flush=True)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        write_random_checkpoint(tmp, demo_config(), quantize=True)
        outputs = []
        for chunk in a.chunks:
            r = child(tmp, (a.tokens or [200000])[0], chunk, a.decode)
            outputs.append(r.pop("output"))
            print(json.dumps(r), flush=True)
        same = all(o == outputs[0] for o in outputs)
        print(f"greedy tokens equal across chunk sizes: {same} ({outputs[0]})")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
