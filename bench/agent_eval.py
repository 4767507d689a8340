"""Held-out tasks of every corpus family run through the agent loop on `builtin:tiny-k2-agent` and its bf16 and
post-training-quantized variants: per family, valid tool calls, correct calls and correct final answers; chain
following completed at several lengths (every link's argument must equal the previous tool result), with the
share of prompt tokens served from the prefix cache.

    nice -n 15 python -P bench/agent_eval.py [--tasks 10] [--links 1,10,100,300] [--chains 10] [--in-process]
        [--variant qat=k2serve/k2format/models/tiny-k2-agent --variant bf16=~/.cache/k2serve/agent-train/bf16 ...]
    python -P bench/agent_eval.py --url http://127.0.0.1:8000 --metrics-url http://127.0.0.1:PORT/metrics ...

By default each variant is served by the full stack — `k2serve up --model DIR` (Ray worker groups, prefill →
KV handoff → decode, the router, the OpenAI HTTP front) — and every turn streams over HTTP as `k2serve agent`
sends it (temperature 0); the prefix-cache share is read from the groups' Prometheus counters. `--in-process`
runs k2serve's engine in this process instead (faster; the same prompt, parser and greedy decoding); `--url`
evaluates whatever a running stack serves (`--metrics-url`: the merged group metrics `k2serve up` prints).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from k2serve.agent_loop import ModelTurn, run_agent
from k2serve.agent_tools import DemoTools
from k2serve.router.agent import http_completer
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

    def prefix_tokens(self) -> tuple[int, int]:
        """(prompt tokens looked up in the prefix cache, of those served from it), so far."""
        return self.engine.blocks.prefix_queries_tokens, self.engine.blocks.prefix_hit_tokens

    def close(self) -> None:
        return None


class StackCompleter:
    """Chat turns through a whole stack, each streamed over the OpenAI API by the same code as `k2serve agent`:
    a running one (its router URL and its groups' merged /metrics), or one `launch`ed here."""

    def __init__(self, url: str, metrics_url: str, proc: subprocess.Popen[bytes] | None = None,
                 state: tempfile.TemporaryDirectory[str] | None = None) -> None:
        self.metrics_url, self.proc, self.state = metrics_url, proc, state
        self.client = httpx.Client(base_url=url, timeout=600)
        model = self.client.get("/v1/models").json()["data"][0]["id"]
        self.devnull = open(os.devnull, "w")  # the streamed text: only the parsed turn counts here
        self.complete = http_completer(self.client, model, MAX_TURN_TOKENS, self.devnull)
        self.invalid_calls = 0

    @classmethod
    def launch(cls, model_dir: Path) -> "StackCompleter":
        """`k2serve up --model DIR` on free ports with its own state directory, until `close`."""
        state = tempfile.TemporaryDirectory(prefix="k2serve-agent-eval-")
        log_path = Path(state.name) / "up.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "k2serve.cli", "up", "--port", "0", "--model",
                                     str(model_dir)], stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "K2SERVE_STATE_DIR": state.name})
        url = _wait_for(proc, log_path, r"serving \S+ at (http://\S+)/v1")
        merged = _wait_for(proc, log_path, r"metrics, merged, at (http://\S+/metrics)")
        return cls(url, merged, proc, state)

    def __call__(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> ModelTurn:
        turn = self.complete(messages, tools)
        self.invalid_calls += turn.content.count(CALL_BEGIN)  # a call section the parser could not read
        return turn

    def prefix_tokens(self) -> tuple[int, int]:
        """From the groups' counters (what Prometheus scrapes): prompt tokens computed plus those served from the
        prefix cache, and the latter."""
        totals = {"k2serve_prefill_tokens": 0.0, "k2serve_prefix_cache_hit_tokens": 0.0}
        for family in text_string_to_metric_families(httpx.get(self.metrics_url, timeout=30).text):
            if family.name in totals:
                totals[family.name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
        hit = int(totals["k2serve_prefix_cache_hit_tokens"])
        return int(totals["k2serve_prefill_tokens"]) + hit, hit

    def close(self) -> None:
        self.client.close()
        self.devnull.close()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # as a user stops `k2serve up`
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.state is not None:
            self.state.cleanup()


def _wait_for(proc: subprocess.Popen[bytes], log: Path, pattern: str, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if m := re.search(pattern, log.read_text()):
            return m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"k2serve up exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"k2serve up printed no {pattern!r} in {timeout_s} s")


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


Completer = LocalCompleter | StackCompleter


def run_episode(completer: Completer, episode: Episode, tally: Tally) -> bool:
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


def evaluate(completer: Completer, name: str, where: str, tasks: int, links: list[int], chains: int,
             seed: int) -> None:
    try:
        _evaluate(completer, name, where, tasks, links, chains, seed)
    finally:
        completer.close()


def _evaluate(completer: Completer, name: str, where: str, tasks: int, links: list[int], chains: int,
              seed: int) -> None:
    rng = random.Random(seed)
    print(f"\n{name}: {where}\nfamily     | tasks | valid calls       | correct calls | correct answers")
    for family in FAMILIES:
        tally = Tally()
        start = time.monotonic()
        for _ in range(tasks):
            run_episode(completer, make_episode(family, rng, "eval"), tally)
        print(f"{family:10s} | {tally.row()}   ({time.monotonic() - start:.0f}s)", flush=True)
    for n in links:
        tally = Tally()
        queried0, hit0 = completer.prefix_tokens()
        done = sum(run_episode(completer, chain_episode(f"eval-{seed}-{n}-{i}", n), tally) for i in range(chains))
        queried, hit = (a - b for a, b in zip(completer.prefix_tokens(), (queried0, hit0)))
        print(f"chain {n:3d} links: {done}/{chains} completed with every argument right, valid calls "
              f"{tally.valid}/{tally.calls}, prompt tokens from the prefix cache {100 * hit / max(1, queried):.0f}%",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10, help="held-out tasks per family")
    ap.add_argument("--links", default="1,10,100,300")
    ap.add_argument("--chains", type=int, default=10, help="chains per length")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--in-process", action="store_true", help="the engine in this process, not `k2serve up`")
    ap.add_argument("--url", help="evaluate the model a running stack serves (its router's base URL) instead")
    ap.add_argument("--metrics-url", help="with --url: the groups' merged /metrics (for the prefix-cache share)")
    ap.add_argument("--variant", action="append", metavar="NAME=DIR",
                    help="default: qat (shipped), bf16 and ptq-int4 (from bench/train_agent.py's work folder)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    variants = args.variant or [f"qat={Path(__file__).resolve().parents[1] / 'k2serve/k2format/models/tiny-k2-agent'}",
                                f"bf16={DEFAULT_WORK / 'bf16'}", f"ptq={DEFAULT_WORK / 'ptq-int4'}"]
    links = [int(n) for n in args.links.split(",") if n]
    if args.url:
        if not args.metrics_url:
            ap.error("--url needs --metrics-url")
        evaluate(StackCompleter(args.url, args.metrics_url), "served", args.url, args.tasks, links, args.chains,
                 args.seed)
        return 0
    for spec in variants:
        name, _, folder = spec.partition("=")
        model_dir = Path(folder).expanduser()
        completer = LocalCompleter(model_dir) if args.in_process else StackCompleter.launch(model_dir)
        evaluate(completer, name, str(model_dir), args.tasks, links, args.chains, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
