"""Worker groups inside the current process, without Ray: each a `WorkerService` over an `EngineLoop(Engine(...))`
on its own gRPC port — for tests, benchmarks and `--groups-in inproc`. A router reaches them over gRPC, exactly as
it reaches remote ones; `k2serve.stack.inproc` puts a router core over them."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from k2serve.cluster_auth import cluster_token
from k2serve.config import PoolConfig, ServingConfig
from k2serve.metrics import Metrics
from k2serve.faults import GroupFaults
from k2serve.groups import GroupAddress, Role
from k2serve.signals import stop_on_signals
from k2serve.worker.allocator import keep_freed_memory
from k2serve.worker.engine.engine import Engine
from k2serve.worker.engine.settings import EngineConfig
from k2serve.worker.engine.grammar import GrammarVocab
from k2serve.worker.engine.loop import EngineLoop
from k2serve.worker.loader import ModelWeights, load_weights, resolve_checkpoint
from k2serve.worker.model.k2 import K2Model
from k2serve.k2format.tokenizer import K2Tokenizer
from k2serve.worker.grpc_service import WorkerService
from k2serve.worker.kv_handoff import LocalPeers

log = logging.getLogger(__name__)


@lru_cache(maxsize=2)
def _weights(model_dir: Path) -> ModelWeights:
    # Groups in one process share read-only weights: each holds its own engine and KV cache.
    return load_weights(model_dir)


def build_engine(model_dir: Path, pool: PoolConfig, config: ServingConfig, eos_ids: list[int]) -> Engine:
    w = _weights(model_dir)
    model = K2Model(w.config, w.dense, w.experts, deterministic=config.deterministic)
    return Engine(model, EngineConfig.for_pool(pool, config), eos_token_ids=eos_ids,
                  grammar_vocab=GrammarVocab.from_model_dir(model_dir, w.config.vocab_size))


@dataclass
class InProcessGroup:
    """A group served from this process. With `restart_after_s`, a group killed by an injected fault is
    started again (fresh engine, same id and port) after that delay, as a supervisor restarts a dead pod."""

    service: WorkerService
    address: str
    build: Callable[[], WorkerService]
    restart_after_s: float | None = None
    restarts: int = 0
    _watcher: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, model_dir: Path, pool: PoolConfig, config: ServingConfig, *, group_id: str, role: Role,
                    eos_ids: list[int], metrics: Metrics | None = None, host: str = "127.0.0.1",
                    restart_after_s: float | None = None, peers: LocalPeers | None = None) -> "InProcessGroup":
        """`peers`: the KV handoff peers this group takes handles from and publishes its own table to."""
        faults = GroupFaults(config.faults, group_id, role)  # one counter across restarts: `times` is total
        peers = peers if peers is not None else LocalPeers()
        token = cluster_token(config.cluster_token_file)

        def build() -> WorkerService:
            engine = build_engine(model_dir, pool, config, eos_ids)
            service = WorkerService(EngineLoop(engine), group_id=group_id, role=role, block_size=pool.block_size,
                                    metrics=metrics, faults=faults, peers=peers, token=token,
                                    tls=config.tls)
            peers.tables[group_id] = service.held
            return service

        service = build()
        group = cls(service, await service.start(host, 0), build, restart_after_s)
        group._watcher = asyncio.get_running_loop().create_task(group._supervise())
        return group

    @property
    def group_address(self) -> GroupAddress:
        return GroupAddress(self.service.group_id, self.service.role, self.address)

    async def _supervise(self) -> None:
        while True:
            await self.service.dead.wait()
            if self.restart_after_s is None:
                return
            await asyncio.sleep(self.restart_after_s)
            host, port = self.address.rsplit(":", 1)
            self.service = self.build()
            await self.service.start(host, int(port))
            self.restarts += 1
            log.warning("group %s restarted on %s", self.service.group_id, self.address)

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        await self.service.stop()


async def start_inprocess_groups(config: ServingConfig, metrics: Metrics | None = None, *,
                             restart_after_s: float | None = None) -> list[InProcessGroup]:
    """`config.prefill.groups` prefill + `config.decode.groups` decode groups (aggregated: the prefill pool's
    groups serve both roles and the decode pool is not started)."""
    model_dir = resolve_checkpoint(config.model.source)
    eos = K2Tokenizer.from_dir(model_dir).eos_ids
    keep_freed_memory()  # these groups step their engines on CPU, in this process
    specs: list[tuple[str, Role, PoolConfig]] = []
    if config.router.aggregated:
        specs += [(f"both-{i}", "both", config.prefill) for i in range(config.prefill.groups)]
    else:
        specs += [(f"prefill-{i}", "prefill", config.prefill) for i in range(config.prefill.groups)]
        specs += [(f"decode-{i}", "decode", config.decode) for i in range(config.decode.groups)]
    peers = LocalPeers()  # the groups of this process hand KV to each other, to no one else
    return [await InProcessGroup.start(model_dir, pool, config, group_id=gid, role=role, eos_ids=eos, metrics=metrics,
                                       restart_after_s=restart_after_s, peers=peers)
            for gid, role, pool in specs]


async def serve_groups(config: ServingConfig, stop: asyncio.Event, restart_after_s: float | None) -> None:
    """The groups of `config` in this process until `stop`; prints `GROUP ID=ROLE@HOST:PORT` per group (the
    router's `--group` syntax), then `READY`."""
    groups = await start_inprocess_groups(config, Metrics(), restart_after_s=restart_after_s)
    try:
        for g in groups:
            a = g.group_address
            print(f"GROUP {a.group_id}={a.role}@{a.address}", flush=True)
        print("READY", flush=True)
        await stop.wait()
    finally:
        for g in groups:
            await g.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m k2serve.worker.parallel.inproc_group", description=(
        "Worker groups in one process, outliving any router (no Ray: the router's P/D decode re-prefills)."))
    ap.add_argument("--config", required=True, help="serving config (YAML or JSON); its faults apply here")
    ap.add_argument("--restart-after", type=float, default=None, metavar="S",
                    help="restart a group killed by an injected fault after S seconds (default: it stays dead)")
    args = ap.parse_args(argv)
    config = ServingConfig.load(args.config)

    async def go() -> None:
        await serve_groups(config, stop_on_signals(), args.restart_after)

    asyncio.run(go())
    return 0


if __name__ == "__main__":
    sys.exit(main())
