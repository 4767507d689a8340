"""Redis chain store, for several router replicas sharing chains.

Durability comes from the server: run it with `appendonly yes` and `appendfsync always`, so a write is fsynced
before Redis replies; the store checks this when it opens (see `require_fsync_always`). When the server restarts
the client keeps resending the pending write until it is back (up to `retry_timeout_s`), which is safe because
every write is idempotent (see `store.py`): nothing acknowledged is lost, and nothing is applied twice.
Single-primary Redis only: the scripts address a chain's per-turn keys by name (not cluster-safe).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from k2serve.router.chains import redis_scripts as lua
from k2serve.router.chains.models import Chain, ChainSummary, ToolCall, ToolCallRecord, Turn, TurnStatus
from k2serve.router.chains.store import (
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
)
from k2serve.router.chains.tokens import pack, unpack

log = logging.getLogger(__name__)
T = TypeVar("T")


class RedisChainStore(ChainStore):
    io_threads = 4  # the client pools connections: calls on different chains overlap their network round trips

    def __init__(
        self,
        url: str,
        prefix: str = "k2serve:chains",
        retry_timeout_s: float = 30.0,
        require_fsync_always: bool = True,
    ) -> None:
        self.url, self.prefix, self.retry_timeout_s = url, prefix, retry_timeout_s
        # The client's own retry is off: `_retry` below bounds retries by time, not by count.
        self._r = redis.Redis.from_url(url, retry=Retry(ExponentialWithJitterBackoff(), 0), socket_timeout=10.0)
        self._backoff = ExponentialWithJitterBackoff(base=0.02, cap=0.5)
        self._scripts = {
            name: self._r.register_script(getattr(lua, name))
            for name in (
                "CREATE",
                "BEGIN_TURN",
                "APPEND_TOKENS",
                "FINISH_TURN",
                "RECORD_TOOL_CALLS",
                "RECORD_TOOL_RESULT",
                "DELETE",
                "CLAIM",
                "RELEASE",
            )
        }
        self._check_durability(require_fsync_always)

    def _check_durability(self, required: bool) -> None:
        try:
            conf = self._retry(lambda: self._r.config_get("append*"))
        except redis.ResponseError as e:  # managed services often disable CONFIG
            log.warning("cannot verify the AOF settings of %s (%s); chains need appendfsync always", self.url, e)
            return
        conf = {_s(k): _s(v) for k, v in conf.items()}
        durable = conf.get("appendonly") == "yes" and conf.get("appendfsync") == "always"
        if not durable:
            msg = (
                f"redis at {self.url} runs with appendonly={conf.get('appendonly')} "
                f"appendfsync={conf.get('appendfsync')}; durable chains need appendonly yes and appendfsync always"
            )
            if required:
                raise ChainStoreError(msg)
            log.warning(msg)

    def _retry(self, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.retry_timeout_s
        failures = 0
        while True:
            try:
                return fn()
            except (redis.ConnectionError, redis.TimeoutError) as e:  # BusyLoadingError (AOF replay) included
                failures += 1
                delay = self._backoff.compute(failures)
                if time.monotonic() + delay > deadline:
                    raise ChainStoreUnavailable(
                        f"redis at {self.url} unreachable for {self.retry_timeout_s} s: {e}"
                    ) from e
                time.sleep(delay)

    def _key(self, chain_id: str, suffix: str = "") -> str:
        return f"{self.prefix}:{{{chain_id}}}{suffix}"

    @property
    def _index(self) -> str:
        return f"{self.prefix}:index"

    def _run(self, script: str, chain_id: str, keys: list[str], args: list[Any], now: float) -> list[Any]:
        """Runs a prelude script (chain hash, index, chain id, now first) and raises the store's errors for
        the replies every such script shares."""
        reply = self._retry(
            lambda: self._scripts[script](keys=[self._key(chain_id), self._index, *keys], args=[chain_id, now, *args])
        )
        status = _s(reply[0])
        if status == "nochain":
            raise ChainNotFound(f"no chain {chain_id!r}")
        if status == "noturn":
            raise TurnNotFound(f"chain {chain_id!r} has no turn {args[0]} (it has {reply[1]})")
        return [status, *reply[1:]]

    def _create_chain(self, chain_id: str, tenant: str, now: float) -> None:
        self._run("CREATE", chain_id, [], [tenant], now)

    def _begin_turn(self, chain_id: str, request: str, sampling: str, prompt: list[int], now: float) -> int:
        # The call id makes a resent script return the turn it already created instead of adding another.
        status, turn = self._run("BEGIN_TURN", chain_id, [], [request, sampling, pack(prompt), uuid.uuid4().hex], now)
        if status == "running":
            raise ConflictError(f"chain {chain_id!r}: turn {turn} is still running; finish it before a new turn")
        return int(turn)

    def _append_tokens(self, chain_id: str, turn: int, start: int, tokens: list[int], now: float) -> int:
        key = self._key(chain_id, f":g{turn}")
        reply = self._run("APPEND_TOKENS", chain_id, [key], [turn, start, pack(tokens)], now)
        status = reply[0]
        if status == "gap":
            raise TokenGap(chain_id, turn, int(reply[1]), start)
        if status == "mismatch":
            position = int(reply[1])
            raise TokenMismatch(chain_id, turn, position, unpack(reply[2])[0], tokens[position - start])
        if status == "closed":
            raise TurnClosed(f"chain {chain_id!r} turn {turn} is {_s(reply[1])}; cannot append tokens")
        return int(reply[1])

    def _finish_turn(self, chain_id: str, turn: int, status: TurnStatus, finish_reason: str | None, now: float) -> None:
        args = [turn, status, finish_reason or "", "0" if finish_reason is None else "1"]
        reply = self._run("FINISH_TURN", chain_id, [], args, now)
        if reply[0] == "closed":
            old_status, old_reason = _s(reply[1]), _s(reply[2]) if _s(reply[3]) == "1" else None
            if (old_status, old_reason) != (status, finish_reason):
                raise TurnClosed(f"chain {chain_id!r} turn {turn} already ended {old_status} ({old_reason})")

    def _record_tool_calls(self, chain_id: str, turn: int, calls: list[ToolCall], now: float) -> None:
        args: list[Any] = [turn]
        for call in calls:
            args += [call.id, json.dumps([turn, call.name, call.arguments])]
        keys = [self._key(chain_id, ":tc"), self._key(chain_id, ":to")]
        reply = self._run("RECORD_TOOL_CALLS", chain_id, keys, args, now)
        if reply[0] == "conflict":
            old_turn, name, arguments = json.loads(reply[2])
            raise ConflictError(
                f"chain {chain_id!r}: tool call {_s(reply[1])!r} is already recorded as turn {old_turn} "
                f"{name}({arguments})"
            )

    def _record_tool_result(self, chain_id: str, tool_call_id: str, result: str, now: float) -> None:
        keys = [self._key(chain_id, ":tc"), self._key(chain_id, ":tr")]
        reply = self._run("RECORD_TOOL_RESULT", chain_id, keys, [tool_call_id, result], now)
        if reply[0] == "nocall":
            raise ToolCallNotFound(f"chain {chain_id!r} has no tool call {tool_call_id!r}")
        if reply[0] == "conflict":
            raise ConflictError(f"chain {chain_id!r}: tool call {tool_call_id!r} already has another result")

    def _claim(self, chain_id: str, owner: str, ttl_s: float) -> bool:
        keys = [self._key(chain_id), self._key(chain_id, ":lease")]
        got = self._retry(lambda: self._scripts["CLAIM"](keys=keys, args=[owner, max(1, round(ttl_s * 1000))]))
        if got == -1:
            raise ChainNotFound(f"no chain {chain_id!r}")
        return bool(got)

    def release(self, chain_id: str, owner: str) -> None:
        self._retry(lambda: self._scripts["RELEASE"](keys=[self._key(chain_id, ":lease")], args=[owner]))

    def _delete(self, chain_id: str, cutoff: float | None) -> bool:
        keys = [self._key(chain_id, s) for s in (":tc", ":to", ":tr", ":lease")]
        args = [self._key(chain_id, ":g"), "" if cutoff is None else repr(cutoff)]
        return bool(self._run("DELETE", chain_id, keys, args, time.time())[1])

    def delete_chain(self, chain_id: str) -> bool:
        return self._delete(chain_id, None)

    def _purge_expired(self, cutoff: float) -> int:
        candidates = self._retry(lambda: self._r.zrangebyscore(self._index, "-inf", f"({cutoff!r}"))
        return sum(self._delete(_s(c), cutoff) for c in candidates)

    def get_chain(self, chain_id: str) -> Chain:
        def read() -> list[Any]:
            pipe = self._r.pipeline(transaction=True)
            pipe.hgetall(self._key(chain_id))
            pipe.lrange(self._key(chain_id, ":to"), 0, -1)
            pipe.hgetall(self._key(chain_id, ":tc"))
            pipe.hgetall(self._key(chain_id, ":tr"))
            pipe.get(self._key(chain_id, ":lease"))
            return pipe.execute()

        raw_meta, order, calls_raw, results_raw, owner = self._retry(read)
        if not raw_meta:
            raise ChainNotFound(f"no chain {chain_id!r}")
        meta = {_s(k): v for k, v in raw_meta.items()}
        n_turns = int(meta["n_turns"])
        gen_keys = [self._key(chain_id, f":g{t}") for t in range(n_turns)]
        gens = self._retry(lambda: self._r.mget(gen_keys)) if n_turns else []
        turns = [
            Turn(
                index=t,
                request=json.loads(meta[f"t{t}:request"]),
                sampling=json.loads(meta[f"t{t}:sampling"]),
                prompt_tokens=unpack(meta[f"t{t}:prompt"]),
                generated=unpack(gens[t]),
                status=_s(meta[f"t{t}:status"]),
                finish_reason=_s(meta[f"t{t}:reason"]) if f"t{t}:reason" in meta else None,
                created_at=float(meta[f"t{t}:created"]),
                updated_at=float(meta[f"t{t}:updated"]),
            )
            for t in range(n_turns)
        ]
        calls = {_s(k): json.loads(v) for k, v in calls_raw.items()}
        results = {_s(k): _s(v) for k, v in results_raw.items()}
        records: list[ToolCallRecord] = []
        per_turn: dict[int, int] = {}
        for raw_id in order:
            call_id = _s(raw_id)
            turn, name, arguments = calls[call_id]
            index = per_turn[turn] = per_turn.get(turn, -1) + 1
            result_at = results.get(f"a:{call_id}")
            records.append(
                ToolCallRecord(
                    turn=turn,
                    index=index,
                    id=call_id,
                    name=name,
                    arguments=arguments,
                    result=results.get(f"r:{call_id}"),
                    result_at=None if result_at is None else float(result_at),
                )
            )
        return Chain(
            chain_id=chain_id,
            created_at=float(meta["created_at"]),
            updated_at=float(meta["updated_at"]),
            status=_s(meta["status"]),
            n_turns=n_turns,
            n_tool_calls=len(records),
            owner=None if owner is None else _s(owner),
            tenant=_s(meta.get("tenant", b"")),
            turns=turns,
            tool_calls=records,
        )

    def generated(self, chain_id: str, turn: int) -> list[int]:
        def read() -> list[Any]:
            pipe = self._r.pipeline(transaction=True)
            pipe.hget(self._key(chain_id), "n_turns")
            pipe.get(self._key(chain_id, f":g{turn}"))
            return pipe.execute()

        n_turns, blob = self._retry(read)
        if n_turns is None:
            raise ChainNotFound(f"no chain {chain_id!r}")
        if not 0 <= turn < int(n_turns):
            raise TurnNotFound(f"chain {chain_id!r} has no turn {turn} (it has {int(n_turns)})")
        return unpack(blob)

    def _list_chains(self, limit: int) -> list[ChainSummary]:
        ids = [_s(c) for c in self._retry(lambda: self._r.zrevrange(self._index, 0, limit - 1))]

        def read() -> list[Any]:
            pipe = self._r.pipeline(transaction=False)
            for c in ids:
                pipe.hmget(self._key(c), ["created_at", "updated_at", "status", "n_turns", "n_calls", "tenant"])
                pipe.get(self._key(c, ":lease"))
            return pipe.execute()

        replies = self._retry(read)
        out = []
        for c, fields, owner in zip(ids, replies[::2], replies[1::2]):
            if fields[0] is None:  # deleted between the two reads
                continue
            created, updated, status, n_turns, n_calls, tenant = fields
            out.append(
                ChainSummary(
                    chain_id=c,
                    created_at=float(created),
                    updated_at=float(updated),
                    status=_s(status),
                    n_turns=int(n_turns),
                    n_tool_calls=int(n_calls),
                    owner=None if owner is None else _s(owner),
                    tenant=_s(tenant or b""),
                )
            )
        return out

    def close(self) -> None:
        self._r.close()


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
