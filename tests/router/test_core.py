"""RouterCore over in-process gRPC groups: re-dispatch after a group dies mid-stream, resume of a turn a
dead router left running, prefix-affine routing of a chain's next turn, cancel, and bad requests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from k2serve.config import ServingConfig
from k2serve.router.chains import ChainNotFound, open_store
from k2serve.router.live import ChainToken
from k2serve.stack.inproc import LocalStack, start_local_stack
from k2serve.groups import GroupAddress
from k2serve.router.schedule import GroupState, NoGroupAvailable, Scheduler
from k2serve.k2format.block_hash import block_hashes
from k2serve.worker.engine.sampling import SamplingParams

T = TypeVar("T")
PROMPT = [(11 * i + 5) % 500 for i in range(37)]


def serving(tmp_path: Path, **overrides: Any) -> ServingConfig:
    data: dict[str, Any] = {"chain_store": {"sqlite_path": str(tmp_path / "chains.sqlite3")}, "deterministic": True}
    data.update(overrides)
    return ServingConfig.model_validate(data)


def with_stack(cfg: ServingConfig, body: Callable[[LocalStack], Awaitable[T]]) -> T:
    async def go() -> T:
        stack = await start_local_stack(cfg)
        try:
            return await asyncio.wait_for(body(stack), 120)
        finally:
            await stack.aclose()

    return asyncio.run(go())


async def collect(stream: Any) -> list[ChainToken]:
    return [t async for t in stream]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_group_killed_mid_stream_is_redispatched_with_identical_output(tmp_path: Path, temperature: float) -> None:
    params = SamplingParams(temperature=temperature, seed=1234, max_tokens=48, ignore_eos=True)
    cfg = serving(tmp_path, decode={"groups": 2})

    async def body(stack: LocalStack) -> tuple[list[ChainToken], list[ChainToken], float, list[int]]:
        reference = await collect(stack.core.generate(PROMPT, params))
        got: list[ChainToken] = []
        async for tok in stack.core.generate(PROMPT, params):
            got.append(tok)
            if len(got) == 5:
                serving_group = next(g for g in stack.groups if g.service.loop.engine.running)
                assert serving_group.service.role == "decode"
                await serving_group.stop()
        migrations = stack.core.metrics.registry.get_sample_value("k2serve_migrations_total")
        chain = await stack.core.get_chain(got[0].chain_id)
        return reference, got, migrations, chain.turns[0].generated

    reference, got, migrations, stored = with_stack(cfg, body)
    assert migrations == 1
    assert [t.index for t in got] == list(range(48))
    assert [t.token for t in got] == [t.token for t in reference]
    assert stored == [t.token for t in reference]
    assert got[-1].finish_reason == "length"


def test_resume_continues_a_turn_left_running_by_a_dead_router(tmp_path: Path) -> None:
    params = SamplingParams(temperature=1.0, seed=99, max_tokens=40, ignore_eos=True)
    cfg = serving(tmp_path, router={"aggregated": True})

    async def body(stack: LocalStack) -> tuple[list[int], list[ChainToken], str]:
        reference = [t.token for t in await collect(stack.core.generate(PROMPT, params))]
        # What a router that died after its second checkpoint leaves in the store.
        store = stack.core.store
        chain_id = store.create_chain()
        turn = store.begin_turn(chain_id, {}, {**params.model_dump(mode="json"), "deterministic": True}, PROMPT)
        store.append_tokens(chain_id, turn, 0, reference[:32])
        resumed = await collect(stack.core.resume(chain_id, 20))
        return reference, resumed, (await stack.core.get_chain(chain_id)).turns[0].status

    reference, resumed, status = with_stack(cfg, body)
    assert [t.index for t in resumed] == list(range(20, 40))
    assert [t.token for t in resumed] == reference[20:]
    assert status == "finished"


@pytest.mark.parametrize("ends_by", ["length", "stop"])
def test_a_running_turn_whose_durable_tokens_complete_it_is_ended_not_generated_on(tmp_path: Path,
                                                                                    ends_by: str) -> None:
    """A router that died after its turn's last token was durable but before it ended the turn: the router
    taking over ends it with that token's finish reason instead of generating one past the end."""
    cfg = serving(tmp_path, router={"aggregated": True})

    async def body(stack: LocalStack) -> tuple[list[int], list[ChainToken], Any, float]:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=ends_by == "length")
        stored = [t.token for t in await collect(stack.core.generate(PROMPT, params.model_copy(
            update={"ignore_eos": True})))]
        if ends_by == "stop":
            stored = stored[:3] + [stack.core.tokenizer.eos_ids[0]]
        store = stack.core.store
        chain_id = store.create_chain()
        turn = store.begin_turn(chain_id, {}, {**params.model_dump(mode="json"), "deterministic": True}, PROMPT)
        store.append_tokens(chain_id, turn, 0, stored)
        before = sum(g.service.loop.engine.stats.decode_tokens for g in stack.groups)
        resumed = await collect(stack.core.resume(chain_id, 1))
        after = sum(g.service.loop.engine.stats.decode_tokens for g in stack.groups)
        return stored, resumed, (await stack.core.get_chain(chain_id)).turns[0], after - before

    stored, resumed, turn, decoded = with_stack(cfg, body)
    assert [t.index for t in resumed] == list(range(1, len(stored)))
    assert [t.token for t in resumed] == stored[1:]
    assert resumed[-1].finish_reason == ends_by
    assert (turn.status, turn.finish_reason, turn.generated) == ("finished", ends_by, stored)
    assert decoded == 0


