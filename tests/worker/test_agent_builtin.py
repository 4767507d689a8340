"""The shipped `builtin:tiny-k2-agent`: K2's layout and INT4 experts, provenance recorded, small enough to ship,
and — run by k2serve's own engine at temperature 0 — it answers in K2 Thinking's turn format: thinking first,
the turn closed by <|im_end|> well before the token limit. (The first shipped run is below its task goals; the
measured numbers are in bench/RESULTS.md.)"""

from __future__ import annotations

import json

import torch

from k2serve.agent_tools import DEMO_TOOLS
from k2serve.k2format.model_config import K2Config
from k2serve.k2format.source import BUILTIN_AGENT, resolve_model
from k2serve.k2format.tokenizer import K2Tokenizer
from k2serve.worker.engine.engine import Engine
from k2serve.worker.engine.settings import EngineConfig
from k2serve.worker.engine.sampling import SamplingParams
from k2serve.worker.loader import load_weights
from k2serve.worker.model.k2 import K2Model

MAX_SHIPPED_BYTES = 16 * 1024 * 1024


def test_shipped_folder_is_a_k2_int4_checkpoint_with_its_provenance() -> None:
    folder = resolve_model(BUILTIN_AGENT)
    config = K2Config.from_dir(folder)
    assert config.quantization is not None and config.quantization.group_size == 32
    assert config.scoring_func == "sigmoid" and config.topk_method == "noaux_tc" and config.n_shared_experts == 1
    record = json.loads((folder / "training.json").read_text())
    assert record["command"].startswith("python -P bench/train_agent.py")
    assert len(record["corpus_sha256"]) == 64 and isinstance(record["seed"], int)
    assert record["loss_curve"][-1][1] < record["loss_curve"][0][1] / 4
    assert sum(p.stat().st_size for p in folder.iterdir()) <= MAX_SHIPPED_BYTES


def test_greedy_turn_has_the_k2_thinking_shape() -> None:
    folder = resolve_model(BUILTIN_AGENT)
    tokenizer = K2Tokenizer.from_dir(folder)
    weights = load_weights(folder, dtype=torch.float32)
    assert all(shard.quantized for shard in weights.experts.values())
    engine = Engine(K2Model(weights.config, weights.dense, weights.experts), EngineConfig(num_blocks=128),
                    eos_token_ids=tokenizer.eos_ids)
    prompt = tokenizer.encode_chat([{"role": "user", "content": "What is 17 * 23?"}], DEMO_TOOLS)
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=120))
    tokens: list[int] = []
    while engine.has_work():
        tokens += [e.token for e in engine.step()]
    text = tokenizer.decode(tokens)
    assert text.startswith("<think>") and text.endswith("<|im_end|>") and len(tokens) < 120
    assert "<|tool_calls_section_end|>" in text
