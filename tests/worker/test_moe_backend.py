"""The engine's MoE backend: the Triton kernel exactly when the model runs on CUDA and CUDA is available.

Choosing the Triton path imports triton, which would fix the interpreter setting for every later test module
in this pytest process, so the selection runs in a child process (this file run as a script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("available", [False, True])
def test_triton_exactly_when_cuda_runs_the_model(chosen: dict[str, str], device: str, available: bool) -> None:
    expected = (
        "k2serve.worker.quant.triton_moe.fused_moe"
        if device == "cuda" and available
        else "k2serve.worker.quant.moe.reference_moe"
    )
    assert chosen[f"{device}|{available}"] == expected


if __name__ == "__main__":
    print(json.dumps(_child()))
