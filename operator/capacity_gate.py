"""The `Schedulable` verdict: whether each pool's expert-parallel group holds the model plus the KV cache of one
`maxContext` sequence per device, judged by k2serve.capacity before any pod exists. Pure.

The model's shape comes from a config shipped with k2serve, picked by the source's name (`hf://ORG/NAME`,
a PVC folder `NAME`, `builtin:NAME`); a device is a GPU (memory from `spec.gpuMemory`, else from the
`nvidia.com/gpu.product` node selector) or, for CPU pools, the worker pod's memory limit. Where either is
unknown the verdict is Unknown and nothing is blocked.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubernetes.utils.quantity import parse_quantity

from k2serve.capacity import (DEFAULT_RESERVE_BYTES, GIB, GPU_MEMORY, ModelShape, PlanRequest, gpu_for_product,
                              load_config, plan, shipped_configs)
from k2serve.download import HubSource, is_hub_source
from k2serve.operator import pods
from k2serve.operator.spec import K2DeploymentSpec, PoolSpec

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
CPU_RESERVE_BYTES = 1 * GIB  # a CPU worker pod's Python, torch and Ray worker runtime


@dataclass(frozen=True)
class CapacityVerdict:
    fits: bool | None  # None: not judged
    reason: str
    message: str


def model_name(source: str) -> str:
    """`hf://moonshotai/Kimi-K2-Thinking@v1` / `Kimi-K2-Thinking` / `builtin:tiny-k2` -> a shipped config name."""
    if is_hub_source(source):
        return HubSource.parse(source).name.lower()
    return source.removeprefix("builtin:").rstrip("/").rsplit("/", 1)[-1].lower()


def _device(spec: K2DeploymentSpec, pool: PoolSpec) -> tuple[int, int, str] | None:
    """(bytes, reserve, what) of one worker's device, or None when unknown."""
    if pool.num_gpus_per_actor > 0:
        if spec.gpu_memory:
            return int(parse_quantity(spec.gpu_memory)), DEFAULT_RESERVE_BYTES, f"GPU of {spec.gpu_memory}"
        gpu = gpu_for_product(spec.node_selector.get(GPU_PRODUCT_LABEL, ""))
        return (GPU_MEMORY[gpu], DEFAULT_RESERVE_BYTES, gpu) if gpu else None
    memory = pool.resources.limits.get("memory") or pool.resources.requests.get("memory")
    return (int(parse_quantity(memory)), CPU_RESERVE_BYTES, f"CPU pod of {memory}") if memory else None


def _dtype_bytes(spec: K2DeploymentSpec, gpu: bool) -> int:
    dtype = spec.model.dtype
    return 4 if dtype == "float32" or (dtype == "auto" and not gpu) else 2


def check_capacity(spec: K2DeploymentSpec) -> CapacityVerdict:
    name = model_name(spec.model.source)
    if name not in shipped_configs():
        return CapacityVerdict(None, "UnknownModel", f"no shipped config for {spec.model.source!r} (known: "
                               f"{', '.join(shipped_configs())}); capacity not checked")
    config = load_config(name)
    shape = ModelShape.from_config(config)
    quantization = spec.model.quantization
    if quantization == "auto":
        quantization = "int4" if "quantization_config" in config else "bf16"
    verdicts = []
    for pool_name in pods.POOLS:
        pool: PoolSpec = getattr(spec, pool_name)
        if pool.groups == 0:
            continue
        device = _device(spec, pool)
        if device is None:
            return CapacityVerdict(None, "UnknownDeviceMemory", f"{pool_name}: memory of one device unknown (set "
                                   f"spec.gpuMemory or nodeSelector {GPU_PRODUCT_LABEL}); capacity not checked")
        memory, reserve, what = device
        try:
            p = plan(PlanRequest(shape=shape, quantization=quantization, device_memory=memory,
                                 expert_parallel=pool.expert_parallel, max_context=spec.model.max_context,
                                 max_batch_tokens=pool.max_batch_tokens, max_running=pool.max_running,
                                 dtype_bytes=_dtype_bytes(spec, pool.num_gpus_per_actor > 0), reserve=reserve))
        except ValueError as e:
            return CapacityVerdict(False, "InsufficientMemory", f"{pool_name}: {e}")
        if not p.fits:
            return CapacityVerdict(False, "InsufficientMemory", f"{pool_name} ({name} {quantization}, {what}): "
                                   f"{p.verdict()}")
        verdicts.append(f"{pool_name} ({what}): {p.verdict()}")
    return CapacityVerdict(True, "Fits", "; ".join(verdicts))
