"""Which worker group serves a request: where groups are (a `GroupDirectory`), how loaded and healthy they
are (`GroupState`, refreshed from Stats/Health and from the router's own in-flight counts), and the choice.

Prefix affinity is tracked on the router side: each group remembers the chained block hashes (the engine's
own `hash_block_tokens` keys) of the prompts the router sent it, in a bounded LRU. A prompt then scores the
number of its leading full blocks that group has seen — so the next turn of a chain, which resends the whole
conversation, lands where its prefix is cached while that group stays healthy.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from k2serve.groups import GroupAddress
from k2serve.proto import k2serve_pb2 as pb
from k2serve.k2format.block_hash import block_hashes

Policy = Literal["prefix_load", "load", "round_robin"]
PREFIX_MEMORY_BLOCKS = 65536  # block hashes remembered per group


class GroupDirectory(Protocol):
    """Where the router learns group addresses: the pool controller's registry, or a fixed list."""

    async def list_groups(self) -> list[GroupAddress]: ...


@dataclass
class StaticDirectory:
    groups: list[GroupAddress]

    async def list_groups(self) -> list[GroupAddress]:
        return list(self.groups)


@dataclass
class GroupState:
    addr: GroupAddress
    healthy: bool = True
    inflight: int = 0  # requests this router has on the group now
    stats: pb.StatsResponse = field(default_factory=pb.StatsResponse)
    prefixes: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    def serves(self, role: Literal["prefill", "decode"]) -> bool:
        return self.healthy and self.addr.role in (role, "both")

    def load(self) -> float:
        """Running + waiting sequences (the group's own view, or this router's if higher) plus KV pressure."""
        s = self.stats
        seqs = max(s.running + s.waiting, self.inflight)
        total = s.kv_blocks_used + s.kv_blocks_free
        return seqs + (s.kv_blocks_used / total if total else 0.0)

    def prefix_match(self, hashes: list[bytes]) -> int:
        n = 0
        for h in hashes:
            if h not in self.prefixes:
                break
            n += 1
        return n

    def remember(self, hashes: list[bytes]) -> None:
        for h in hashes:
            self.prefixes[h] = None
            self.prefixes.move_to_end(h)
        while len(self.prefixes) > PREFIX_MEMORY_BLOCKS:
            self.prefixes.popitem(last=False)


class NoGroupAvailable(RuntimeError):
    """No healthy group of the needed role."""


@dataclass
class Scheduler:
    policy: Policy
    block_size: int
    _rr: itertools.count[int] = field(default_factory=itertools.count)

    def pick(self, groups: Sequence[GroupState], role: Literal["prefill", "decode"], tokens: Sequence[int] = (),
             exclude: set[str] | None = None) -> GroupState:
        """The group for one request of `role`; prefix affinity applies to prefill (and aggregated) choices."""
        cands = [g for g in groups if g.serves(role) and g.addr.group_id not in (exclude or set())]
        if not cands:
            cands = [g for g in groups if g.serves(role)]  # better a group that failed once than none
        if not cands:
            raise NoGroupAvailable(f"no healthy {role} worker group")
        if self.policy == "round_robin":
            return cands[next(self._rr) % len(cands)]
        if self.policy == "prefix_load" and tokens:
            hashes = block_hashes(tokens, self.block_size)
            # A cached block saves its prefill; one queued sequence costs about as much as a few blocks.
            best = max(cands, key=lambda g: (g.prefix_match(hashes) - 4 * g.load(), -g.inflight))
            best.remember(hashes)
            return best
        return min(cands, key=lambda g: (g.load(), g.addr.group_id))
