"""Every Prometheus metric k2serve exports, in one place, so dashboards and the lint test see one list.

Each process (router, every worker-group leader, the operator) builds its own `Metrics` on its own
`CollectorRegistry` and serves it on `/metrics` (the router on its HTTP port, groups through
`serve_metrics`). Labels are bounded: role, group, outcome, cause, layer, expert — never request or chain ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from k2serve.groups import Role

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000)
# Label values known up front: their series are created at 0, so a healthy stack's panels read 0, not "No data".
REQUEST_OUTCOMES = ("ok", "client_error", "server_error", "cancelled")
KV_HANDOFF_OUTCOMES = ("ok", "fallback")
RESUME_CAUSES = ("client", "router", "group")
RECONCILE_OUTCOMES = ("ok", "invalid", "error")


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        # ---- router: requests and latency
        self.requests = Counter("k2serve_requests_total", "Requests finished, by endpoint and outcome.",
                                ["endpoint", "outcome"], registry=r)
        self.ttft = Histogram("k2serve_time_to_first_token_seconds", "Request arrival to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("k2serve_inter_token_latency_seconds", "Gap between consecutive streamed tokens.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("k2serve_request_duration_seconds", "Request arrival to last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("k2serve_prompt_tokens_total", "Prompt tokens received by the router.", registry=r)
        self.generation_tokens = Counter("k2serve_generation_tokens_total", "Tokens streamed to clients.", registry=r)
        self.router_queue = Gauge("k2serve_router_inflight_requests", "Requests the router is serving now.", registry=r)
        self.kv_handoffs = Counter("k2serve_kv_handoffs_total", "Prefill-to-decode KV handoffs, by outcome (ok, fallback).",
                                   ["outcome"], registry=r)
        # ---- chains
        self.chain_checkpoints = Counter("k2serve_chain_checkpoints_total", "Durable chain appends written.", registry=r)
        self.chain_resumes = Counter("k2serve_chain_resumes_total", "Chains resumed, by cause.", ["cause"], registry=r)
        self.migrations = Counter("k2serve_migrations_total", "Generations re-dispatched to another group.", registry=r)
        self.failover_seconds = Histogram("k2serve_failover_seconds", "Failure detected to first resumed token.",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.tool_calls_per_chain = Histogram("k2serve_tool_calls_per_chain", "Tool calls in a chain turn's history.",
                                              buckets=COUNT_BUCKETS, registry=r)
        # ---- worker groups
        self.queue_depth = Gauge("k2serve_queue_depth", "Sequences waiting for admission.", ["role", "group"], registry=r)
        self.running = Gauge("k2serve_running_sequences", "Sequences running.", ["role", "group"], registry=r)
        self.kv_blocks_used = Gauge("k2serve_kv_blocks_used", "KV cache blocks in use.", ["role", "group"], registry=r)
        self.kv_blocks_free = Gauge("k2serve_kv_blocks_free", "KV cache blocks free or evictable.", ["role", "group"],
                                    registry=r)
        self.prefill_tokens = Counter("k2serve_prefill_tokens_total", "Prompt tokens computed.", ["role", "group"],
                                      registry=r)
        self.decode_tokens = Counter("k2serve_decode_tokens_total", "Tokens decoded.", ["role", "group"], registry=r)
        self.engine_steps = Counter("k2serve_engine_steps_total", "Engine steps (a group's ranks' summed).",
                                    ["role", "group"], registry=r)
        self.preemptions = Counter("k2serve_preempted_sequences_total", "Sequences preempted for KV blocks (recomputed later).",
                                   ["role", "group"], registry=r)
        self.prefix_hit_tokens = Counter("k2serve_prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache.",
                                         ["role", "group"], registry=r)
        self.expert_tokens = Counter("k2serve_expert_tokens_total", "Tokens routed to each expert of each MoE layer.",
                                     ["layer", "expert"], registry=r)
        self.all_to_all_bytes = Counter("k2serve_all_to_all_bytes_total", "Bytes moved by expert-parallel all-to-all.",
                                        ["role", "group"], registry=r)
        self.group_healthy = Gauge("k2serve_worker_group_healthy", "1 if the group serves, 0 if failed.",
                                   ["role", "group"], registry=r)
        self.group_restarts = Counter("k2serve_worker_group_restarts_total", "Groups rebuilt after a failure.",
                                      ["role"], registry=r)
        # The engine's counters by `EngineStats` field: the worker service exports each under its group's labels.
        self.engine_counters: dict[str, Counter] = {"prefill_tokens": self.prefill_tokens,
                                                    "decode_tokens": self.decode_tokens, "steps": self.engine_steps,
                                                    "preemptions": self.preemptions}
        # ---- pool controller: autoscaling
        self.pool_desired_groups = Gauge("k2serve_pool_desired_groups", "Groups the autoscaler wants in the pool.",
                                         ["pool"], registry=r)
        self.pool_ready_groups = Gauge("k2serve_pool_ready_groups", "Groups of the pool serving (not starting or "
                                       "draining).", ["pool"], registry=r)
        self.pool_draining_groups = Gauge("k2serve_pool_draining_groups", "Groups finishing their running turns "
                                          "before scale-down removes them.", ["pool"], registry=r)
        self.autoscale_decisions = Counter("k2serve_autoscale_decisions_total", "Scaling decisions, by pool and "
                                           "direction (up, down).", ["pool", "direction"], registry=r)
        # ---- operator
        self.reconciles = Counter("k2serve_operator_reconciles_total", "Reconciles, by outcome.", ["outcome"], registry=r)
        self.reconcile_seconds = Histogram("k2serve_operator_reconcile_duration_seconds", "Reconcile latency.",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.managed_deployments = Gauge("k2serve_operator_managed_deployments", "K2Deployments this operator manages.",
                                         registry=r)
        for outcome in KV_HANDOFF_OUTCOMES:
            self.kv_handoffs.labels(outcome=outcome)
        for cause in RESUME_CAUSES:
            self.chain_resumes.labels(cause=cause)
        for outcome in RECONCILE_OUTCOMES:
            self.reconciles.labels(outcome=outcome)
        for role in get_args(Role):
            self.group_restarts.labels(role=role)

    def init_requests(self, endpoints: Iterable[str]) -> None:
        """Every endpoint's request series, at 0."""
        for endpoint in endpoints:
            for outcome in REQUEST_OUTCOMES:
                self.requests.labels(endpoint=endpoint, outcome=outcome)

    def init_group(self, role: Role, group: str) -> None:
        """A worker group's series, at 0 (until its first export sets them)."""
        for metric in (self.queue_depth, self.running, self.kv_blocks_used, self.kv_blocks_free, self.prefix_hit_tokens,
                       self.all_to_all_bytes, self.group_healthy, *self.engine_counters.values()):
            metric.labels(role=role, group=group)

    def init_experts(self, moe_layers: Iterable[int], experts: int) -> None:
        """Every (MoE layer, routed expert) series of `expert_tokens`, at 0."""
        for layer in moe_layers:
            for expert in range(experts):
                self.expert_tokens.labels(layer=str(layer), expert=str(expert))

    def serve(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """Serves /metrics on its own port (processes without an HTTP server); returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
