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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from k2serve.errors import UserError

CONFIG_ENV = "K2SERVE_CONFIG"
# Where k2serve keeps what it writes for a user (the default chain store): this variable, else
# $XDG_STATE_HOME/k2serve, else ~/.local/state/k2serve — never the working directory.
STATE_DIR_ENV = "K2SERVE_STATE_DIR"
# Where the pool controller publishes worker groups and routers find them: a named Ray actor.
RAY_NAMESPACE = "k2serve"
GROUP_REGISTRY_ACTOR = "k2serve-registry"
# Where the pool controller serves the worker groups' metrics in a cluster (its container's port "metrics").
POOL_METRICS_PORT = 9400
# Ray placement-group strategies for a group's actors.
Placement = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
# Logical Ray CPUs a group leader of rank actors reserves (it only relays requests and steps its ranks). Worker
# pods advertise room for one beside their rank, since Ray may place a leader on any of them.
LEADER_CPUS = 0.1
# Where the builtin model is built (worker/tiny.py): a writable folder, since containers' roots are read-only.
CACHE_ENV = "K2SERVE_CACHE"


class ConfigError(UserError, ValueError):
    """A serving config that cannot be read or is invalid; the message names the file, and the line or field."""


def state_dir() -> Path:
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "k2serve"


# What `k2serve up` serves when given neither --model nor a config: the trained agent shipped in the repository.
UP_DEFAULT_MODEL = "builtin:tiny-k2-agent"

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSource(_Strict):
    source: str = Field(
        "builtin:tiny-k2",
        max_length=1024,
        description="`builtin:tiny-k2`, a local directory in Hugging Face layout (e.g. a PVC mount), or a URI.",
    )
    quantization: Literal["auto", "int4", "bf16"] = Field(
        "auto", description="`auto` reads the checkpoint's quantization_config."
    )
    max_context: int = Field(262144, ge=128, le=1_048_576, description="Longest prompt + generation, tokens.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Activation dtype: `auto` is bfloat16 on GPU and float32 on CPU."
    )


class AutoscalingConfig(_Strict):
    """Scaling one pool between `min_groups` and `max_groups` on the load its groups and routers export. With it,
    `groups` is the count the pool starts with (clamped into the range) and the pool controller owns the count:
    the `/scale` subresource and an HPA must not also set it."""

    min_groups: int = Field(1, ge=1, le=1024, description="Fewest groups the pool scales down to.")
    max_groups: int = Field(4, ge=1, le=1024, description="Most groups the pool scales up to.")
    target_queue_depth: float | None = Field(
        2.0, gt=0, description="Sequences waiting for admission per group (k2serve_queue_depth) the pool aims at; "
        "None: not a signal.")
    target_running_fraction: float | None = Field(
        0.8, gt=0, le=1, description="Running sequences per group over max_running (k2serve_running_sequences) "
        "the pool aims at; None: not a signal.")
    target_kv_use: float | None = Field(
        0.85, gt=0, le=1, description="KV cache blocks used over all blocks (k2serve_kv_blocks_used/free) the pool "
        "aims at; None: not a signal.")
    ttft_slo_s: float | None = Field(
        None, gt=0, description="Time to first token (the routers' k2serve_time_to_first_token_seconds, mean over "
        "the last interval) the pool keeps under; meant for prefill. None: not a signal.")
    tolerance: float = Field(0.1, ge=0, lt=1, description="A signal within this fraction of its target asks for "
                             "no change (no flapping around the target).")
    interval_s: float = Field(2.0, gt=0, le=3600, description="Seconds between two readings of the signals.")
    scale_up_window_s: float = Field(
        10.0, ge=0, le=86400, description="Stabilisation before scaling up: the pool grows only to what every "
        "reading of this window asked for.")
    scale_down_window_s: float = Field(
        60.0, ge=0, le=86400, description="Stabilisation before scaling down: the pool shrinks only to what every "
        "reading of this window allowed.")
    drain_timeout_s: float = Field(
        300.0, gt=0, le=86400, description="Longest a group removed by scale-down keeps serving its running turns "
        "(it takes no new ones); those still running then move to another group through chain resume.")

    @model_validator(mode="after")
    def _range(self) -> "AutoscalingConfig":
        if self.min_groups > self.max_groups:
            raise ValueError(f"min_groups ({self.min_groups}) must not exceed max_groups ({self.max_groups})")
        return self


