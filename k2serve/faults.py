"""Fault injection from `ServingConfig.faults`, so failover can be exercised in a cluster, not only in tests.

Router-side kinds run in the router: `kill_router` (the process SIGKILLs itself once a turn it began has
`after_tokens` tokens) and `hang_group` (the router's stream from the target group stalls after the group
streamed `after_tokens` tokens, until the stall deadline re-dispatches). Group-side kinds (`kill_group`,
`kill_actor`) run where the group is hosted: `GroupFaults` counts the tokens a group emits and says when to die.

A target group is named by pool and index: `FaultSpec(pool="decode", group=1)` is the group whose id ends in
`-1` serving role decode (or both, for aggregated pools, which come from the prefill pool's config).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from k2serve.config import FaultSpec

log = logging.getLogger(__name__)
ROUTER_KINDS = ("kill_router", "hang_group")
GROUP_KINDS = ("kill_group", "kill_actor")


def targets(spec: FaultSpec, group_id: str, role: str) -> bool:
    """Whether `spec` names the group `group_id` serving `role` ("prefill" | "decode" | "both")."""
    pool_ok = role == spec.pool or (role == "both" and spec.pool == "prefill")
    return pool_ok and group_id.rsplit("-", 1)[-1] == str(spec.group)


@dataclass
class _Armed:
    spec: FaultSpec
    seen: int = 0  # tokens counted toward the next firing
    fired: int = 0

    def fire(self) -> bool:
        """Fires unless it already fired `times` times."""
        if self.fired >= self.spec.times:
            return False
        self.fired += 1
        return True

    def count(self, hold: bool = False) -> bool:
        """Counts one token; True when the fault fires now (with `hold`, a firing due now waits for the next
        count without it)."""
        if self.fired >= self.spec.times:
            return False
        self.seen += 1
        if self.seen < self.spec.after_tokens or hold:
            return False
        self.seen = 0
        return self.fire()


class RouterFaults:
    """The router-side faults of one router process."""

    def __init__(self, specs: Sequence[FaultSpec]) -> None:
        self._kill = [_Armed(s) for s in specs if s.kind == "kill_router"]
        self._hang = [_Armed(s) for s in specs if s.kind == "hang_group"]

    def after_token(self, generated: int, began_here: bool) -> None:
        """Called after a turn has `generated` tokens; a turn this router resumed never triggers a kill (a
        restarted router with the same config would otherwise die again at the same token)."""
        for armed in self._kill:
            if began_here and generated == armed.spec.after_tokens and armed.fire():
                log.error("fault injection: kill_router after %d tokens", generated)
                os.kill(os.getpid(), signal.SIGKILL)

    @property
    def hangs(self) -> bool:
        """Whether any hang fault is configured (else `stream_event` never waits and callers may skip it)."""
        return bool(self._hang)

    async def stream_event(self, group_id: str, role: str, *, first: bool = False) -> None:
        """Called before the router takes an event from a group's stream; stalls forever when a hang fires
        (the caller's stall deadline ends the wait). A hang models a stream stalling between tokens: one due
        on a stream's `first` event (which may wait out a whole prefill, under the longer request deadline)
        fires on the stream's next event instead."""
        for armed in self._hang:
            if targets(armed.spec, group_id, role) and armed.count(hold=first):
                log.error("fault injection: hang_group %s", group_id)
                await asyncio.Event().wait()


class GroupFaults:
    """The group-side faults aimed at one group (kept across its restarts, so `times` counts all of them)."""

    def __init__(self, specs: Sequence[FaultSpec], group_id: str, role: str) -> None:
        mine = [s for s in specs if s.kind in GROUP_KINDS and targets(s, group_id, role)]
        self._armed = [_Armed(s) for s in mine]
        self.group_id = group_id

    def token(self) -> str | None:
        """Counts one emitted token; the firing fault's kind when the group must die now."""
        for armed in self._armed:
            if armed.count():
                log.error("fault injection: %s on %s (rank %d)", armed.spec.kind, self.group_id, armed.spec.rank)
                return armed.spec.kind
        return None
