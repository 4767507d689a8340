"""Contract tests of the chain store, run against both backends (a real SQLite file, a real redis-server).
Durability across failures is in test_chain_store_durability.py, the `k2serve chains` CLI in test_chains_cli.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from k2serve.router.chains import (
    ChainCheckpointer,
    ChainNotFound,
    ChainStore,
    ConflictError,
    TokenGap,
    TokenMismatch,
    ToolCallNotFound,
    TurnClosed,
    TurnNotFound,
)
from k2serve.router.chains.redis_store import RedisChainStore
from k2serve.router.chains.sqlite_store import SqliteChainStore
from helpers.chains import REQUEST, SAMPLING, new_turn


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChainStore]:
    if request.param == "sqlite":
        s: ChainStore = SqliteChainStore(tmp_path / "chains.sqlite3")
    else:
        s = RedisChainStore(request.getfixturevalue("redis_server").url)
    yield s
    s.close()


def test_create_and_begin_round_trip(store: ChainStore) -> None:
    chain = store.create_chain()
    assert len(chain) == 32 and store.create_chain("conv-7") == "conv-7"
    assert store.create_chain("conv-7") == "conv-7"  # idempotent: a resent create changes nothing
    assert store.get_chain("conv-7").status == "idle"
    assert store.begin_turn(chain, REQUEST, SAMPLING, [5, 163839, 0]) == 0
    got = store.get_chain(chain)
    assert (got.status, got.n_turns, got.owner) == ("running", 1, None)
    turn = got.turns[0]
    assert (turn.request, turn.sampling, turn.prompt_tokens, turn.generated) == (REQUEST, SAMPLING, [5, 163839, 0], [])
    assert turn.status == "running" and turn.finish_reason is None and turn.created_at >= got.created_at
    with pytest.raises(ConflictError, match="turn 0 is still running"):
        store.begin_turn(chain, REQUEST, SAMPLING, [1])
    store.finish_turn(chain, 0, "finished", "stop")
    assert store.begin_turn(chain, {}, {"seed": 2}, [9]) == 1
    with pytest.raises(ChainNotFound, match="no chain 'nope'"):
        store.begin_turn("nope", REQUEST, SAMPLING, [1])
    with pytest.raises(ValueError, match="chain_id"):
        store.create_chain("bad\nid")
    with pytest.raises(ValueError, match="sampling must be JSON-serializable"):
        store.begin_turn(chain, REQUEST, {"seed": object()}, [1])


def test_append_is_idempotent_by_position(store: ChainStore) -> None:
    chain, turn = new_turn(store)
    assert store.append_tokens(chain, turn, 0, [10, 11, 12, 13]) == 4
    assert store.append_tokens(chain, turn, 0, [10, 11, 12, 13]) == 4  # resent batch: no-op
    assert store.append_tokens(chain, turn, 2, [12]) == 4  # inside what is stored: no-op
    assert store.append_tokens(chain, turn, 2, [12, 13, 14, 15]) == 6  # overlap, then new tokens
    assert store.append_tokens(chain, turn, 6, []) == 6
    assert store.generated(chain, turn) == [10, 11, 12, 13, 14, 15]
    with pytest.raises(TokenGap, match="position 7 would leave a gap \\(only 6 tokens stored\\)") as gap:
        store.append_tokens(chain, turn, 7, [17])
    assert (gap.value.stored, gap.value.start) == (6, 7)
    with pytest.raises(TokenMismatch, match="position 4 is stored as 14, the append gives 99") as bad:
        store.append_tokens(chain, turn, 3, [13, 99, 15, 16])
    assert (bad.value.position, bad.value.stored_token, bad.value.given_token) == (4, 14, 99)
    assert store.generated(chain, turn) == [10, 11, 12, 13, 14, 15]  # a refused append writes nothing
    with pytest.raises(TurnNotFound, match="has no turn 1"):
        store.append_tokens(chain, 1, 0, [1])
    with pytest.raises(ValueError, match="token ids must be in"):
        store.append_tokens(chain, turn, 6, [-1])
    with pytest.raises(ValueError, match="start must be >= 0"):
        store.append_tokens(chain, turn, -1, [1])
    store.finish_turn(chain, turn, "finished", "length")
    assert store.append_tokens(chain, turn, 4, [14, 15]) == 6  # a late resend of stored tokens still passes
    with pytest.raises(TurnClosed, match="is finished; cannot append"):
        store.append_tokens(chain, turn, 6, [16])


def test_many_batches_read_back_in_order(store: ChainStore) -> None:
    chain, turn = new_turn(store)
    expected = [(i * 7919) % 163840 for i in range(1000)]
    for start in range(0, 1000, 16):
        store.append_tokens(chain, turn, start, expected[start : start + 16])
    assert store.generated(chain, turn) == expected
    assert store.append_tokens(chain, turn, 500, expected[500:]) == 1000
    with pytest.raises(TokenMismatch, match="position 999"):
        store.append_tokens(chain, turn, 990, expected[990:999] + [expected[999] + 1])
    assert store.get_chain(chain).turns[0].generated == expected


def test_finish_turn(store: ChainStore) -> None:
    chain, turn = new_turn(store)
    store.finish_turn(chain, turn, "failed", None)
    store.finish_turn(chain, turn, "failed", None)  # same outcome: no-op
    with pytest.raises(TurnClosed, match="already ended failed"):
        store.finish_turn(chain, turn, "finished", "stop")
    with pytest.raises(TurnClosed):
        store.finish_turn(chain, turn, "failed", "stop")
    with pytest.raises(ValueError, match="status must be one of"):
        store.finish_turn(chain, turn, "running", None)  # type: ignore[arg-type]
    got = store.get_chain(chain)
    assert (got.status, got.turns[0].status, got.turns[0].finish_reason) == ("failed", "failed", None)
    store.begin_turn(chain, REQUEST, SAMPLING, [4])
    store.finish_turn(chain, 1, "cancelled", "client_disconnect")
    assert store.get_chain(chain).status == "cancelled"


def test_tool_call_transcript_keeps_order(store: ChainStore) -> None:
    """A K2 agent chain: 320 turns, each ending in tool calls whose results come back before the next turn."""
    chain = store.create_chain()
    expected = []
    for t in range(320):
        assert store.begin_turn(chain, REQUEST, SAMPLING, [t]) == t
        store.append_tokens(chain, t, 0, [t, t + 1])
        calls = [
            {"id": f"call_{t}_{i}", "name": "search", "arguments": f'{{"q": "step {t}.{i}"}}'} for i in range(1 + t % 2)
        ]
        store.record_tool_calls(chain, t, calls)
        store.finish_turn(chain, t, "finished", "tool_calls")
        for i, c in enumerate(calls):
            store.record_tool_result(chain, c["id"], f"result {t}.{i}")
            expected.append((t, i, c["id"], c["arguments"], f"result {t}.{i}"))
    got = store.get_chain(chain)
    assert got.n_tool_calls == len(expected) == 480 and got.n_turns == 320
    assert [(c.turn, c.index, c.id, c.arguments, c.result) for c in got.tool_calls] == expected
    assert all(c.result_at is not None for c in got.tool_calls)

    store.record_tool_calls(chain, 319, [{"id": "call_319_1", "name": "search", "arguments": '{"q": "step 319.1"}'}])
    store.record_tool_result(chain, "call_319_1", "result 319.1")  # both resent: no-ops
    with pytest.raises(ConflictError, match="call_319_1.*already recorded as turn 319"):
        store.record_tool_calls(chain, 319, [{"id": "new", "name": "x", "arguments": "{}"},
                                             {"id": "call_319_1", "name": "search", "arguments": "{}"}])  # fmt: skip
    with pytest.raises(ConflictError, match="already has another result"):
        store.record_tool_result(chain, "call_319_1", "other")
    with pytest.raises(ToolCallNotFound, match="no tool call 'new'"):  # the refused batch wrote nothing
        store.record_tool_result(chain, "new", "r")
    with pytest.raises(ValueError, match="duplicate tool call ids"):
        store.record_tool_calls(chain, 0, [{"id": "a", "name": "x", "arguments": ""}] * 2)
    with pytest.raises(TurnNotFound):
        store.record_tool_calls(chain, 320, [{"id": "z", "name": "x", "arguments": ""}])
    assert store.get_chain(chain).n_tool_calls == 480


def test_lease(store: ChainStore) -> None:
    chain = store.create_chain()
    assert store.claim(chain, "router-a", 10)
    assert not store.claim(chain, "router-b", 10)
    assert store.claim(chain, "router-a", 0.3)  # renewal
    assert store.get_chain(chain).owner == "router-a"
    assert [c.owner for c in store.list_chains()] == ["router-a"]
    store.release(chain, "router-b")  # not the holder: nothing happens
    assert not store.claim(chain, "router-b", 10)
    time.sleep(0.35)
    assert store.get_chain(chain).owner is None
    assert store.claim(chain, "router-b", 10)  # the expired lease is free
    store.release(chain, "router-b")
    assert store.claim(chain, "router-a", 10)
    with pytest.raises(ChainNotFound):
        store.claim("nope", "router-a", 10)
    with pytest.raises(ValueError, match="ttl_s > 0"):
        store.claim(chain, "router-a", 0)


def test_writes_in_a_batch_are_all_durable_when_it_ends(store: ChainStore) -> None:
    with store.batch():
        chain, turn = new_turn(store)
        assert store.claim(chain, "router-a", 10)
        store.append_tokens(chain, turn, 0, [4, 5])
        assert store.get_chain(chain).turns[0].generated == [4, 5]  # reads inside see the batch's writes
    reopened = store.get_chain(chain)
    assert (reopened.owner, reopened.turns[0].generated, reopened.turns[0].status) == ("router-a", [4, 5], "running")
    with store.batch():
        store.finish_turn(chain, turn, "finished", "stop")
        store.release(chain, "router-a")
    assert (store.get_chain(chain).owner, store.get_chain(chain).status) == (None, "finished")


def test_sqlite_batch_is_one_transaction(tmp_path: Path) -> None:
    store = SqliteChainStore(tmp_path / "chains.sqlite3")
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    with store.batch():
        chain, turn = new_turn(store)
        store.claim(chain, "router-a", 10)
    assert sum(s == "COMMIT" for s in statements) == 1 and statements[0] == "BEGIN IMMEDIATE"
    statements.clear()
    store.append_tokens(chain, turn, 0, [1])  # outside a batch: a transaction of its own
    assert statements.count("COMMIT") == 1
    # An error out of the block rolls back every write in it.
    with pytest.raises(TurnClosed), store.batch():
        store.finish_turn(chain, turn, "finished", "stop")
        store.release(chain, "router-a")
        store.append_tokens(chain, turn, 1, [2])
    after = store.get_chain(chain)
    assert (after.turns[0].status, after.turns[0].generated, after.owner) == ("running", [1], "router-a")
    # Another thread's writes wait for the batch and are not part of it.
    with store.batch():
        other = threading.Thread(target=store.release, args=(chain, "router-a"))
        other.start()
        other.join(0.2)
        assert other.is_alive()  # blocked on the batch's lock
        store.append_tokens(chain, turn, 1, [3])
    other.join()
    after = store.get_chain(chain)
    assert (after.turns[0].generated, after.owner) == ([1, 3], None)
    store.close()


def test_delete_list_and_ttl_purge(store: ChainStore) -> None:
    old, _ = new_turn(store)
    store.finish_turn(old, 0, "finished", "stop")
    leased = store.create_chain()
    store.claim(leased, "router-a", 60)
    time.sleep(0.01)
    fresh, _ = new_turn(store)
    assert [c.chain_id for c in store.list_chains()] == [fresh, leased, old]
    assert [c.chain_id for c in store.list_chains(limit=1)] == [fresh]
    with pytest.raises(ValueError, match="limit must be >= 1"):
        store.list_chains(limit=0)
    assert store.purge_expired(3600) == 0
    # An hour on: every chain is older than the TTL, but the leased one is held by a live router.
    assert store.purge_expired(3600, now=time.time() + 7200) == 2
    assert [c.chain_id for c in store.list_chains()] == [leased]
    with pytest.raises(ChainNotFound):
        store.get_chain(old)
    with pytest.raises(ChainNotFound):
        store.generated(fresh, 0)
    assert store.delete_chain(leased) and not store.delete_chain(leased)
    assert store.list_chains() == []
    recreated = store.create_chain(old)  # nothing of the old chain survives under its id
    assert store.begin_turn(recreated, REQUEST, SAMPLING, [1]) == 0
    assert store.generated(recreated, 0) == [] and store.get_chain(recreated).n_tool_calls == 0


def test_checkpointer_flushes_in_batches_and_at_boundaries(store: ChainStore) -> None:
    chain, turn = new_turn(store)
    cp = ChainCheckpointer(store, chain, turn, every=16)
    cp.add(list(range(10)))
    cp.add(list(range(10, 15)))
    assert store.generated(chain, turn) == [] and cp.position == 15
    cp.add([15, 16])
    assert store.generated(chain, turn) == list(range(17)) and cp.durable == 17
    cp.add([17, 18])
    cp.tool_calls([{"id": "c0", "name": "search", "arguments": "{}"}])  # the tokens before a call land first
    assert store.generated(chain, turn) == list(range(19))
    cp.add([19])
    cp.finish("finished", "tool_calls")
    assert store.get_chain(chain).turns[0].generated == list(range(20))

    # A router restart: a new checkpointer continues at the durable position, and the tokens the old router
    # had only buffered are regenerated from there.
    store.begin_turn(chain, REQUEST, SAMPLING, [7])
    first = ChainCheckpointer(store, chain, 1, every=4)
    first.add([1, 2, 3, 4])
    first.add([5, 6])  # buffered: lost with the router
    again = ChainCheckpointer.resume(store, chain, 1, every=4)
    assert again.durable == again.position == 4
    again.add([5, 6, 7, 8])
    assert store.generated(chain, 1) == [1, 2, 3, 4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="every must be >= 1"):
        ChainCheckpointer(store, chain, 1, every=0)
