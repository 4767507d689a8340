"""Triton work runs in a child process: TRITON_INTERPRET is read once, at `import triton`, so each test file
that needs its own setting runs itself as a script and reports JSON on its last stdout line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def run_script_report(script: str, *, interpret: bool, timeout_s: float) -> Any:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
