"""Where a router learns the worker groups: the pool controller's registry, a named Ray actor that every
driver on the Ray cluster can read. The router reads plain dicts from it through Ray's API and never imports
the workers' Python objects."""

from __future__ import annotations

import asyncio
from typing import Any

from k2serve.config import GROUP_REGISTRY_ACTOR, RAY_NAMESPACE
from k2serve.groups import GroupAddress

CALL_TIMEOUT_S = 5.0


class RegistryDirectory:
    """`GroupDirectory` over the `k2serve-registry` actor; needs a Ray connection (`ray.init`) in this process."""

    def __init__(self, namespace: str = RAY_NAMESPACE, actor: str = GROUP_REGISTRY_ACTOR) -> None:
        self.namespace, self.actor = namespace, actor

    async def list_groups(self) -> list[GroupAddress]:
        return [GroupAddress(g["group_id"], g["role"], g["address"])
                for g in await asyncio.to_thread(self._read)]

    def _read(self) -> list[dict[str, Any]]:
        import ray

        try:
            registry = ray.get_actor(self.actor, namespace=self.namespace)
        except ValueError:  # the controller has not published yet
            return []
        groups: list[dict[str, Any]] = ray.get(registry.groups.remote(), timeout=CALL_TIMEOUT_S)
        return groups
