"""Per-key admission of turns on one router: a cap on the turns a key has generating at once and a token bucket
of its tokens per minute (`RequestLimits.max_concurrent_per_key`, `tokens_per_minute_per_key`, or the key's own
values in the keys file). A turn reserves its prompt plus `max_tokens` when admitted and returns what it did not
generate when it ends, so a key's rate is what it actually used. Past either limit a turn is refused before it
starts with `RateLimited`, which carries when to retry (HTTP 429 `Retry-After`, gRPC RESOURCE_EXHAUSTED)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

CONCURRENCY_RETRY_S = 1  # a slot frees when some turn ends: no better guess than "soon"


@dataclass(frozen=True)
class KeyLimits:
    """One key's limits; None: unlimited."""
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None


class RateLimited(Exception):
    def __init__(self, message: str, *, retry_after_s: int, limit: str) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit = limit  # the config field that refused


@dataclass
class _Tenant:
    level: float  # tokens in the bucket (negative: reserved beyond it)
    stamp: float  # when `level` was last refilled
    active: int = 0


@dataclass
class Admission:
    """A turn's hold on its key's quota; `release` (once) frees the slot and returns unused tokens."""
    _quotas: TenantQuotas | None
    tenant: str
    reserved: int
    _released: bool = field(default=False)

    def release(self, generated: int, max_tokens: int) -> None:
        if self._released or self._quotas is None:
            return
        self._released = True
        self._quotas._release(self.tenant, max(max_tokens - generated, 0) if self.reserved else 0)


class TenantQuotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}

    def _state(self, tenant: str, rate: int | None) -> _Tenant:
        now = self._clock()
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant(level=float(rate or 0), stamp=now)
        elif rate is not None:
            state.level = min(float(rate), state.level + (now - state.stamp) * rate / 60.0)
            state.stamp = now
        return state

    def admit(self, tenant: str, limits: KeyLimits | None, prompt_tokens: int, max_tokens: int) -> Admission:
        """Takes a slot and reserves `prompt_tokens + max_tokens` (a turn bigger than the bucket waits for a full
        one); RateLimited if the key is at its concurrency cap or its bucket is short."""
        if limits is None or (limits.max_concurrent is None and limits.tokens_per_minute is None):
            return Admission(None, tenant, 0)
        rate = limits.tokens_per_minute
        state = self._state(tenant, rate)
        if limits.max_concurrent is not None and state.active >= limits.max_concurrent:
            raise RateLimited(f"this API key has {state.active} turns generating; the limit is "
                              f"{limits.max_concurrent} (router.limits.max_concurrent_per_key): retry when one ends",
                              retry_after_s=CONCURRENCY_RETRY_S, limit="max_concurrent_per_key")
        cost = prompt_tokens + max_tokens
        if rate is not None:
            need = min(cost, rate)
            if state.level < need:
                wait = math.ceil((need - state.level) * 60.0 / rate)
                raise RateLimited(f"this turn needs {cost} tokens (prompt + max_tokens) and this API key has "
                                  f"{max(int(state.level), 0)} left of {rate} per minute "
                                  "(router.limits.tokens_per_minute_per_key)", retry_after_s=max(wait, 1),
                                  limit="tokens_per_minute_per_key")
            state.level -= cost
        state.active += 1
        return Admission(self, tenant, cost if rate is not None else 0)

    def _release(self, tenant: str, unused: int) -> None:
        state = self._tenants[tenant]
        state.active -= 1
        state.level += unused
