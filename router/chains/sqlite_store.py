"""SQLite chain store: one file (WAL, synchronous=FULL, so a write is on disk when the call returns).

Generated tokens are stored as batches (one row per append, packed uint32), so an append costs one small row
however long the turn is; a turn keeps its running count in `turns.n_generated`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from k2serve.router.chains.models import Chain, ChainSummary, ToolCall, ToolCallRecord, Turn, TurnStatus
from k2serve.router.chains.store import (
    ChainNotFound,
    ChainStore,
    ChainStoreError,
    ConflictError,
    TokenGap,
    TokenMismatch,
    ToolCallNotFound,
    TurnClosed,
    TurnNotFound,
    first_mismatch,
)
from k2serve.router.chains.tokens import pack, unpack

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chains (
    chain_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    status TEXT NOT NULL,
    n_turns INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until REAL,
    tenant TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS chains_updated ON chains(updated_at);
CREATE TABLE IF NOT EXISTS turns (
    chain_id TEXT NOT NULL REFERENCES chains(chain_id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    request TEXT NOT NULL,
    sampling TEXT NOT NULL,
    prompt BLOB NOT NULL,
    n_generated INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    finish_reason TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (chain_id, idx)
);
CREATE TABLE IF NOT EXISTS token_batches (
    chain_id TEXT NOT NULL,
    turn INTEGER NOT NULL,
    start INTEGER NOT NULL,
    tokens BLOB NOT NULL,
    PRIMARY KEY (chain_id, turn, start),
    FOREIGN KEY (chain_id, turn) REFERENCES turns(chain_id, idx) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS tool_calls (
    chain_id TEXT NOT NULL REFERENCES chains(chain_id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    turn INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    arguments TEXT NOT NULL,
    result TEXT,
    result_at REAL,
    PRIMARY KEY (chain_id, seq),
    UNIQUE (chain_id, id)
);
"""


