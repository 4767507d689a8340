"""The CR's router section is the serving config's router model: every `RouterConfig` field a user sets reaches
the ConfigMap the router reads, and nothing is restated by hand."""

from __future__ import annotations

from k2serve.config import RouterConfig
from k2serve.operator import pods
from k2serve.operator.spec import ROUTER_POD_FIELDS, K2DeploymentSpec, RouterSpec

# A value for every user-set field, each unlike its default.
SET = {"httpPort": 8100, "grpcPort": 50100, "routingPolicy": "round_robin", "aggregated": True,
       "servedModelName": "kimi", "requestTimeoutS": 90.0, "stallTimeoutS": 7.5, "maxReasoningTokens": 512,
       "limits": {"maxMessages": 16, "defaultMaxTokens": 100}}


def test_every_router_config_field_is_in_the_crd_but_the_pod_set_ones() -> None:
    assert set(RouterConfig.model_fields) - set(RouterSpec.model_fields) == ROUTER_POD_FIELDS
    for name in set(RouterConfig.model_fields) - ROUTER_POD_FIELDS - {"http_port", "grpc_port"}:
        assert RouterSpec.model_fields[name].description == RouterConfig.model_fields[name].description


def test_every_router_field_reaches_the_serving_config() -> None:
    spec = K2DeploymentSpec.model_validate({"router": {**SET, "apiKeySecret": {"name": "keys", "key": "k"}}})
    router = pods.serving_config(spec).router
    defaults = RouterConfig()
    assert {n for n in RouterConfig.model_fields if getattr(router, n) != getattr(defaults, n)} == \
        set(RouterConfig.model_fields)  # every field set, so none was dropped on the way
    assert router.stall_timeout_s == 7.5 and router.routing_policy == "round_robin" and router.grpc_port == 50100
    assert router.limits.max_messages == 16 and router.limits.default_max_tokens == 100  # nested, camelCase in the CR
    assert router.host == "0.0.0.0" and router.api_keys_file == f"{pods.API_KEYS_DIR}/k"
