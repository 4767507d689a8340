"""The router pod's process (`python -m k2serve.router.process`), started as the operator starts it: it serves
without loading torch or any worker-plane module (Python's `-X importtime` lists every module it imports)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", re.M)


def test_router_process_serves_without_torch_or_the_worker_plane(tmp_path: Path) -> None:
    config = tmp_path / "serving.json"
    config.write_text(json.dumps({"router": {"http_port": 0},
                                  "chain_store": {"sqlite_path": str(tmp_path / "chains.sqlite3")}}))
    env = {**os.environ, "K2SERVE_CACHE": str(tmp_path / "cache")}  # builds the tiny model's format files afresh
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen([sys.executable, "-P", "-X", "importtime", "-m", "k2serve.router.process",
                                 "--config", str(config), "--group", "g0=both@127.0.0.1:9"],
                                cwd=ROOT, env=env, stdout=o, stderr=e)
    try:
        deadline = time.monotonic() + 60
        while "k2serve router: HTTP" not in out.read_text():
            assert proc.poll() is None, err.read_text()[-4000:]
            assert time.monotonic() < deadline, err.read_text()[-4000:]
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    imported = IMPORT_LINE.findall(err.read_text())
    assert "k2serve.router.core" in imported and "k2serve.k2format.tokenizer" in imported  # the listing is real
    assert [m for m in imported if m == "torch" or m.startswith(("torch.", "k2serve.worker"))] == []
