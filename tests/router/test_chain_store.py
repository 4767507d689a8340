"""Contract tests of the chain store, run against both backends (a real SQLite file, a real redis-server),
plus durability (reopen, writer killed, redis-server killed mid-run) and the `k2serve chains` CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from k2serve.config import ChainStoreConfig
from k2serve.router.chains import (
    ChainCheckpointer,
    ChainNotFound,
    ChainStore,
    ChainStoreError,
    ChainStoreUnavailable,
    ConflictError,
    TokenGap,
    TokenMismatch,
    ToolCallNotFound,
    TurnClosed,
    TurnNotFound,
    open_store,
)
from k2serve.router.chains.cli import main as chains_cli
from k2serve.router.chains.redis_store import RedisChainStore
from k2serve.router.chains.sqlite_store import SqliteChainStore

REQUEST = {"model": "tiny-k2", "max_tokens": 64, "tools": [{"type": "function", "function": {"name": "search"}}]}
SAMPLING = {"temperature": 1.0, "top_p": 0.95, "seed": 1234}


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChainStore]:
    if request.param == "sqlite":
        s: ChainStore = SqliteChainStore(tmp_path / "chains.sqlite3")
    else:
        s = RedisChainStore(request.getfixturevalue("redis_server").url)
    yield s
    s.close()


def new_turn(store: ChainStore, prompt: list[int] | None = None) -> tuple[str, int]:
    chain = store.create_chain()
    return chain, store.begin_turn(chain, REQUEST, SAMPLING, prompt or [1, 2, 3])


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


def test_open_store_from_config(tmp_path: Path, redis_server: Any) -> None:
    with open_store(ChainStoreConfig(sqlite_path=str(tmp_path / "a" / "c.sqlite3"))) as s:
        assert isinstance(s, SqliteChainStore) and s.create_chain("x") == "x"
    with open_store(ChainStoreConfig(backend="redis", redis_url=redis_server.url)) as s:
        assert isinstance(s, RedisChainStore) and s.create_chain("x") == "x"


def test_sqlite_survives_reopen_and_a_killed_writer(tmp_path: Path) -> None:
    path = tmp_path / "chains.sqlite3"
    with SqliteChainStore(path) as s:
        chain, turn = new_turn(s)
        s.append_tokens(chain, turn, 0, [1, 2, 3])
        s.record_tool_calls(chain, turn, [{"id": "c", "name": "f", "arguments": "{}"}])
    with SqliteChainStore(path) as s:
        assert s.generated(chain, turn) == [1, 2, 3]
        assert s.get_chain(chain).tool_calls[0].id == "c"
    # A writer process SIGKILLed mid-run loses no acknowledged append (it prints each acknowledged length).
    writer = (
        "import sys\nfrom k2serve.router.chains.sqlite_store import SqliteChainStore\n"
        "s = SqliteChainStore(sys.argv[1])\n"
        "for i in range(3, 100000):\n"
        "    print(s.append_tokens(sys.argv[2], 0, i, [i + 1]), flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(path), chain], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acked = [int(proc.stdout.readline()) for _ in range(200)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with SqliteChainStore(path) as s:
        stored = s.generated(chain, turn)
    assert len(stored) >= acked[-1] and stored == list(range(1, len(stored) + 1))


def test_redis_restart_mid_run_loses_nothing(redis_server: Any) -> None:
    store = RedisChainStore(redis_server.url, prefix=uuid.uuid4().hex)
    chain, turn = new_turn(store)
    acked: list[int] = []
    slowest = [0.0]
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for start in range(0, 400, 4):
                t0 = time.monotonic()
                acked.append(store.append_tokens(chain, turn, start, list(range(start, start + 4))))
                slowest[0] = max(slowest[0], time.monotonic() - t0)
                time.sleep(0.002)
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    writer = threading.Thread(target=write)
    writer.start()
    while len(acked) < 30:
        time.sleep(0.005)
    redis_server.kill()  # SIGKILL: only what the AOF fsynced survives
    at_kill = acked[-1]
    time.sleep(0.5)  # the writer is now retrying its pending append
    redis_server.start()
    writer.join(timeout=20)
    assert not writer.is_alive() and not errors
    assert slowest[0] >= 0.5  # one append spanned the outage and then succeeded
    assert acked == list(range(4, 404, 4)) and at_kill >= 120
    assert store.generated(chain, turn) == list(range(400))
    assert store.get_chain(chain).turns[0].sampling == SAMPLING
    store.close()


def test_redis_store_refuses_a_server_without_fsync_always(redis_server: Any) -> None:
    admin = redis.Redis.from_url(redis_server.url)
    admin.config_set("appendfsync", "everysec")
    with pytest.raises(ChainStoreError, match="appendonly=yes appendfsync=everysec; durable chains need"):
        RedisChainStore(redis_server.url)
    RedisChainStore(redis_server.url, require_fsync_always=False).close()
    admin.close()


def test_redis_store_gives_up_after_the_retry_timeout(redis_server: Any) -> None:
    store = RedisChainStore(redis_server.url, retry_timeout_s=0.3)
    chain = store.create_chain()
    redis_server.kill()
    t0 = time.monotonic()
    with pytest.raises(ChainStoreUnavailable, match="unreachable for 0.3 s"):
        store.begin_turn(chain, REQUEST, SAMPLING, [1])
    assert time.monotonic() - t0 < 1.0
    store.close()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_cli_show_list_delete_purge(backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    request: pytest.FixtureRequest) -> None:  # fmt: skip
    if backend == "sqlite":
        where = ["--sqlite", str(tmp_path / "c.sqlite3")]
        store: ChainStore = SqliteChainStore(where[1])
    else:
        url = request.getfixturevalue("redis_server").url
        config = tmp_path / "serving.yaml"
        config.write_text(f"chain_store:\n  backend: redis\n  redis_url: {url}\n")
        where = ["--config", str(config)]
        store = RedisChainStore(url)
    chain = store.create_chain("agent-1")
    for t in range(3):
        store.begin_turn(chain, REQUEST, SAMPLING, [1, 2])
        store.append_tokens(chain, t, 0, [5] * (t + 1))
        store.record_tool_calls(chain, t, [{"id": f"call_{t}", "name": "search", "arguments": f'{{"q": {t}}}'}])
        store.finish_turn(chain, t, "finished", "tool_calls")
        if t < 2:
            store.record_tool_result(chain, f"call_{t}", f"found {t}")
    store.close()

    assert chains_cli(["show", "agent-1", *where]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("agent-1  finished   turns=3  tool_calls=3  updated ")
    # Each turn, then the calls it made with the results sent back: the provenance of the chain, in order.
    transcript = [line.split("  sampling=")[0] for line in lines[2:]]
    assert transcript == [
        "turn 0: finished (tool_calls)  prompt=2 generated=1 tokens",
        '    [0.0] call_0 search({"q": 0}) -> found 0',
        "turn 1: finished (tool_calls)  prompt=2 generated=2 tokens",
        '    [1.0] call_1 search({"q": 1}) -> found 1',
        "turn 2: finished (tool_calls)  prompt=2 generated=3 tokens",
        '    [2.0] call_2 search({"q": 2}) (no result yet)',
    ]
    assert ' sampling={"seed": 1234, "temperature": 1.0, "top_p": 0.95}  started '  in lines[2]
    assert chains_cli(["show", "agent-1", "--json", *where]) == 0
    assert '"generated": [\n' in capsys.readouterr().out
    assert chains_cli(["list", *where]) == 0
    assert capsys.readouterr().out.startswith("agent-1  finished   turns=3  tool_calls=3")
    assert chains_cli(["purge", *where]) == 0
    assert capsys.readouterr().out == "purged 0 chains untouched for 604800 s\n"
    assert chains_cli(["purge", "--ttl", "0", *where]) == 0
    assert capsys.readouterr().out == "purged 1 chains untouched for 0 s\n"
    assert chains_cli(["show", "agent-1", *where]) == 1
    assert "no chain 'agent-1'" in capsys.readouterr().err
    assert chains_cli(["delete", "agent-1", *where]) == 1


def test_cli_delete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "c.sqlite3")
    with SqliteChainStore(path) as s:
        s.create_chain("gone")
    assert chains_cli(["delete", "gone", "--sqlite", path]) == 0
    assert capsys.readouterr().out == "deleted gone\n"
    assert chains_cli(["list", "--sqlite", path]) == 0
    assert capsys.readouterr().out == ""
