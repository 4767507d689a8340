"""The operator's Schedulable verdict on the shipped samples and on specs that cannot fit or cannot be judged."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from k2serve.operator.capacity_gate import check_capacity, model_name
from k2serve.operator.spec import K2DeploymentSpec

SAMPLES = Path(__file__).resolve().parents[2] / "manifests/samples"
KIMI = yaml.safe_load((SAMPLES / "kimi-k2-thinking.yaml").read_text())["spec"]
TINY = yaml.safe_load((SAMPLES / "tiny-k2.yaml").read_text())["spec"]


def kimi(product: str | None = None, ep: int | None = None, **top: Any) -> K2DeploymentSpec:
    spec = copy.deepcopy(KIMI)
    if product is not None:
        spec["nodeSelector"] = {"nvidia.com/gpu.product": product} if product else {}
    for pool in ("prefill", "decode"):
        spec[pool]["expertParallel"] = ep or spec[pool]["expertParallel"]
    return K2DeploymentSpec.model_validate({**spec, **top})


@pytest.mark.parametrize("sample", [KIMI, TINY], ids=["kimi-k2-thinking", "tiny-k2"])
def test_shipped_samples_fit(sample: dict[str, Any]) -> None:
    verdict = check_capacity(K2DeploymentSpec.model_validate(sample))
    assert (verdict.fits, verdict.reason) == (True, "Fits"), verdict.message


@pytest.mark.parametrize(("product", "ep", "fits"), [
    ("NVIDIA-H100-80GB-HBM3", 8, False), ("NVIDIA-H100-80GB-HBM3", 16, False),
    ("NVIDIA-H200", 8, True), ("NVIDIA-H200", 16, True),
])
def test_k2_thinking_by_gpu_and_ep(product: str, ep: int, fits: bool) -> None:
    verdict = check_capacity(kimi(product, ep))
    assert verdict.fits is fits, verdict.message
    if not fits:
        assert verdict.reason == "InsufficientMemory"
        assert "per device but only 85.5 GB is available" in verdict.message and "prefill" in verdict.message


def test_gpu_memory_field_overrides_the_node_label() -> None:
    assert check_capacity(kimi("NVIDIA-H200", 8, gpuMemory="80Gi")).fits is False
    assert check_capacity(kimi("", 8, gpuMemory="141Gi")).fits is True


def test_unknown_model_or_device_is_not_judged() -> None:
    unknown_gpu = check_capacity(kimi("Tesla-T4"))
    assert (unknown_gpu.fits, unknown_gpu.reason) == (None, "UnknownDeviceMemory")
    spec = copy.deepcopy(KIMI)
    spec["model"]["source"] = "some-other-model"
    other = check_capacity(K2DeploymentSpec.model_validate(spec))
    assert (other.fits, other.reason) == (None, "UnknownModel") and "kimi-k2-thinking" in other.message


def test_model_names() -> None:
    assert model_name("hf://moonshotai/Kimi-K2-Thinking@v2") == "kimi-k2-thinking"
    assert model_name("Kimi-K2-Thinking") == model_name("/models/Kimi-K2-Thinking/") == "kimi-k2-thinking"
    assert model_name("builtin:tiny-k2") == "tiny-k2"