class PoolConfig(_Strict):
    groups: int = Field(1, ge=0, le=1024, description="Worker groups (model replicas) in this pool.")
    expert_parallel: int = Field(1, ge=1, le=1024, description="Ray actors (GPUs) per group; divides the expert count.")
    max_batch_tokens: int = Field(8192, ge=16, description="Token budget of one engine step (chunked prefill).")
    max_running: int = Field(256, ge=1, description="Most sequences a group runs at once.")
    kv_blocks: int | None = Field(None, ge=1, description="KV cache blocks per rank; default sized from memory.")
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV cache block.")
    placement: Placement = Field(
        "PACK", description="Ray placement-group strategy for a group's actors (PACK: as few nodes as possible).")
    num_cpus_per_actor: float = Field(
        1.0, gt=0, description="Logical Ray CPUs one actor reserves; a rank runs that many (whole, at least 1) torch threads."
    )
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs one actor reserves (1 on GPU nodes).")
    ray_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each actor of this pool also reserves; the operator sets "
        "`k2serve_<pool>: 1` so a pool's actors land only on that pool's worker pods.",
    )
    autoscaling: AutoscalingConfig | None = Field(
        None, description="Scale this pool's groups on load (the pool controller); None: `groups` is fixed.")

    def most_groups(self) -> int:
        """Groups the pool may have at once (what to reserve room for)."""
        return self.groups if self.autoscaling is None else max(self.initial_groups(), self.autoscaling.max_groups)

    def initial_groups(self) -> int:
        """Groups the pool starts with: `groups`, within the autoscaling range when there is one."""
        a = self.autoscaling
        return self.groups if a is None else min(max(self.groups, a.min_groups), a.max_groups)


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
    max_n: int = Field(8, ge=1, le=128, description="Most choices (`n`) in one request; each is its own chain.")
    max_chain_id_chars: int = Field(128, ge=16, le=1024, description="Longest chain id a request may name.")
    max_concurrent_per_key: int | None = Field(
        32, ge=1, description="Turns one API key may have generating on one router at once (429 past it); a key's "
        "`max_concurrent=N` in the keys file wins. None: unlimited. Applies only with `api_keys_file` set.")
    tokens_per_minute_per_key: int | None = Field(
        None, ge=1, description="Token bucket of one API key on one router: a turn reserves its prompt plus "
        "max_tokens tokens at admission and gets back what it did not generate; the bucket refills at this rate "
        "and holds at most a minute's worth (429 with Retry-After while it is short). A key's "
        "`tokens_per_minute=N` in the keys file wins. None: unlimited. Applies only with `api_keys_file` set.")
    detached_max_tokens: int = Field(
        4096, ge=1, description="Tokens a turn whose last reader left (client gone) still generates; then it stops "
        "and stays resumable (a later resume generates on).")
    detached_timeout_s: float = Field(
        600.0, gt=0, description="Seconds a turn without readers keeps generating; then it stops, resumable.")


class RouterConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address the HTTP and gRPC servers listen on.")
    http_port: int = Field(8000, ge=0, le=65535, description="0 picks a free port.")
    grpc_port: int = Field(0, ge=0, le=65535, description="0 picks a free port.")
    routing_policy: Literal["prefix_load", "load", "round_robin"] = Field(
        "prefix_load", description="How a prefill group is chosen: prefix_load prefers the group holding the "
        "longest cached prefix of the prompt, then the least loaded; load: least loaded; round_robin: in turn.")
    aggregated: bool = Field(False, description="One pool does prefill and decode (no KV handoff).")
    api_keys_file: str | None = Field(None, description="File with one bearer API key per line; none: open.")
    served_model_name: str | None = Field(None, description="Name in /v1/models; default from the model source.")
    request_timeout_s: float = Field(600.0, gt=0, description="Longest a request may take, seconds.")
    stall_timeout_s: float = Field(30.0, gt=0, description="A group stream silent this long after its first "
                                   "token counts as a failed group; the turn is re-dispatched.")
    max_reasoning_tokens: int | None = Field(
        None, ge=0, description="Default reasoning budget of a chat turn (a request's max_reasoning_tokens wins): "
        "past it the engine closes the thinking section and the answer follows. None: unlimited.")
    limits: RequestLimits = Field(default_factory=RequestLimits, description="Bounds on one API request.")


