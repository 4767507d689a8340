"""The synthetic agentic corpus of `builtin:tiny-k2-agent`: tasks over the demo tools (k2serve.agent_tools),
rendered with the project's own chat template, so that training and serving see the same bytes.

Families: calculator (the answer copies the result), weather lookup of made-up cities, two-step (convert, then
compute), chain-following (`next(id)` until `END <value>`, 1 to 300 links, the context windowed as the agent loop
windows it), no-tool answers, a first call that fails and is retried with the arguments the error suggests, and
several calls in one section. Every value is drawn for a split: a value's hash decides whether it is a training or
a held-out value, so evaluation never sees a training value. Thinking precedes every call, as in K2 Thinking.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from k2serve.agent_tools import CONVERSIONS, DEMO_TOOLS, Chain, DemoTools, windowed
from k2serve.k2format.tokenizer import K2Tokenizer

Split = Literal["train", "eval"]
FAMILIES = ("calculator", "weather", "two_step", "chain", "no_tool", "retry", "parallel")
MAX_CHAIN_LINKS = 300
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "ba", "de", "fu", "gor", "hal", "ix", "jan", "pel",
              "quo", "sen", "tur", "vel", "wen", "yor", "zan", "bri", "dra", "kel", "mor", "nix", "ost", "pra"]
_WORDS = ["amber", "bison", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "jasper", "kelp",
          "lagoon", "maple", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "violet",
          "walnut", "yarrow", "zephyr", "basalt", "cinder", "dune", "falcon", "glacier"]
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARG_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def split_of(value: str) -> Split:
    """One value in ten is held out for evaluation, decided by its hash."""
    return "eval" if hashlib.sha256(value.encode()).digest()[0] % 10 == 0 else "train"


def _draw(rng: random.Random, split: Split, make: Any) -> Any:
    while True:
        value = make()
        if split_of(json.dumps(value)) == split:
            return value


def _city(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()[:12]


@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict[str, str]

    @property
    def json(self) -> str:
        return json.dumps(self.arguments, separators=(",", ":"))


@dataclass
class Episode:
    """One task and the calls and answer the model should produce; tool results come from the demo tools."""
    family: str
    task: str
    rounds: list[tuple[str, list[Call]]]  # (thinking, calls of one assistant turn)
    answer_thinking: str
    answer: str
    key: str  # what a correct final answer must contain
    chain: Chain | None = None
    results: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        tools = DemoTools(self.chain)
        self.results = [[tools.call(c.name, c.json) for c in calls] for _, calls in self.rounds]


def _calculator(rng: random.Random, split: Split) -> Episode:
    a, op, b = _draw(rng, split, lambda: [rng.randint(2, 999), rng.choice("+-*"), rng.randint(2, 99)])
    expr = f"{a} {op} {b}"
    result = DemoTools().call("calculator", json.dumps({"expression": expr}))
    return Episode("calculator", f"What is {expr}?", [("Use the calculator.", [Call("calculator", {"expression": expr})])],
                   "The tool gave the result.", f"{expr} = {result}.", result)


def _weather(rng: random.Random, split: Split) -> Episode:
    city = _draw(rng, split, lambda: _city(rng))
    result = DemoTools().call("weather", json.dumps({"city": city}))
    return Episode("weather", f"What is the weather in {city}?",
                   [(f"Look up {city}.", [Call("weather", {"city": city})])], "Report it.", f"{result}.", result)


def _two_step(rng: random.Random, split: Split) -> Episode:
    amount, unit, add = _draw(rng, split, lambda: [rng.randint(1, 500), rng.choice(sorted(CONVERSIONS)),
                                                   rng.randint(1, 99)])
    to = CONVERSIONS[unit][0]
    converted = DemoTools().call("convert", json.dumps({"value": f"{amount} {unit}", "to": to}))
    expr = f"{converted} + {add}"
    result = DemoTools().call("calculator", json.dumps({"expression": expr}))
    return Episode("two_step", f"Convert {amount} {unit} to {to}, then add {add}.", [
        (f"Convert {amount} {unit} first.", [Call("convert", {"value": f"{amount} {unit}", "to": to})]),
        (f"Now add {add}.", [Call("calculator", {"expression": expr})]),
    ], "Done.", f"The result is {result}.", result)


def chain_episode(seed: str, links: int) -> Episode:
    chain = Chain(seed, links)
    ids = chain.ids()
    rounds = [("Follow the link.", [Call("next", {"id": ids[i]})]) for i in range(links)]
    return Episode("chain", f"Follow the chain from {chain.start} to its end.", rounds, "The chain ended.",
                   f"The end value is {chain.end_value}.", chain.end_value, chain)


def _chain(rng: random.Random, split: Split) -> Episode:
    links = rng.randint(1, MAX_CHAIN_LINKS) if rng.random() < 0.6 else rng.randint(1, 8)
    seed = _draw(rng, split, lambda: f"{rng.getrandbits(48):012x}")
    return chain_episode(seed, links)


def _no_tool(rng: random.Random, split: Split) -> Episode:
    word = _draw(rng, split, lambda: rng.choice(_WORDS) + rng.choice(_WORDS)[:3])
    return Episode("no_tool", f"Repeat the word {word}.", [], "No tool is needed.", f"{word}", word)


def _retry(rng: random.Random, split: Split) -> Episode:
    city = _draw(rng, split, lambda: _city(rng))
    result = DemoTools().call("weather", json.dumps({"city": city}))
    return Episode("retry", f"What is the weather in {city.lower()}?", [
        (f"Look up {city.lower()}.", [Call("weather", {"city": city.lower()})]),
        (f"Retry with {city}.", [Call("weather", {"city": city})]),
    ], "Report it.", f"{result}.", result)


def _parallel(rng: random.Random, split: Split) -> Episode:
    first, second = _draw(rng, split, lambda: [_city(rng), _city(rng)])
    tools = DemoTools()
    r1, r2 = (tools.call("weather", json.dumps({"city": c})) for c in (first, second))
    return Episode("parallel", f"What is the weather in {first} and {second}?", [
        ("Look up both.", [Call("weather", {"city": first}), Call("weather", {"city": second})]),
    ], "Report both.", f"{r1}. {r2}.", r2)


_MAKERS = {"calculator": _calculator, "weather": _weather, "two_step": _two_step, "chain": _chain,
           "no_tool": _no_tool, "retry": _retry, "parallel": _parallel}


def make_episode(family: str, rng: random.Random, split: Split) -> Episode:
    return _MAKERS[family](rng, split)


def assistant_message(thinking: str, calls: list[Call], first_index: int) -> dict[str, Any]:
    """K2's call ids count the conversation's calls: functions.NAME:IDX."""
    tool_calls = [{"id": f"functions.{c.name}:{first_index + i}", "type": "function",
                   "function": {"name": c.name, "arguments": c.json}} for i, c in enumerate(calls)]
    return {"role": "assistant", "content": "", "reasoning_content": thinking, "tool_calls": tool_calls}


def generation_text(message: dict[str, Any]) -> str:
    """What the model generates for an assistant turn after the prompt's `<|im_assistant|>assistant<|im_middle|>`
    (the template renders a current-loop turn the same way; corpus tests check it)."""
    text = f"<think>{message.get('reasoning_content', '')}</think>{message.get('content') or ''}"
    if message.get("tool_calls"):
        text += SECTION_BEGIN + "".join(f"{CALL_BEGIN}{c['id']}{ARG_BEGIN}{c['function']['arguments']}{CALL_END}"
                                        for c in message["tool_calls"]) + SECTION_END
    return text + "<|im_end|>"


def round_messages(episode: Episode, index: int, first_call: int) -> list[dict[str, Any]]:
    thinking, calls = episode.rounds[index]
    message = assistant_message(thinking, calls, first_call)
    results = [{"role": "tool", "tool_call_id": c["id"], "content": r}
               for c, r in zip(message["tool_calls"], episode.results[index], strict=True)]
    return [message, *results]


@dataclass(frozen=True)
class Sample:
    ids: list[int]
    labels: list[bool]  # True where the token is one the model generates (assistant output)


def episode_samples(tokenizer: K2Tokenizer, episode: Episode, ends: list[int]) -> list[Sample]:
    """One sample per turn in `ends` (round index; len(rounds) = the final answer): the prompt the agent loop
    sends for that turn, windowed, followed by the turn's generation. Earlier turns in the window that were
    generated from a prefix of this prompt (added since the last cut) are labelled too."""
    user = {"role": "user", "content": episode.task}
    samples = []
    window: list[tuple[int, list[dict[str, Any]]]] = []  # (round index, messages)
    fresh_from = 0  # window entries from here on were appended since the last cut
    calls = 0
    wanted = set(ends)
    for index in range(len(episode.rounds) + 1):
        if index in wanted:
            samples.append(_sample(tokenizer, episode, user, window[fresh_from:], window, index, calls))
        if index == len(episode.rounds):
            break
        window.append((index, round_messages(episode, index, calls)))
        calls += len(episode.rounds[index][1])
        kept = windowed([m for _, m in window])
        if len(kept) < len(window):
            window, fresh_from = window[-len(kept):], len(kept)
    return samples


def _sample(tokenizer: K2Tokenizer, episode: Episode, user: dict[str, Any],
            fresh: list[tuple[int, list[dict[str, Any]]]], window: list[tuple[int, list[dict[str, Any]]]],
            index: int, calls: int) -> Sample:
    history = [user] + [m for _, msgs in window for m in msgs]
    if index < len(episode.rounds):
        final = assistant_message(episode.rounds[index][0], episode.rounds[index][1], calls)
    else:
        final = {"role": "assistant", "content": episode.answer, "reasoning_content": episode.answer_thinking}
    ids = tokenizer.encode_chat(history, DEMO_TOOLS)
    labels = [False] * len(ids)
    fresh_rounds = {i for i, _ in fresh}
    for pos, (i, msgs) in enumerate(window):
        if i not in fresh_rounds:
            continue
        before = [user] + [m for _, ms in window[:pos] for m in ms]
        start = len(tokenizer.encode_chat(before, DEMO_TOOLS))
        gen = tokenizer.encode(generation_text(msgs[0]))
        if ids[start:start + len(gen)] != gen:
            raise AssertionError(f"{episode.family}: a windowed turn is not rendered as it was generated")
        labels[start:start + len(gen)] = [True] * len(gen)
    gen = tokenizer.encode(generation_text(final))
    return Sample(ids + gen, labels + [True] * len(gen))


def build_corpus(tokenizer: K2Tokenizer, seed: int, episodes_per_family: dict[str, int]) -> list[Sample]:
    """Training samples: every turn of short episodes; for chains, a few turns at random points (a 300-link
    chain's turns all look alike once windowed)."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    for family, count in episodes_per_family.items():
        for _ in range(count):
            episode = make_episode(family, rng, "train")
            turns = len(episode.rounds) + 1
            ends = sorted(rng.sample(range(turns), min(turns, 2))) if family == "chain" else list(range(turns))
            samples += episode_samples(tokenizer, episode, ends)
    rng.shuffle(samples)
    return samples


def corpus_hash(samples: list[Sample]) -> str:
    digest = hashlib.sha256()
    for s in samples:
        digest.update(json.dumps([s.ids, s.labels]).encode())
    return digest.hexdigest()
