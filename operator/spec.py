"""The K2Deployment custom resource as pydantic models: the CRD's OpenAPI schema is generated from these
(crd.py) and the reconciler validates every spec with them, so one definition serves both.

Serving knobs reuse `k2serve.config` models (subclassed only to present camelCase to Kubernetes); what exists
only on Kubernetes (resources, Secrets, scheduling) is defined here.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import copy
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic.alias_generators import to_camel

from k2serve.config import AutoscalingConfig, ChainStoreConfig, ModelSource, PoolConfig, RouterConfig
from k2serve.download import HUB_SOURCE_PATTERN, HubSource, is_hub_source

GROUP = "k2serve.io"
VERSION = "v1alpha1"
KIND = "K2Deployment"
PLURAL = "k2deployments"
SINGULAR = "k2deployment"
SHORT_NAMES = ("k2d",)

# Ports are part of the contract with the router module; they are spec fields with these defaults.
HTTP_PORT = 8000
GRPC_PORT = 50051

_CAMEL = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class _K8s(BaseModel):
    model_config = _CAMEL


class SecretKeyRef(_K8s):
    name: str = Field(min_length=1, max_length=253, description="Secret in the K2Deployment's namespace.")
    key: str = Field(min_length=1, max_length=253, description="Key inside the Secret.")


class Resources(_K8s):
    """Kubernetes ResourceRequirements (quantities as strings, e.g. `"4"`, `"64Gi"`, `"8"` for nvidia.com/gpu)."""

    requests: dict[str, str] = Field(default_factory=dict)
    limits: dict[str, str] = Field(default_factory=dict)


class Toleration(_K8s):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class ModelSpec(ModelSource):
    model_config = _CAMEL
    experts: int | None = Field(
        None, ge=1, description="Routed experts per MoE layer, when known (384 for Kimi K2); EP must divide it."
    )
    pvc: str | None = Field(None, description="PersistentVolumeClaim mounted read-only at /models holding `source`; "
                            "for an `hf://` source the operator's download Job fills it first.")
    hf_token_secret: SecretKeyRef | None = Field(None, description="Secret key holding a Hugging Face token, for "
                                                 "gated or private `hf://` sources.")


class AutoscalingSpec(AutoscalingConfig):
    """The pool controller's autoscaling, spelled for the CR. It owns the pool's group count: the `/scale`
    subresource (and an HPA on it) sets `decode.groups`, which then only gives the starting count."""

    model_config = _CAMEL

    @model_validator(mode="after")
    def _range(self) -> "AutoscalingSpec":
        return self  # min ≤ max is a spec RULE here: CEL in the API server, the same words in the reconciler


class PoolSpec(PoolConfig):
    model_config = _CAMEL
    autoscaling: AutoscalingSpec | None = Field(
        None, description="Scale this pool's groups on load (the pool controller decides, the operator sizes the "
        "worker pods to it); None: `groups` is fixed. Excludes an HPA on the scale subresource.")
    resources: Resources = Field(default_factory=Resources, description="Per worker pod (one Ray actor each).")
    shm_size: str = Field("1Gi", description="Size of the /dev/shm tmpfs of each worker pod.")


_K8S_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # an RFC 1123 label: a Service's or a Gateway's name


class EndpointPickerSpec(_K8s):
    """The Endpoint Picker extension (EPP) Service the InferencePool names (Gateway API Inference Extension v1)."""

    name: str = Field(min_length=1, max_length=63, pattern=_K8S_NAME, description="The EPP's Service.")
    port_number: int = Field(9002, ge=1, le=65535, description="The EPP Service's gRPC ext-proc port.")
    failure_mode: Literal["FailOpen", "FailClose"] = Field(
        "FailClose", description="What the Gateway does when the EPP does not answer: FailOpen sends the request to "
        "a router of its choice, FailClose refuses it.")


class GatewaySpec(_K8s):
    """Exposure through a Gateway API Gateway: an InferencePool (inference.networking.k8s.io/v1) of the router pods
    and an HTTPRoute (gateway.networking.k8s.io/v1) from the Gateway to it, for the OpenAI API (`/v1`) only."""

    name: str = Field(min_length=1, max_length=253, description="The Gateway (gateway.networking.k8s.io) to attach to.")
    namespace: str | None = Field(None, min_length=1, max_length=63, pattern=_K8S_NAME, description="The Gateway's "
                                  "namespace; default: the K2Deployment's (another needs the Gateway to allow it).")
    section_name: str | None = Field(None, min_length=1, max_length=253, description="The Gateway listener to "
                                     "attach to; default: every listener that accepts the route.")
    hostnames: list[str] = Field(default_factory=list, max_length=16, description="Host headers the route matches; "
                                 "empty: every host the listener accepts.")
    endpoint_picker: EndpointPickerSpec = Field(description="The EPP the InferencePool uses to pick a router pod.")


# RouterConfig fields the operator sets for the pod (listen address, the mounted API-key file) instead of the user.
ROUTER_POD_FIELDS = frozenset({"host", "api_keys_file"})


def _camel_cased(annotation: Any) -> Any:
    """A nested serving-config model as the CR spells it (camelCase, like every other CR field); others as given."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return type(f"{annotation.__name__}Spec", (annotation,), {"model_config": _CAMEL, "__module__": __name__})
    return annotation


