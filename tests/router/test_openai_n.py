"""`n` > 1 through the official `openai` client, streaming and not, on the tiny model in deterministic mode: the
choices share one prefill (the engine's prefill counter counts the prompt once), and choice i equals the same
request with n=1 and seed `seed + i`. Each choice is its own chain; n > 1 cannot continue a chain."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi import FastAPI

from k2serve.config import ChainStoreConfig, RouterConfig, ServingConfig
from k2serve.metrics import Metrics
from k2serve.router.core import RouterCore
from k2serve.router.http.app import create_app
from k2serve.router.http.uvicorn_runner import BackgroundServer
from k2serve.router.schedule import StaticDirectory
from k2serve.stack.inproc import LocalStack, start_local_stack
from k2serve.worker.engine.engine import Engine
from k2serve.worker.parallel.inproc_group import start_inprocess_groups

MESSAGES = [{"role": "user", "content": "Say something."}]
BASE: dict[str, Any] = {"model": "tiny-k2", "messages": MESSAGES, "temperature": 1.0, "max_tokens": 12, "seed": 10}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[openai.OpenAI, list[LocalStack]]]:
    tmp: Path = tmp_path_factory.mktemp("n")
    config = ServingConfig(deterministic=True, chain_store=ChainStoreConfig(sqlite_path=str(tmp / "c.sqlite3")),
                           router=RouterConfig(aggregated=True))
    stacks: list[LocalStack] = []

    async def build() -> tuple[FastAPI, Callable[[], Awaitable[None]]]:
        stack = await start_local_stack(config)
        stacks.append(stack)
        return create_app(stack.core, config, stack.core.metrics), stack.aclose

    with BackgroundServer(build) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300), stacks


def engine(stacks: list[LocalStack]) -> Engine:
    (group,) = stacks[0].groups
    return group.service.loop.engine  # type: ignore[return-value]


def alone(client: openai.OpenAI, seed: int, messages: list[dict[str, str]]) -> tuple[str, str, str]:
    """(reasoning, content, finish_reason) of the n=1 request with `seed`."""
    c = client.chat.completions.create(**{**BASE, "seed": seed, "messages": messages}).choices[0]
    return getattr(c.message, "reasoning_content", None) or "", c.message.content or "", c.finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_four_choices_prefill_once_and_equal_their_seed_alone(served: tuple[openai.OpenAI, list[LocalStack]],
                                                              stream: bool) -> None:
    client, stacks = served
    # A prompt whose first block no prefix cache holds yet: the counter then shows all of it, once.
    messages = [{"role": "system", "content": f"{stream}: be brief."}, {"role": "user", "content": "Say something."}]
    before = engine(stacks).stats.prefill_tokens
    got: dict[int, list[str]] = {}
    if not stream:
        resp = client.chat.completions.create(**{**BASE, "messages": messages}, n=4)
        prompt_tokens = resp.usage.prompt_tokens  # type: ignore[union-attr]
        for c in resp.choices:
            got[c.index] = [getattr(c.message, "reasoning_content", None) or "", c.message.content or "",
                            c.finish_reason]
        assert len({c.chain_id for c in resp.choices}) == 4  # type: ignore[attr-defined]
    else:
        prompt_tokens = 0
        for chunk in client.chat.completions.create(**{**BASE, "messages": messages}, n=4, stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.usage is not None:
                prompt_tokens = chunk.usage.prompt_tokens
            for c in chunk.choices:
                acc = got.setdefault(c.index, ["", "", ""])
                acc[0] += getattr(c.delta, "reasoning_content", None) or ""
                acc[1] += c.delta.content or ""
                acc[2] = c.finish_reason or acc[2]
    assert engine(stacks).stats.prefill_tokens - before == prompt_tokens > 0  # one prefill for four choices
    assert sorted(got) == [0, 1, 2, 3]
    assert len({tuple(v) for v in got.values()}) > 1  # the seeds differ, so do (some of) the choices
    for i in range(4):
        assert tuple(got[i]) == alone(client, 10 + i, messages), f"choice {i}"


def test_each_choice_resumes_after_its_group_dies(tmp_path: Path) -> None:
    """The group that runs the forked choices is killed mid-answer and restarts: every choice re-dispatches on its
    own, from its durable tokens with its seed, and still equals its seed alone (asked once the fault is spent)."""
    # The fault counts the group's tokens, all choices together: it fires mid-answer.
    config = ServingConfig(deterministic=True, chain_store=ChainStoreConfig(sqlite_path=str(tmp_path / "c.sqlite3")),
                           router=RouterConfig(aggregated=True),
                           faults=[{"kind": "kill_group", "pool": "prefill", "after_tokens": 10}])
    metrics = Metrics()

    async def build() -> tuple[FastAPI, Callable[[], Awaitable[None]]]:
        groups = await start_inprocess_groups(config, metrics, restart_after_s=0.3)
        core = RouterCore(config, StaticDirectory([g.group_address for g in groups]), metrics)
        await core.start()
        return create_app(core, config, metrics), LocalStack(core, groups).aclose

    with BackgroundServer(build) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
        kw = {**BASE, "max_tokens": 16, "seed": 20}
        resp = client.chat.completions.create(**kw, n=3)
        assert (metrics.registry.get_sample_value("k2serve_migrations_total") or 0) >= 1
        for c in resp.choices:
            one = client.chat.completions.create(**{**kw, "seed": 20 + c.index}).choices[0]
            assert (c.message.content, c.finish_reason) == (one.message.content, one.finish_reason), c.index
            assert getattr(c.message, "reasoning_content", None) == getattr(one.message, "reasoning_content", None)


def test_pd_choices_prefill_once_on_a_decode_group(tmp_path: Path) -> None:
    """P/D: the forked start goes to a decode group, which computes the prompt once for every choice; the prefill
    group is not asked."""
    config = ServingConfig(deterministic=True, chain_store=ChainStoreConfig(sqlite_path=str(tmp_path / "c.sqlite3")),
                           router=RouterConfig(aggregated=False))
    stacks: list[LocalStack] = []

    async def build() -> tuple[FastAPI, Callable[[], Awaitable[None]]]:
        stacks.append(await start_local_stack(config))
        return create_app(stacks[0].core, config, stacks[0].core.metrics), stacks[0].aclose

    with BackgroundServer(build) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
        resp = client.chat.completions.create(**BASE, n=3)
        engines = {g.service.role: g.service.loop.engine for g in stacks[0].groups}
        assert engines["prefill"].stats.prefill_tokens == 0
        assert engines["decode"].stats.prefill_tokens == resp.usage.prompt_tokens  # type: ignore[union-attr]
        for c in resp.choices:
            one = client.chat.completions.create(**{**BASE, "seed": 10 + c.index}).choices[0]
            assert (c.message.content, c.finish_reason) == (one.message.content, one.finish_reason), c.index


def test_n_bounds(served: tuple[openai.OpenAI, list[LocalStack]]) -> None:
    client, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**BASE, n=9)
    assert "router.limits.max_n" in str(e.value)
    first = client.chat.completions.with_raw_response.create(**BASE)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**BASE, n=2, extra_body={"chain_id": first.headers["x-k2-chain-id"]})
    assert "cannot continue a chain" in str(e.value)


def test_completions_n(served: tuple[openai.OpenAI, list[LocalStack]]) -> None:
    client, _ = served
    kw: dict[str, Any] = {"model": "tiny-k2", "prompt": "abc", "max_tokens": 6, "temperature": 1.0, "seed": 3}
    both = client.completions.create(**kw, n=2)
    assert [c.index for c in both.choices] == [0, 1]
    for i, c in enumerate(both.choices):
        assert c.text == client.completions.create(**{**kw, "seed": 3 + i}).choices[0].text
