"""Worker groups inside the current process, each a `WorkerService` over an `EngineLoop(Engine(...))` on its
own gRPC port, and a whole stack (groups + `RouterCore`) built from a `ServingConfig` — for tests, benchmarks
and `k2serve up` before expert-parallel pools are available. The router still reaches the groups over gRPC,
exactly as it reaches remote ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from k2serve.config import PoolConfig, ServingConfig
from k2serve.metrics import Metrics
from k2serve.router.chains import open_store
from k2serve.router.core import RouterCore
from k2serve.router.schedule import GroupAddress, Role, StaticDirectory
from k2serve.worker.engine.engine import Engine, EngineConfig
from k2serve.worker.engine.loop import EngineLoop
from k2serve.worker.loader import ModelWeights, load_weights, resolve_model
from k2serve.worker.model.k2 import K2Model
from k2serve.worker.service import WorkerService
from k2serve.worker.tokenizer import K2Tokenizer

DEFAULT_CPU_KV_BLOCKS = 2048


@lru_cache(maxsize=2)
def _weights(model_dir: Path) -> ModelWeights:
    # Groups in one process share read-only weights: each holds its own engine and KV cache.
    return load_weights(model_dir)


def build_engine(model_dir: Path, pool: PoolConfig, config: ServingConfig, eos_ids: list[int]) -> Engine:
    w = _weights(model_dir)
    model = K2Model(w.config, w.dense, w.experts, deterministic=config.deterministic)
    return Engine(model, EngineConfig(num_blocks=pool.kv_blocks or DEFAULT_CPU_KV_BLOCKS, block_size=pool.block_size,
                                      max_batch_tokens=pool.max_batch_tokens, max_running=pool.max_running,
                                      max_model_len=config.model.max_context, deterministic=config.deterministic),
                  eos_token_ids=eos_ids)


@dataclass
class LocalGroup:
    service: WorkerService
    address: str

    @classmethod
    async def start(cls, model_dir: Path, pool: PoolConfig, config: ServingConfig, *, group_id: str, role: Role,
                    eos_ids: list[int], metrics: Metrics | None = None, host: str = "127.0.0.1") -> "LocalGroup":
        engine = build_engine(model_dir, pool, config, eos_ids)
        service = WorkerService(EngineLoop(engine), group_id=group_id, role=role, block_size=pool.block_size,
                                metrics=metrics)
        return cls(service, await service.start(host, 0))

    @property
    def group_address(self) -> GroupAddress:
        return GroupAddress(self.service.group_id, self.service.role, self.address)

    async def stop(self) -> None:
        await self.service.stop()


@dataclass
class LocalStack:
    core: RouterCore
    groups: list[LocalGroup] = field(default_factory=list)

    async def aclose(self) -> None:
        await self.core.aclose()
        for g in self.groups:
            await g.stop()
        self.core.store.close()


async def start_local_groups(config: ServingConfig, metrics: Metrics | None = None) -> list[LocalGroup]:
    """`config.prefill.groups` prefill + `config.decode.groups` decode groups (aggregated: the prefill pool's
    groups serve both roles and the decode pool is not started)."""
    model_dir = resolve_model(config.model.source)
    eos = K2Tokenizer.from_dir(model_dir).eos_ids
    specs: list[tuple[str, Role, PoolConfig]] = []
    if config.router.aggregated:
        specs += [(f"both-{i}", "both", config.prefill) for i in range(config.prefill.groups)]
    else:
        specs += [(f"prefill-{i}", "prefill", config.prefill) for i in range(config.prefill.groups)]
        specs += [(f"decode-{i}", "decode", config.decode) for i in range(config.decode.groups)]
    return [await LocalGroup.start(model_dir, pool, config, group_id=gid, role=role, eos_ids=eos, metrics=metrics)
            for gid, role, pool in specs]


async def start_local_stack(config: ServingConfig, metrics: Metrics | None = None) -> LocalStack:
    """In-process groups plus a started `RouterCore` over them (store from `config.chain_store`)."""
    metrics = metrics or Metrics()
    groups = await start_local_groups(config, metrics)
    tokenizer = K2Tokenizer.from_dir(resolve_model(config.model.source))
    core = RouterCore(config, tokenizer, open_store(config.chain_store), metrics,
                      StaticDirectory([g.group_address for g in groups]))
    await core.start()
    return LocalStack(core, groups)