def _router_spec() -> type[_K8s]:
    """The CR's router section: every `RouterConfig` field (descriptions, bounds, defaults) but the pod-set ones,
    with fixed ports (a Service needs them), plus what exists only on Kubernetes."""
    fields: dict[str, Any] = {name: (_camel_cased(f.annotation), copy(f))
                              for name, f in RouterConfig.model_fields.items() if name not in ROUTER_POD_FIELDS}
    fields |= {
        "replicas": (int, Field(2, ge=1, le=64, description="Router Deployment replicas.")),
        "image": (str | None, Field(None, description="Router pod image (e.g. the slim ghcr.io/k2serve/k2serve-router); "
                                    "default: spec.image.")),
        "http_port": (int, Field(HTTP_PORT, ge=1, le=65535, description="OpenAI-compatible HTTP and /metrics.")),
        "grpc_port": (int, Field(GRPC_PORT, ge=1, le=65535, description="Router gRPC API.")),
        "api_key_secret": (SecretKeyRef | None,
                           Field(None, description="Secret key holding bearer API keys, one a line.")),
        "resources": (Resources, Field(default_factory=Resources)),
        "gateway": (GatewaySpec | None, Field(None, description="Expose the routers through this Gateway API "
                                              "Gateway (an InferencePool and an HTTPRoute); default: a Service only.")),
    }
    return create_model("RouterSpec", __base__=_K8s, __module__=__name__, **fields)


RouterSpec = _router_spec()


class ChainStoreSpec(ChainStoreConfig):
    model_config = _CAMEL
    pvc: str | None = Field(None, description="PersistentVolumeClaim for the sqlite file, mounted at /var/lib/k2serve.")
    redis_url_secret: SecretKeyRef | None = Field(None, description="Secret key holding the redis URL.")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> "ChainStoreSpec":
        # Replaces the parent check: on Kubernetes the URL normally comes from a Secret.
        if self.backend == "redis" and not (self.redis_url or self.redis_url_secret):
            raise ValueError("chainStore.redisUrlSecret (or redisUrl) is required when chainStore.backend is 'redis'")
        return self


class GcsFaultTolerance(_K8s):
    redis_address: str = Field(min_length=1, description="host:port of an HA Redis for the Ray GCS.")
    redis_password_secret: SecretKeyRef | None = None


class RaySpec(_K8s):
    image: str | None = Field(None, description="Ray pod image; default: spec.image.")
    ray_version: str = "2.60.0"
    head_resources: Resources = Field(default_factory=Resources)
    gcs_fault_tolerance: GcsFaultTolerance | None = None


