"""The agent corpus: rendered with the project's template, labels exactly on what the model generates, held-out
values never in training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from k2serve.agent_tools import DEMO_TOOLS, DemoTools
from k2serve.worker.agent_model.corpus import (
    FAMILIES, assistant_message, build_corpus, chain_episode, episode_samples, generation_text, make_episode,
    split_of,
)
from k2serve.k2format.tokenizer import K2Tokenizer, write_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> K2Tokenizer:
    folder: Path = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(folder)
    return K2Tokenizer.from_dir(folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_episodes_are_consistent_with_the_tools(family: str) -> None:
    rng = random.Random(3)
    for split in ("train", "eval"):
        episode = make_episode(family, rng, split)
        results = [r for rs in episode.results for r in rs]
        assert all(not r.startswith("error") for r in results) or family == "retry"
        if family == "retry":
            assert results[0].startswith("error: unknown city") and not results[1].startswith("error")
        assert episode.key in episode.answer
        if results:
            assert episode.key in results[-1] or results[-1].endswith(episode.key)


def test_generation_text_is_how_the_template_renders_a_current_turn(tokenizer: K2Tokenizer) -> None:
    message = assistant_message("Think.", make_episode("parallel", random.Random(0), "train").rounds[0][1], 4)
    user = {"role": "user", "content": "q"}
    prompt = tokenizer.apply_chat_template([user], DEMO_TOOLS)
    full = tokenizer.apply_chat_template([user, message], DEMO_TOOLS, add_generation_prompt=False)
    assert full == prompt + generation_text(message)


def test_samples_label_only_generated_tokens(tokenizer: K2Tokenizer) -> None:
    episode = chain_episode("t", 9)
    samples = episode_samples(tokenizer, episode, list(range(10)))
    for sample in samples:
        labelled = tokenizer.decode([t for t, lab in zip(sample.ids, sample.labels, strict=True) if lab])
        assert "<|im_assistant|>" not in labelled and "## Return of" not in labelled
        assert labelled.startswith("<think>") and labelled.endswith("<|im_end|>")
    # the last sample answers with the end value; calls in its window carry the previous results
    text = tokenizer.decode(samples[-1].ids)
    assert text.endswith(f"The end value is {episode.chain.end_value}.<|im_end|>")
    assert "functions.next:8" in text and "functions.next:0<" not in text  # windowed: early rounds dropped


def test_held_out_values_never_train(tokenizer: K2Tokenizer) -> None:
    rng = random.Random(5)
    for family in ("calculator", "weather", "no_tool"):
        for _ in range(20):
            episode = make_episode(family, rng, "eval")
            assert episode.task not in {make_episode(family, random.Random(i), "train").task for i in range(5)}
    assert split_of("x") in ("train", "eval")
    samples = build_corpus(tokenizer, 0, {f: 2 for f in FAMILIES})
    assert samples == build_corpus(tokenizer, 0, {f: 2 for f in FAMILIES})  # reproducible from the seed
    assert all(len(s.ids) == len(s.labels) and any(s.labels) for s in samples)


def test_episode_results_come_from_the_demo_tools() -> None:
    episode = make_episode("two_step", random.Random(2), "train")
    tools = DemoTools()
    for (_, calls), results in zip(episode.rounds, episode.results, strict=True):
        assert [tools.call(c.name, json.dumps(c.arguments)) for c in calls] == results