class SqliteChainStore(ChainStore):
    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise ChainStoreError(f"no chain store at {self.path} (a stack started with this config writes one "
                                  "there; pass --sqlite, --redis or --config to read another)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection behind a lock: the router calls from a thread pool, and SQLite serializes writers
        # anyway. Other processes on the same file coordinate through WAL and the busy timeout.
        self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._batch_thread: int | None = None  # the thread whose write transaction is open (joined by its writes)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(chains)")}
        if "tenant" not in columns:  # a store made before chains had tenants: theirs are open ('')
            self._db.execute("ALTER TABLE chains ADD COLUMN tenant TEXT NOT NULL DEFAULT ''")

    @contextmanager
    def batch(self) -> Iterator[None]:
        """The writes inside are one transaction: one commit (one fsync), all or none of them."""
        with self._write():
            yield

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self._batch_thread == threading.get_ident():  # inside this thread's `batch()`: part of its transaction
            yield self._db
            return
        # IMMEDIATE takes the write lock up front, so read-check-write sequences are atomic across processes.
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._batch_thread = threading.get_ident()
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            finally:
                self._batch_thread = None
            self._db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        if self._batch_thread == threading.get_ident():
            yield self._db
            return
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    @staticmethod
    def _chain_row(db: sqlite3.Connection, chain_id: str) -> tuple[float, float, str, int, str | None, float | None]:
        row = db.execute(
            "SELECT created_at, updated_at, status, n_turns, owner, lease_until FROM chains WHERE chain_id=?",
            (chain_id,),
        ).fetchone()
        if row is None:
            raise ChainNotFound(f"no chain {chain_id!r}")
        return row

    @classmethod
    def _turn_row(cls, db: sqlite3.Connection, chain_id: str, turn: int) -> tuple[int, str]:
        row = db.execute(
            "SELECT n_generated, status FROM turns WHERE chain_id=? AND idx=?", (chain_id, turn)
        ).fetchone()
        if row is None:
            n_turns = cls._chain_row(db, chain_id)[3]
            raise TurnNotFound(f"chain {chain_id!r} has no turn {turn} (it has {n_turns})")
        return row

    @staticmethod
    def _touch(db: sqlite3.Connection, chain_id: str, now: float, status: str | None = None) -> None:
        if status is None:
            db.execute("UPDATE chains SET updated_at=? WHERE chain_id=?", (now, chain_id))
        else:
            db.execute("UPDATE chains SET updated_at=?, status=? WHERE chain_id=?", (now, status, chain_id))

    def _create_chain(self, chain_id: str, tenant: str, now: float) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO chains(chain_id, created_at, updated_at, status, tenant)"
                " VALUES (?, ?, ?, 'idle', ?)",
                (chain_id, now, now, tenant),
            )

    def _begin_turn(self, chain_id: str, request: str, sampling: str, prompt: list[int], now: float) -> int:
        with self._write() as db:
            n_turns = self._chain_row(db, chain_id)[3]
            if n_turns:
                last = self._turn_row(db, chain_id, n_turns - 1)[1]
                if last == "running":
                    raise ConflictError(
                        f"chain {chain_id!r}: turn {n_turns - 1} is still running; finish it before a new turn"
                    )
            db.execute(
                "INSERT INTO turns(chain_id, idx, request, sampling, prompt, status, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, 'running', ?, ?)",
                (chain_id, n_turns, request, sampling, pack(prompt), now, now),
            )
            db.execute("UPDATE chains SET n_turns=? WHERE chain_id=?", (n_turns + 1, chain_id))
            self._touch(db, chain_id, now, "running")
            return n_turns

    def _append_tokens(self, chain_id: str, turn: int, start: int, tokens: list[int], now: float) -> int:
        with self._write() as db:
            stored, status = self._turn_row(db, chain_id, turn)
            if start > stored:
                raise TokenGap(chain_id, turn, stored, start)
            if start < stored:
                overlap = self._tokens(db, chain_id, turn, start)
                bad = first_mismatch(overlap, 0, tokens)
                if bad is not None:
                    raise TokenMismatch(chain_id, turn, start + bad[0], bad[1], bad[2])
            new = tokens[stored - start :]
            if not new:
                return stored
            if status != "running":
                raise TurnClosed(f"chain {chain_id!r} turn {turn} is {status}; cannot append tokens")
            db.execute(
                "INSERT INTO token_batches(chain_id, turn, start, tokens) VALUES (?, ?, ?, ?)",
                (chain_id, turn, stored, pack(new)),
            )
            db.execute(
                "UPDATE turns SET n_generated=?, updated_at=? WHERE chain_id=? AND idx=?",
                (stored + len(new), now, chain_id, turn),
            )
            self._touch(db, chain_id, now)
            return stored + len(new)

    @staticmethod
    def _tokens(db: sqlite3.Connection, chain_id: str, turn: int, start: int = 0) -> list[int]:
        """Stored tokens from position `start` on (batches are contiguous, so this reads only the overlap)."""
        rows = db.execute(
            "SELECT start, tokens FROM token_batches WHERE chain_id=? AND turn=? AND start + length(tokens)/4 > ?"
            " ORDER BY start",
            (chain_id, turn, start),
        ).fetchall()
        out: list[int] = []
        for batch_start, blob in rows:
            out.extend(unpack(blob))
        return out[start - rows[0][0] :] if rows else out

    def _record_tool_calls(self, chain_id: str, turn: int, calls: list[ToolCall], now: float) -> None:
        with self._write() as db:
            self._turn_row(db, chain_id, turn)
            seq, idx = db.execute(
                "SELECT count(*), coalesce(sum(turn=?), 0) FROM tool_calls WHERE chain_id=?", (turn, chain_id)
            ).fetchone()
            for call in calls:
                old = db.execute(
                    "SELECT turn, name, arguments FROM tool_calls WHERE chain_id=? AND id=?", (chain_id, call.id)
                ).fetchone()
                if old is not None:
                    if old != (turn, call.name, call.arguments):
                        raise ConflictError(
                            f"chain {chain_id!r}: tool call {call.id!r} is already recorded as turn {old[0]} "
                            f"{old[1]}({old[2]}), not turn {turn} {call.name}({call.arguments})"
                        )
                    continue
                db.execute(
                    "INSERT INTO tool_calls(chain_id, seq, turn, idx, id, name, arguments)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (chain_id, seq, turn, idx, call.id, call.name, call.arguments),
                )
                seq, idx = seq + 1, idx + 1
            self._touch(db, chain_id, now)

    def _record_tool_result(self, chain_id: str, tool_call_id: str, result: str, now: float) -> None:
        with self._write() as db:
            self._chain_row(db, chain_id)
            row = db.execute(
                "SELECT result FROM tool_calls WHERE chain_id=? AND id=?", (chain_id, tool_call_id)
            ).fetchone()
            if row is None:
                raise ToolCallNotFound(f"chain {chain_id!r} has no tool call {tool_call_id!r}")
            if row[0] is not None:
                if row[0] != result:
                    raise ConflictError(f"chain {chain_id!r}: tool call {tool_call_id!r} already has another result")
                return
            db.execute(
                "UPDATE tool_calls SET result=?, result_at=? WHERE chain_id=? AND id=?",
                (result, now, chain_id, tool_call_id),
            )
            self._touch(db, chain_id, now)

    def _finish_turn(self, chain_id: str, turn: int, status: TurnStatus, finish_reason: str | None, now: float) -> None:
        with self._write() as db:
            current = self._turn_row(db, chain_id, turn)[1]
            if current != "running":
                old_reason = db.execute(
                    "SELECT finish_reason FROM turns WHERE chain_id=? AND idx=?", (chain_id, turn)
                ).fetchone()[0]
                if (current, old_reason) != (status, finish_reason):
                    raise TurnClosed(f"chain {chain_id!r} turn {turn} already ended {current} ({old_reason})")
                return
            db.execute(
                "UPDATE turns SET status=?, finish_reason=?, updated_at=? WHERE chain_id=? AND idx=?",
                (status, finish_reason, now, chain_id, turn),
            )
            n_turns = self._chain_row(db, chain_id)[3]
            self._touch(db, chain_id, now, status if turn == n_turns - 1 else None)

    def _claim(self, chain_id: str, owner: str, ttl_s: float) -> bool:
        now = time.time()
        with self._write() as db:
            _, _, _, _, holder, until = self._chain_row(db, chain_id)
            if holder not in (None, owner) and until is not None and until > now:
                return False
            db.execute("UPDATE chains SET owner=?, lease_until=? WHERE chain_id=?", (owner, now + ttl_s, chain_id))
            return True

    def release(self, chain_id: str, owner: str) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE chains SET owner=NULL, lease_until=NULL WHERE chain_id=? AND owner=?", (chain_id, owner)
            )

    def get_chain(self, chain_id: str) -> Chain:
        with self._read() as db:
            created, updated, status, n_turns, owner, until = self._chain_row(db, chain_id)
            (tenant,) = db.execute("SELECT tenant FROM chains WHERE chain_id=?", (chain_id,)).fetchone()
            turns = [
                Turn(
                    index=idx,
                    request=json.loads(request),
                    sampling=json.loads(sampling),
                    prompt_tokens=unpack(prompt),
                    generated=self._tokens(db, chain_id, idx),
                    status=t_status,
                    finish_reason=reason,
                    created_at=t_created,
                    updated_at=t_updated,
                )
                for idx, request, sampling, prompt, t_status, reason, t_created, t_updated in db.execute(
                    "SELECT idx, request, sampling, prompt, status, finish_reason, created_at, updated_at"
                    " FROM turns WHERE chain_id=? ORDER BY idx",
                    (chain_id,),
                ).fetchall()
            ]
            calls = [
                ToolCallRecord(turn=t, index=i, id=cid, name=n, arguments=a, result=r, result_at=ra)
                for t, i, cid, n, a, r, ra in db.execute(
                    "SELECT turn, idx, id, name, arguments, result, result_at FROM tool_calls"
                    " WHERE chain_id=? ORDER BY seq",
                    (chain_id,),
                ).fetchall()
            ]
        return Chain(
            chain_id=chain_id,
            created_at=created,
            updated_at=updated,
            status=status,
            n_turns=n_turns,
            n_tool_calls=len(calls),
            owner=_live_owner(owner, until),
            tenant=tenant,
            turns=turns,
            tool_calls=calls,
        )

    def generated(self, chain_id: str, turn: int) -> list[int]:
        with self._read() as db:
            self._turn_row(db, chain_id, turn)
            return self._tokens(db, chain_id, turn)

    def delete_chain(self, chain_id: str) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM chains WHERE chain_id=?", (chain_id,)).rowcount > 0

    def _list_chains(self, limit: int) -> list[ChainSummary]:
        with self._read() as db:
            rows = db.execute(
                "SELECT c.chain_id, c.created_at, c.updated_at, c.status, c.n_turns, c.owner, c.lease_until,"
                " c.tenant, (SELECT count(*) FROM tool_calls t WHERE t.chain_id = c.chain_id)"
                " FROM chains c ORDER BY c.updated_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            ChainSummary(
                chain_id=cid, created_at=c, updated_at=u, status=s, n_turns=n, n_tool_calls=k,
                owner=_live_owner(o, lu), tenant=tn,
            )
            for cid, c, u, s, n, o, lu, tn, k in rows
        ]

    def _purge_expired(self, cutoff: float) -> int:
        with self._write() as db:
            return db.execute(
                "DELETE FROM chains WHERE updated_at < ? AND (lease_until IS NULL OR lease_until <= ?)",
                (cutoff, time.time()),
            ).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _live_owner(owner: str | None, lease_until: float | None) -> str | None:
    return owner if lease_until is not None and lease_until > time.time() else None