class K2DeploymentSpec(_K8s):
    image: str = Field("ghcr.io/k2serve/k2serve:0.1.0", min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    model: ModelSpec = Field(default_factory=ModelSpec)
    prefill: PoolSpec = Field(default_factory=PoolSpec)
    decode: PoolSpec = Field(default_factory=PoolSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    chain_store: ChainStoreSpec = Field(default_factory=ChainStoreSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    deterministic: bool = False
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: dict[str, Any] | None = Field(None, description="A Kubernetes Affinity, applied to every pod.")
    priority_class_name: str | None = None
    gpu_memory: str | None = Field(None, description="Memory of one GPU (a quantity, e.g. `80Gi`) for the capacity "
                                   "check; default: from nodeSelector `nvidia.com/gpu.product`.")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "K2DeploymentSpec":
        broken = [f"spec.{rule.field}: {rule.message}" for rule in RULES if not rule.holds(self)]
        if broken:
            raise ValueError("; ".join(broken))
        return self


@dataclass(frozen=True)
class Rule:
    """One cross-field rule, stated once as CEL (enforced by the API server) and once in Python (enforced by
    the reconciler, and by tests where no API server runs)."""

    field: str
    cel: str
    message: str
    holds: Callable[[K2DeploymentSpec], bool]


def _divides(ep: int, experts: int | None) -> bool:
    return experts is None or experts % ep == 0


def _hub_source_ok(s: K2DeploymentSpec) -> bool:
    if not is_hub_source(s.model.source):
        return True
    try:
        HubSource.parse(s.model.source)
    except ValueError:
        return False
    return s.model.pvc is not None


RULES: tuple[Rule, ...] = (
    Rule("decode.groups", "self.decode.groups >= 1", "decode needs at least one group", lambda s: s.decode.groups >= 1),
    Rule(
        "prefill.expertParallel",
        "!has(self.model.experts) || self.model.experts % self.prefill.expertParallel == 0",
        "expert parallelism must divide model.experts",
        lambda s: _divides(s.prefill.expert_parallel, s.model.experts),
    ),
    Rule(
        "decode.expertParallel",
        "!has(self.model.experts) || self.model.experts % self.decode.expertParallel == 0",
        "expert parallelism must divide model.experts",
        lambda s: _divides(s.decode.expert_parallel, s.model.experts),
    ),
    Rule(
        "prefill.groups",
        "self.router.aggregated || self.prefill.groups >= 1",
        "disaggregated serving needs at least one prefill group (or router.aggregated: true)",
        lambda s: s.router.aggregated or s.prefill.groups >= 1,
    ),
    *(Rule(f"{pool}.autoscaling.minGroups",
           f"!has(self.{pool}.autoscaling) || self.{pool}.autoscaling.minGroups <= self.{pool}.autoscaling.maxGroups",
           "must not exceed autoscaling.maxGroups",
           lambda s, pool=pool: (a := getattr(s, pool).autoscaling) is None or a.min_groups <= a.max_groups)
      for pool in ("prefill", "decode")),
    Rule(
        "model.source",
        "!self.model.source.startsWith('hf://') || (has(self.model.pvc) && !self.model.source.contains('..') && "
        "self.model.source.matches('" + HUB_SOURCE_PATTERN + "'))",
        "an hf:// source is hf://ORG/NAME[@REVISION] and needs model.pvc to download into",
        _hub_source_ok,
    ),
)


class Condition(_K8s):
    type: Literal["Ready", "Progressing", "Degraded", "ModelReady", "Schedulable", "ImageAllowed"]
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class ScaleDecisionStatus(_K8s):
    at: str = Field(description="When the pool controller decided, RFC 3339 UTC.")
    from_groups: int = Field(ge=0)
    to_groups: int = Field(ge=0)
    signal: str = Field(description="The signal that asked for it: queue_depth, running, kv_use, ttft or range.")
    reason: str


class PoolStatus(_K8s):
    ready: int = Field(0, ge=0, description="Groups whose every worker pod is ready.")
    desired: int = Field(0, ge=0, description="Groups wanted: `groups`, or with autoscaling the pool controller's "
                         "count.")
    readiness: str = Field("0/0", description="`ready/desired`, for the printer columns.")
    last_scale_decision: ScaleDecisionStatus | None = Field(None, description="The autoscaler's last decision.")


Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Invalid"]


class ModelStatus(_K8s):
    path: str | None = Field(None, description="Where workers read the model (an `hf://` source's revision folder).")
    bytes_done: int = Field(0, ge=0, description="Downloaded bytes of an `hf://` source.")
    bytes_total: int = Field(0, ge=0)


class K2DeploymentStatus(_K8s):
    phase: Phase = "Pending"
    conditions: list[Condition] = Field(default_factory=list)
    prefill: PoolStatus = Field(default_factory=PoolStatus)
    decode: PoolStatus = Field(default_factory=PoolStatus)
    endpoint: str | None = None
    observed_generation: int | None = None
    selector: str | None = Field(None, description="Label selector of the decode worker pods (scale subresource).")
    model: ModelStatus = Field(default_factory=ModelStatus)
