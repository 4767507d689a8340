"""Every `x-kubernetes-validations` rule of the generated CRD, compiled and evaluated by a real CEL engine the
way the API server does: on the spec after structural defaulting. The shipped samples pass every rule; for each
rule one invalid spec fails exactly that rule, with its message, and the reconciler's Python twin agrees."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import cel
import pytest
import yaml

from k2serve.operator import spec as s
from k2serve.operator.crd import render_crd

SAMPLES = sorted((Path(__file__).resolve().parents[2] / "manifests/samples").glob("*.yaml"))
SPEC_SCHEMA = render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
RULES = SPEC_SCHEMA["x-kubernetes-validations"]


def defaulted(schema: dict[str, Any], value: Any) -> Any:
    """The API server's defaulting: absent properties that declare a default get it, recursively."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    out = dict(value)
    for name, prop in schema["properties"].items():
        if name not in out and "default" in prop:
            out[name] = copy.deepcopy(prop["default"])
        if name in out:
            out[name] = defaulted(prop, out[name])
    return out


def failing(spec: dict[str, Any]) -> list[str]:
    """Messages of the rules that do not hold for `spec` (as written in a manifest, before defaulting)."""
    self_ = defaulted(SPEC_SCHEMA, spec)
    return [rule["message"] for rule in RULES if cel.evaluate(rule["rule"], {"self": self_}) is not True]


def test_every_rule_compiles_and_names_its_field() -> None:
    assert len(RULES) == len(s.RULES) >= 4
    for rule, py in zip(RULES, s.RULES):
        cel.compile(rule["rule"])
        assert rule["message"].startswith(f"spec.{py.field}:") and rule["fieldPath"] == f".{py.field}"


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_shipped_samples_pass_every_rule(sample: Path) -> None:
    spec = yaml.safe_load(sample.read_text())["spec"]
    assert failing(spec) == []
    s.K2DeploymentSpec.model_validate(spec)


# One invalid spec per rule, in RULES order; each breaks only its own rule.
INVALID: list[tuple[str, dict[str, Any]]] = [
    ("decode.groups", {"decode": {"groups": 0}}),
    ("prefill.expertParallel", {"model": {"experts": 384}, "prefill": {"expertParallel": 7}}),
    ("decode.expertParallel", {"model": {"experts": 16}, "decode": {"expertParallel": 3}}),
    ("prefill.groups", {"prefill": {"groups": 0}, "router": {"aggregated": False}}),
    ("prefill.autoscaling.minGroups", {"prefill": {"autoscaling": {"minGroups": 3, "maxGroups": 2}}}),
    ("decode.autoscaling.minGroups", {"decode": {"autoscaling": {"minGroups": 5}}}),  # over the default max 4
    ("model.source", {"model": {"source": "hf://moonshotai/Kimi-K2-Thinking"}}),  # no PVC to download into
]


def test_one_invalid_spec_per_rule() -> None:
    assert [field for field, _ in INVALID] == [rule.field for rule in s.RULES]


@pytest.mark.parametrize(("field", "spec"), INVALID, ids=[f for f, _ in INVALID])
def test_invalid_spec_fails_its_rule_with_its_message(field: str, spec: dict[str, Any]) -> None:
    rule = next(r for r in RULES if r["fieldPath"] == f".{field}")
    assert failing(spec) == [rule["message"]]
    # The reconciler's twin refuses the same spec with the same words.
    with pytest.raises(ValueError, match=re.escape(rule["message"])):
        s.K2DeploymentSpec.model_validate(spec)


def test_defaults_make_rules_hold_on_an_empty_spec() -> None:
    """`has()` on unset optionals and defaulted sub-objects: an empty spec is valid."""
    assert failing({}) == []
    assert failing({"router": {"aggregated": True}, "prefill": {"groups": 0}}) == []


@pytest.mark.parametrize(("source", "ok"), [
    ("hf://moonshotai/Kimi-K2-Thinking", True), ("hf://moonshotai/Kimi-K2-Thinking@v1.0", True),
    ("hf://org/name@refs/pr/3", True), ("Kimi-K2-Thinking", True), ("builtin:tiny-k2", True),
    ("hf://only-org", False), ("hf://a/b/c", False), ("hf://a/b@", False), ("hf://a/b@../../x", False),
    ("hf://a/b c", False),
])
def test_hub_source_rule_matches_the_download_parser(source: str, ok: bool) -> None:
    """RE2 in the API server and `re` in the reconciler read the one pattern alike."""
    spec = {"model": {"source": source, "pvc": "weights"}}
    assert (failing(spec) == []) is ok
    assert s.RULES[-1].holds(s.K2DeploymentSpec.model_construct(model=s.ModelSpec(source=source, pvc="weights"))) is ok
