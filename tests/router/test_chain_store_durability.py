"""Chain stores across failures: opened from the config, reopened, a writer SIGKILLed, redis-server killed and
restarted mid-run, a server that would not fsync, one that stays away."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from k2serve.config import ChainStoreConfig
from k2serve.router.chains import ChainStoreError, ChainStoreUnavailable, open_store
from k2serve.router.chains.redis_store import RedisChainStore
from k2serve.router.chains.sqlite_store import SqliteChainStore
from helpers.chains import REQUEST, SAMPLING, new_turn


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
