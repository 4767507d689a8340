"""keep_freed_memory: a step's freed multi-megabyte tensors serve the next step without faulting pages in again."""

from __future__ import annotations

import subprocess
import sys

# A step-like sequence: float32 and bf16 tensors of 2-8 MB, some freed while others are made; page faults per
# step counted after three warm-up steps.
PROBE = """
import resource, sys, torch
from k2serve.worker.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None

def step():
    a = torch.empty(7600, 256).fill_(1.0)
    b = torch.empty(1900, 256).fill_(1.0)
    c = torch.empty(7600, 256, dtype=torch.bfloat16).fill_(1.0)
    d = a[:, :128].clone()
    del a, c
    e = torch.empty(7600, 256).fill_(2.0)
    return float(b.sum() + d.sum() + e.sum())

for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""


def faults_per_step(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


def test_freed_tensors_are_reused_without_page_faults() -> None:
    applied, kept = faults_per_step("keep")
    assert applied == "True"  # glibc, as on every image we build and CI
    assert kept <= 16
    # What the settings are for: with glibc's defaults the same steps fault pages in — how many depends on where
    # glibc's dynamic mmap threshold and heap trimming leave the blocks (281 to 6143 a step in 12 runs here; once,
    # under a full test run, 0), so the best of three runs is what is compared.
    default = max(faults_per_step("default")[1] for _ in range(3))
    assert default >= 100
