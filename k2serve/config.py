"""The serving configuration: one schema read by the operator (which writes it into a ConfigMap), the pool
controller and workers (which size groups from it) and the router (ports, store, policies).

It crosses process and Kubernetes boundaries, so it is pydantic; the operator's CRD embeds these models
rather than restating them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

CONFIG_ENV = "K2SERVE_CONFIG"
# Where the pool controller publishes worker groups and routers find them: a named Ray actor.
RAY_NAMESPACE = "k2serve"
GROUP_REGISTRY_ACTOR = "k2serve-registry"
# Where the pool controller serves the worker groups' metrics in a cluster (its container's port "metrics").
POOL_METRICS_PORT = 9400


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSource(_Strict):
    source: str = Field(
        "builtin:tiny-k2",
        description="`builtin:tiny-k2`, a local directory in Hugging Face layout (e.g. a PVC mount), or a URI.",
    )
    quantization: Literal["auto", "int4", "bf16"] = Field(
        "auto", description="`auto` reads the checkpoint's quantization_config."
    )
    max_context: int = Field(262144, ge=128, le=1_048_576, description="Longest prompt + generation, tokens.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Activation dtype: `auto` is bfloat16 on GPU and float32 on CPU."
    )


class PoolConfig(_Strict):
    groups: int = Field(1, ge=0, le=1024, description="Worker groups (model replicas) in this pool.")
    expert_parallel: int = Field(1, ge=1, le=1024, description="Ray actors (GPUs) per group; divides the expert count.")
    max_batch_tokens: int = Field(8192, ge=16, description="Token budget of one engine step (chunked prefill).")
    max_running: int = Field(256, ge=1, description="Most sequences a group runs at once.")
    kv_blocks: int | None = Field(None, ge=1, description="KV cache blocks per rank; default sized from memory.")
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV cache block.")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    num_cpus_per_actor: float = Field(
        1.0, gt=0, description="Logical Ray CPUs one actor reserves; a rank runs that many (whole, at least 1) torch threads."
    )
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs one actor reserves (1 on GPU nodes).")
    ray_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each actor of this pool also reserves; the operator sets "
        "`k2serve_<pool>: 1` so a pool's actors land only on that pool's worker pods.",
    )


class RequestLimits(_Strict):
    """Bounds on what one API request may ask for; past one the request is refused (413 for the body, else 400)
    naming the limit, before any turn starts."""

    max_body_bytes: int = Field(4 << 20, ge=1024, description="Largest HTTP request body (413 past it, unread).")
    max_json_depth: int = Field(64, ge=4, le=512, description="Deepest nesting of arrays/objects in a body.")
    max_messages: int = Field(2048, ge=1, description="Most messages in one chat request.")
    max_tools: int = Field(128, ge=0, description="Most tools in one chat request.")
    max_tool_schema_bytes: int = Field(32 << 10, ge=64, description="Largest JSON of one tool's definition.")
    max_stop_strings: int = Field(4, ge=0, le=64, description="Most `stop` strings.")
    max_stop_chars: int = Field(256, ge=1, description="Longest `stop` string, characters.")
    default_max_tokens: int = Field(4096, ge=1, description="Generated tokens of a request that sets no "
                                    "max_tokens (at most what fits in the context).")
    max_turns_per_chain: int = Field(1000, ge=1, description="Most turns one chain may hold.")


class RouterConfig(_Strict):
    host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535, description="0 picks a free port.")
    grpc_port: int = Field(0, ge=0, le=65535, description="0 picks a free port.")
    routing_policy: Literal["prefix_load", "load", "round_robin"] = "prefix_load"
    aggregated: bool = Field(False, description="One pool does prefill and decode (no KV handoff).")
    api_keys_file: str | None = Field(None, description="File with one bearer API key per line; none: open.")
    served_model_name: str | None = Field(None, description="Name in /v1/models; default from the model source.")
    request_timeout_s: float = Field(600.0, gt=0)
    stall_timeout_s: float = Field(30.0, gt=0, description="A group stream silent this long after its first "
                                   "token counts as a failed group; the turn is re-dispatched.")
    limits: RequestLimits = Field(default_factory=RequestLimits)


class ChainStoreConfig(_Strict):
    backend: Literal["sqlite", "redis"] = "sqlite"
    sqlite_path: str = "k2serve-chains.sqlite3"
    redis_url: str | None = None
    redis_url_env: str | None = Field(
        None, description="Environment variable holding the redis URL (e.g. from a Secret); used when redis_url is unset."
    )
    checkpoint_every: int = Field(16, ge=1, description="Most generated tokens of a turn not yet durable before "
                                  "generation waits for the store. Tokens reach clients only once durable: group "
                                  "commits run back to back, each writing what every live turn produced meanwhile.")
    ttl_seconds: int = Field(7 * 24 * 3600, ge=60, description="Retention of finished chains.")
    migration_limit: int = Field(3, ge=0, description="Re-dispatches of one generation after group failures.")
    lease_ttl_s: float = Field(2.0, gt=0, description="A dead router's chains become resumable by another "
                               "router this long after its last lease renewal.")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> "ChainStoreConfig":
        if self.backend == "redis" and not (self.redis_url or self.redis_url_env):
            raise ValueError("chain_store.redis_url (or redis_url_env) is required when chain_store.backend is 'redis'")
        return self


class FaultSpec(_Strict):
    """A fault to inject, by configuration, so failover can be exercised in a real cluster too."""

    kind: Literal["kill_actor", "kill_group", "kill_router", "hang_group"]
    pool: Literal["prefill", "decode"] = "decode"
    group: int = Field(0, ge=0)
    rank: int = Field(0, ge=0)
    after_tokens: int = Field(1, ge=0, description="Fire once the target has produced this many tokens.")
    times: int = Field(1, ge=1, description="How many times the fault fires.")


class ServingConfig(_Strict):
    model: ModelSource = Field(default_factory=ModelSource)
    prefill: PoolConfig = Field(default_factory=PoolConfig)
    decode: PoolConfig = Field(default_factory=PoolConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    chain_store: ChainStoreConfig = Field(default_factory=ChainStoreConfig)
    deterministic: bool = Field(
        False, description="Batch-invariant kernels: outputs independent of batch composition (slower)."
    )
    faults: list[FaultSpec] = Field(default_factory=list)
    cluster_token_file: str | None = Field(
        None, description="File holding the shared secret of internal gRPC (router → worker groups): every such call "
        "sends `authorization: Bearer <token>` and worker groups refuse (UNAUTHENTICATED) calls without it. Re-read "
        "when it changes. Unset: internal gRPC is open (`k2serve up` sets a fresh one).",
    )
    cpu_binding: Literal["auto", "none"] = Field(
        "auto", description="auto: when the Ray cluster is one node with a core per rank, each rank runs on cores "
        "of its own, and with cores to spare the router, leaders and Ray on those (k2serve/cpu_binding.py); none: "
        "the OS places every thread."
    )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ServingConfig":
        """Reads YAML or JSON; a bad file names itself and the offending field."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ValueError(f"cannot read serving config {p}: {e}") from e
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        try:
            return cls.model_validate(data or {})
        except Exception as e:
            raise ValueError(f"invalid serving config {p}: {e}") from e

    @classmethod
    def from_env(cls) -> "ServingConfig":
        path = os.environ.get(CONFIG_ENV)
        return cls.load(path) if path else cls()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