class ChainStoreConfig(_Strict):
    backend: Literal["sqlite", "redis"] = Field("sqlite", description="Where chains are kept durable.")
    sqlite_path: str = Field("chains.sqlite3", description="SQLite file; a relative path is taken in the state "
                             f"directory (${STATE_DIR_ENV}, else $XDG_STATE_HOME/k2serve, else "
                             "~/.local/state/k2serve), never the working directory.")
    redis_url: str | None = Field(None, description="redis://host:port/db of the Redis chain store.")
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

    def sqlite_file(self) -> Path:
        path = Path(self.sqlite_path).expanduser()
        return path if path.is_absolute() else state_dir() / path

    @model_validator(mode="after")
    def _redis_needs_url(self) -> "ChainStoreConfig":
        if self.backend == "redis" and not (self.redis_url or self.redis_url_env):
            raise ValueError("chain_store.redis_url (or redis_url_env) is required when chain_store.backend is 'redis'")
        return self


class FaultSpec(_Strict):
    """A fault to inject, by configuration, so failover can be exercised in a real cluster too."""

    kind: Literal["kill_actor", "kill_group", "kill_router", "hang_group"] = Field(description="What fails.")
    pool: Literal["prefill", "decode"] = Field("decode", description="The pool of the target group.")
    group: int = Field(0, ge=0, description="The target group's index in its pool.")
    rank: int = Field(0, ge=0, description="The target rank in the group (kill_actor).")
    after_tokens: int = Field(1, ge=0, description="Fire once the target has produced this many tokens.")
    times: int = Field(1, ge=1, description="How many times the fault fires.")


class TLSConfig(_Strict):
    """TLS on the internal gRPC planes (worker groups and the router's gRPC), from PEM files read at start."""

    cert_file: str = Field(description="This process's certificate chain: served by its gRPC servers and presented "
                           "as the client certificate on internal calls.")
    key_file: str = Field(description="The certificate's private key.")
    ca_file: str = Field(description="The CA that signs the deployment's certificates: clients verify servers "
                         "with it, servers verify client certificates with it.")
    client_auth: bool = Field(True, description="Servers refuse clients without a certificate signed by ca_file "
                              "(mutual TLS).")


class ServingConfig(_Strict):
    model: ModelSource = Field(default_factory=ModelSource, description="The model served.")
    prefill: PoolConfig = Field(default_factory=PoolConfig, description="The prefill pool (in aggregated mode: the "
                                "only pool).")
    decode: PoolConfig = Field(default_factory=PoolConfig, description="The decode pool.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="The router and its HTTP front.")
    chain_store: ChainStoreConfig = Field(default_factory=ChainStoreConfig, description="The durable store of "
                                          "reasoning chains.")
    deterministic: bool = Field(
        False, description="Batch-invariant kernels: outputs independent of batch composition (slower)."
    )
    faults: list[FaultSpec] = Field(default_factory=list, description="Faults to inject (testing failover).")
    cluster_token_file: str | None = Field(
        None, description="File holding the shared secret of internal gRPC (router → worker groups): every such call "
        "sends `authorization: Bearer <token>` and worker groups refuse (UNAUTHENTICATED) calls without it. Re-read "
        "when it changes. Unset: internal gRPC is open (`k2serve up` sets a fresh one).",
    )
    tls: TLSConfig | None = Field(None, description="TLS on internal gRPC (router → worker groups) and the router's "
                                  "gRPC API; unset: plaintext (on a trusted network, with the cluster token).")
    cpu_binding: Literal["auto", "none"] = Field(
        "auto", description="auto: when the Ray cluster is one node with a core per rank, each rank runs on cores "
        "of its own, and with cores to spare the router, leaders and Ray on those (k2serve/cpu_binding.py); none: "
        "the OS places every thread."
    )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ServingConfig":
        """Reads YAML or JSON; a bad file names itself and the offending line or field."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read serving config {p}: {e.strerror or e}") from e
        try:
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from e
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
            raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from e
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{p}: a serving config is a mapping of sections, not a {type(data).__name__}")
        try:
            return cls.model_validate(data or {})
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(top)'}: {err['msg']}" for err in e.errors())
            raise ConfigError(f"invalid serving config {p}: {problems}") from e

    @classmethod
    def from_env(cls) -> "ServingConfig":
        path = os.environ.get(CONFIG_ENV)
        return cls.load(path) if path else cls()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
