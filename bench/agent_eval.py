"""Held-out tasks of every corpus family run through the agent loop on `builtin:tiny-k2-agent` and its bf16 and
post-training-quantized variants: per family, valid tool calls, correct calls and correct final answers; chain
following completed at several lengths (every link's argument must equal the previous tool result).

    nice -n 15 python -P bench/agent_eval.py [--tasks 10] [--links 1,10,100,300] [--chains 10]
        [--variant qat=k2serve/k2format/models/tiny-k2-agent --variant bf16=~/.cache/k2serve/agent-train/bf16 ...]

The model runs in-process (k2serve's engine, temperature 0, prefix cache on); its text is parsed by the
router's K2 parser with the request's tools, as the HTTP front does.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from k2serve.agent_loop import ModelTurn, run_agent
from k2serve.agent_tools import DemoTools
from k2serve.router.http.k2_parse import CALL_BEGIN, parse_k2_output
from k2serve.worker.agent_model.corpus import FAMILIES, Episode, chain_episode, make_episode
from k2serve.worker.engine.engine import Engine
from k2serve.worker.engine.settings import EngineConfig
from k2serve.worker.engine.sampling import SamplingParams
from k2serve.worker.loader import load_weights
from k2serve.worker.model.k2 import K2Model
from k2serve.k2format.tokenizer import K2Tokenizer

DEFAULT_WORK = Path.home() / ".cache/k2serve/agent-train"
MAX_TURN_TOKENS = 160


class LocalCompleter:
    """Chat turns generated in-process: the prompt as the HTTP front builds it, greedy decoding, K2 parsing."""

    def __init__(self, model_dir: Path) -> None:
        weights = load_weights(model_dir, dtype=torch.float32)
        self.tokenizer = K2Tokenizer.from_dir(model_dir)
        model = K2Model(weights.config, weights.dense, weights.experts)
        self.engine = Engine(model, EngineConfig(num_blocks=512, block_size=16), eos_token_ids=self.tokenizer.eos_ids)
        self.requests = 0
        self.invalid_calls = 0  # call markers the parser could not turn into a call

    def __call__(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> ModelTurn:
        prompt = self.tokenizer.encode_chat(messages, tools)
        self.requests += 1
        self.engine.add_request(str(self.requests), prompt, SamplingParams(temperature=0.0, max_tokens=MAX_TURN_TOKENS))
        tokens: list[int] = []
        while self.engine.has_work():
            tokens += [e.token for e in self.engine.step()]
        text = self.tokenizer.decode([t for t in tokens if t not in self.tokenizer.eos_ids])
        parsed = parse_k2_output(text, tools)
        content = parsed.content or ""
        self.invalid_calls += content.count(CALL_BEGIN)
        calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in parsed.tool_calls]
        return ModelTurn(parsed.reasoning_content or "", content, calls)


def _valid(name: str, arguments: str) -> bool:
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError:
        return False
    return name in ("calculator", "weather", "convert", "next") and isinstance(args, dict)


@dataclass
class Tally:
    tasks: int = 0
    calls: int = 0
    valid: int = 0
    correct_calls: int = 0
    answers: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> str:
        pct = lambda n, d: f"{100 * n / d:.0f}%" if d else "-"  # noqa: E731
        return (f"{self.tasks:5d} | {pct(self.valid, self.calls):>6} ({self.calls} calls) | "
                f"{pct(self.correct_calls, self.tasks):>6} | {pct(self.answers, self.tasks):>6}")


def run_episode(completer: LocalCompleter, episode: Episode, tally: Tally) -> bool:
    """Runs one task; True when its calls and its answer are both right."""
    before = completer.invalid_calls
    expected = [(c.name, c.arguments) for _, calls in episode.rounds for c in calls]
    run = run_agent(episode.task, completer, DemoTools(episode.chain), max_turns=len(episode.rounds) + 3)
    made = [(c.name, json.loads(c.arguments) if _valid(c.name, c.arguments) else None) for c in run.calls]
    tally.tasks += 1
    tally.calls += len(run.calls) + completer.invalid_calls - before
    tally.valid += sum(1 for c in run.calls if _valid(c.name, c.arguments))
    calls_ok = made == expected
    answer_ok = run.answer is not None and episode.key in run.answer
    tally.correct_calls += calls_ok
    tally.answers += answer_ok
    return calls_ok and answer_ok


def evaluate(name: str, model_dir: Path, tasks: int, links: list[int], chains: int, seed: int) -> None:
    completer = LocalCompleter(model_dir)
    rng = random.Random(seed)
    print(f"\n{name}: {model_dir}\nfamily     | tasks | valid calls       | correct calls | correct answers")
    for family in FAMILIES:
        tally = Tally()
        start = time.monotonic()
        for _ in range(tasks):
            run_episode(completer, make_episode(family, rng, "eval"), tally)
        print(f"{family:10s} | {tally.row()}   ({time.monotonic() - start:.0f}s)", flush=True)
    blocks = completer.engine.blocks
    for n in links:
        tally = Tally()
        queried, hit = blocks.prefix_queries_tokens, blocks.prefix_hit_tokens
        done = sum(run_episode(completer, chain_episode(f"eval-{seed}-{n}-{i}", n), tally) for i in range(chains))
        queried, hit = blocks.prefix_queries_tokens - queried, blocks.prefix_hit_tokens - hit
        # the same counters feed k2serve_prefix_cache_hit_tokens_total when served
        print(f"chain {n:3d} links: {done}/{chains} completed with every argument right, valid calls "
              f"{tally.valid}/{tally.calls}, prompt tokens from the prefix cache {100 * hit / max(1, queried):.0f}%",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10, help="held-out tasks per family")
    ap.add_argument("--links", default="1,10,100,300")
    ap.add_argument("--chains", type=int, default=10, help="chains per length")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--variant", action="append", metavar="NAME=DIR",
                    help="default: qat (shipped), bf16 and ptq-int4 (from bench/train_agent.py's work folder)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    variants = args.variant or [f"qat={Path(__file__).resolve().parents[1] / 'k2serve/k2format/models/tiny-k2-agent'}",
                                f"bf16={DEFAULT_WORK / 'bf16'}", f"ptq={DEFAULT_WORK / 'ptq-int4'}"]
    links = [int(n) for n in args.links.split(",") if n]
    for spec in variants:
        name, _, folder = spec.partition("=")
        evaluate(name, Path(folder).expanduser(), args.tasks, links, args.chains, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