def test_closing_router_leaves_the_turn_running_with_its_tokens_durable(tmp_path: Path) -> None:
    """A router shutting down mid-turn checkpoints what it generated and leaves the turn for another router."""
    cfg = serving(tmp_path, router={"aggregated": True}, chain_store={
        "sqlite_path": str(tmp_path / "chains.sqlite3"), "checkpoint_every": 1000})  # nothing flushed before
    params = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)

    async def body(stack: LocalStack) -> tuple[list[int], str, list[int]]:
        stream = stack.core.generate(PROMPT, params)
        got: list[ChainToken] = []
        async for tok in stream:
            got.append(tok)
            if len(got) == 7:
                break
        await stream.aclose()  # a reader leaving does not end the turn
        await stack.core.aclose()
        chain_id = got[0].chain_id
        store = open_store(cfg.chain_store)  # as the router that takes over reads it
        try:
            return [t.token for t in got], store.get_chain(chain_id).turns[0].status, store.generated(chain_id, 0)
        finally:
            store.close()

    seen, status, durable = with_stack(cfg, body)
    assert status == "running"
    assert len(durable) >= len(seen) and durable[:len(seen)] == seen


def test_next_turn_goes_to_the_group_holding_the_prefix(tmp_path: Path) -> None:
    cfg = serving(tmp_path, prefill={"groups": 2, "block_size": 8}, decode={"block_size": 8})
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    async def body(stack: LocalStack) -> tuple[list[int], int]:
        first = await collect(stack.core.generate(PROMPT, params))
        chain_id = first[0].chain_id
        follow_up = PROMPT + [t.token for t in first] + [1, 2, 3, 4]
        for _ in range(3):  # other traffic makes the first group the busier one
            await collect(stack.core.generate([9, 8, 7, 6, 5], params))
        await collect(stack.core.generate(follow_up, params, chain_id=chain_id))
        prefill = [g for g in stack.groups if g.service.role == "prefill"]
        hits = [g.service.loop.engine.blocks.prefix_hit_tokens for g in prefill]
        return hits, len((await stack.core.get_chain(chain_id)).turns)

    hits, turns = with_stack(cfg, body)
    assert turns == 2
    assert max(hits) == len(PROMPT) // 8 * 8 and min(hits) == 0  # turn 1's prompt blocks hit where it was prefilled


def test_cancel_ends_the_stream_and_marks_the_turn(tmp_path: Path) -> None:
    cfg = serving(tmp_path, router={"aggregated": True})
    params = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)

    async def body(stack: LocalStack) -> tuple[int, str, bool]:
        got = 0
        chain_id = ""
        async for tok in stack.core.generate(PROMPT, params):
            got += 1
            chain_id = tok.chain_id
            if got == 3:
                assert await stack.core.cancel(chain_id)
        chain = await stack.core.get_chain(chain_id)
        return got, chain.turns[0].status, await stack.core.cancel(chain_id)

    got, status, again = with_stack(cfg, body)
    assert 3 <= got < 2000
    assert status == "cancelled" and not again


