"""The engine's MoE backend: the Triton kernel exactly when the model runs on CUDA and CUDA is available,
torch's CPU int4 GEMM otherwise.

Choosing the Triton path imports triton, which would fix the interpreter setting for every later test module
in this pytest process, so the selection runs in a child process (this file run as a script)."""

from __future__ import annotations

import json

import pytest

DEVICES = ("cpu", "cuda")


def _child() -> dict[str, str]:
    """'<device>|cuda_available=<bool>' -> qualified name of the chosen backend."""
    from unittest import mock

    import torch

    from k2serve.worker.quant.moe import select_moe_backend

    chosen = {}
    for available in (False, True):
        with mock.patch.object(torch.cuda, "is_available", return_value=available):
            for device in DEVICES:
                f = select_moe_backend(torch.device(device))
                chosen[f"{device}|{available}"] = f"{f.__module__}.{f.__qualname__}"
    return chosen


@pytest.fixture(scope="module")
def chosen() -> dict[str, str]:
    from helpers.child import run_script_report  # not at the top: this file also runs as a plain script

    return run_script_report(__file__, interpret=False, timeout_s=120)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("available", [False, True])
def test_triton_exactly_when_cuda_runs_the_model(chosen: dict[str, str], device: str, available: bool) -> None:
    expected = (
        "k2serve.worker.quant.triton_moe.fused_moe"
        if device == "cuda" and available
        else "k2serve.worker.quant.cpu_int4.cpu_int4_moe"
    )
    assert chosen[f"{device}|{available}"] == expected


if __name__ == "__main__":
    print(json.dumps(_child()))
