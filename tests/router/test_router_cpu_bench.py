"""bench/router_cpu.py in smoke mode: the stand-in group serves every mode's streams to their full length (the
bench raises on a short stream) and the table has a row per mode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_router_cpu_bench_smoke() -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "bench" / "router_cpu.py"), "--smoke"], capture_output=True,
                          text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows == ["mode", "direct", "via router", "router core"]
    assert "the router's own CPU per routed token" in done.stdout