def test_next_turn_waits_out_the_lease_of_a_router_that_died_after_its_turn(tmp_path: Path) -> None:
    """A router SIGKILLed right after finishing a turn leaves its chain lease unreleased; the client's next
    turn (on another router) must wait for it to lapse, not fail. A lease somebody keeps renewing still refuses."""
    cfg = serving(tmp_path, router={"aggregated": True},
                  chain_store={"sqlite_path": str(tmp_path / "chains.sqlite3"), "lease_ttl_s": 0.6})

    async def body(stack: LocalStack) -> tuple[float, str]:
        core, store = stack.core, stack.core.store
        chain_id = (await collect(core.generate([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=3))))[0].chain_id
        assert await asyncio.to_thread(store.claim, chain_id, "dead-router", 0.6)  # never renewed, never released
        start = asyncio.get_running_loop().time()
        await collect(core.generate([5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=3), chain_id=chain_id))
        waited = asyncio.get_running_loop().time() - start

        async def renew() -> None:
            while True:
                await asyncio.to_thread(store.claim, chain_id, "live-router", 0.6)
                await asyncio.sleep(0.1)

        holder = asyncio.create_task(renew())
        await asyncio.sleep(0.3)
        try:
            with pytest.raises(ValueError, match="another router") as refused:
                await collect(core.generate([5], SamplingParams(max_tokens=1), chain_id=chain_id))
        finally:
            holder.cancel()
        return waited, str(refused.value)

    waited, _ = with_stack(cfg, body)
    assert 0.3 < waited < 3.0


def test_bad_requests_raise_before_any_token(tmp_path: Path) -> None:
    cfg = serving(tmp_path, model={"max_context": 256}, router={"aggregated": True})

    async def first(stack: LocalStack, prompt: list[int], **kw: Any) -> ChainToken:
        return await stack.core.generate(prompt, SamplingParams(max_tokens=16), **kw).__anext__()

    async def body(stack: LocalStack) -> None:
        with pytest.raises(ValueError, match="context limit of 256"):
            await first(stack, [1] * 250)
        with pytest.raises(ValueError, match="empty"):
            await first(stack, [])
        with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\)"):
            await first(stack, [1, 512])
        with pytest.raises(ChainNotFound):
            await first(stack, [1, 2], chain_id="no-such-chain")
        assert stack.core.ready() and stack.core.max_context == 256

    with_stack(cfg, body)


def test_scheduler_weighs_prefix_against_load_and_skips_unhealthy_groups() -> None:
    a = GroupState(GroupAddress("a", "prefill", "127.0.0.1:1"))
    b = GroupState(GroupAddress("b", "prefill", "127.0.0.1:2"))
    d = GroupState(GroupAddress("d", "decode", "127.0.0.1:3"))
    scheduler = Scheduler("prefix_load", block_size=4)
    tokens = list(range(20))
    b.remember(block_hashes(tokens, 4))
    assert scheduler.pick([a, b, d], "prefill", tokens + [99]) is b
    b.inflight = 10  # a cached prefix is not worth a long queue
    assert scheduler.pick([a, b, d], "prefill", tokens) is a
    a.healthy = False
    assert scheduler.pick([a, b, d], "prefill", tokens) is b
    assert scheduler.pick([a, b, d], "decode") is d
    d.healthy = False
    with pytest.raises(NoGroupAvailable, match="no healthy decode"):
        scheduler.pick([a, b, d], "decode")


def test_a_chain_is_free_again_when_its_turn_s_stream_ends(tmp_path: Path) -> None:
    """A turn ends in the store and releases the chain's lease before its last token goes out: the client's
    next turn right away, or another router at once, finds the chain free."""
    cfg = serving(tmp_path, router={"aggregated": True})

    async def body(stack: LocalStack) -> tuple[list[str], bool]:
        core, store = stack.core, stack.core.store
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        chain_id = (await collect(core.generate([5, 6, 7], params)))[0].chain_id
        await collect(core.generate([5, 6, 7, 8], params, chain_id=chain_id))
        claimed = await asyncio.to_thread(store.claim, chain_id, "another-router", 5.0)
        return [t.status for t in (await core.get_chain(chain_id)).turns], claimed

    assert with_stack(cfg, body) == (["finished", "finished"], True)
