"""KV handoff between groups without trusting the message: a prefill group keeps the ObjectRef of a prompt's KV in
its own table under a random id (`HeldKV`) and sends only a `KVHandle` descriptor (its group id, that id, token
count, block size, digest). The decode group resolves the ref through `KVPeers` — peers it knows from a trusted
source (this process's groups, or the pool's registry in Ray), asked by group id — so no bytes a peer sent are
ever unpickled and no address in a message is ever contacted. Ray passes the ref between the two trusted parties.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from k2serve.proto import k2serve_pb2 as pb
from k2serve.worker.engine.blocks import ROOT_HASH, hash_block_tokens

HANDLE_ID_BYTES = 16


class UnknownPeer(ValueError):
    """A handle names a group no trusted source knows: the request is refused, nothing is contacted."""


@dataclass
class _Held:
    ref: Any  # ray.ObjectRef of the KVHandoff
    expires: float


@dataclass
class HeldKV:
    """A prefill group's table of exported KV: id → ObjectRef, each kept (so alive in the object store) until
    its TTL passes; holding the Python ref is what keeps the object, nothing is pinned out of band."""

    ttl_s: float
    _held: dict[bytes, _Held] = field(default_factory=dict)

    def put(self, ref: Any) -> bytes:
        hid = secrets.token_bytes(HANDLE_ID_BYTES)
        self._held[hid] = _Held(ref, time.monotonic() + self.ttl_s)
        return hid

    def get(self, hid: bytes) -> Any | None:
        held = self._held.get(hid)
        return held.ref if held is not None and held.expires >= time.monotonic() else None

    def expire(self) -> None:
        now = time.monotonic()
        for hid in [h for h, held in self._held.items() if held.expires < now]:
            del self._held[hid]

    def clear(self) -> None:
        self._held.clear()

    def __len__(self) -> int:
        return len(self._held)


def make_handle(group_id: str, hid: bytes, tokens: list[int], block_size: int) -> pb.KVHandle:
    """The descriptor of KV covering `tokens` (the prompt + output prefix it was computed for)."""
    return pb.KVHandle(group_id=group_id, id=hid, tokens=len(tokens), block_size=block_size,
                       digest=hash_block_tokens(ROOT_HASH, tokens))


def check_handle(h: pb.KVHandle, tokens: list[int], block_size: int) -> None:
    """Raises ValueError unless `h` describes KV of a prefix of `tokens` with this block size."""
    if h.block_size != block_size:
        raise ValueError(f"handed-off block size {h.block_size} != {block_size}")
    if not 0 < h.tokens <= len(tokens) or h.digest != hash_block_tokens(ROOT_HASH, tokens[:h.tokens]):
        raise ValueError("handed-off KV belongs to a different prompt")


class KVPeers(Protocol):
    """Where a decode group asks for the ref a handle names."""

    async def ref(self, group_id: str, hid: bytes) -> Any | None:
        """The ObjectRef that group holds under `hid`, or None (expired, or the group restarted); raises
        UnknownPeer when no trusted source knows `group_id`."""
        ...


@dataclass
class LocalPeers:
    """Groups served in this process (worker/parallel/inproc_group.py): their tables, by group id. Empty: no peers at all."""

    tables: dict[str, HeldKV] = field(default_factory=dict)

    async def ref(self, group_id: str, hid: bytes) -> Any | None:
        table = self.tables.get(group_id)
        if table is None:
            raise UnknownPeer(f"group {group_id!r} is not one of this process's groups")
        return table.get(hid)


def leader_actor_name(group_id: str) -> str:
    """The Ray actor name of a group's leader (the pool controller names them so)."""
    return f"k2serve-{group_id}"


@dataclass
class RegistryPeers:
    """Groups of a Ray deployment: a group id counts only once the pool's registry publishes it; its leader is
    the named actor of that id in the same namespace, asked over Ray (`GroupLeader.held_kv_ref`)."""

    namespace: str
    registry_actor: str
    refresh_s: float = 2.0
    _known: set[str] = field(default_factory=set)
    _read_at: float = float("-inf")
    # Leader handles by group id: `ray.get_actor` is a blocking GCS round trip, too slow for every handoff.
    _leaders: dict[str, Any] = field(default_factory=dict)

    def _knows(self, group_id: str) -> bool:
        if group_id not in self._known and time.monotonic() - self._read_at > self.refresh_s:
            import ray

            registry = ray.get_actor(self.registry_actor, namespace=self.namespace)
            self._known = {g["group_id"] for g in ray.get(registry.groups.remote(), timeout=5.0)}
            self._read_at = time.monotonic()
            self._leaders = {g: h for g, h in self._leaders.items() if g in self._known}
        return group_id in self._known

    def _leader(self, group_id: str) -> Any:
        import ray

        if group_id not in self._leaders:
            self._leaders[group_id] = ray.get_actor(leader_actor_name(group_id), namespace=self.namespace)
        return self._leaders[group_id]

    async def ref(self, group_id: str, hid: bytes) -> Any | None:
        import asyncio

        if not await asyncio.to_thread(self._knows, group_id):
            raise UnknownPeer(f"group {group_id!r} is not in the pool's registry")
        leader = self._leaders.get(group_id) or await asyncio.to_thread(self._leader, group_id)
        try:
            refs = await leader.held_kv_ref.remote(hid)
        except Exception:  # a dead or replaced leader: look it up again next time
            self._leaders.pop(group_id, None)
            raise
        return refs[0] if refs else None
