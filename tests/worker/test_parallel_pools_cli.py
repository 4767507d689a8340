"""`k2serve pools` as its own Ray driver: `--local` starts a loopback Ray, brings up the configured groups,
prints each as a JSON line, serves their metrics merged on `--metrics-port`, and stops cleanly on SIGINT; a
bad config fails before touching Ray."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import httpx

from k2serve.config import PoolConfig, ServingConfig
from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc


def pools(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "K2SERVE_CONFIG": ""}
    return subprocess.Popen([sys.executable, "-m", "k2serve.cli", "pools", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_pools_local_serves_configured_groups_until_sigint(tmp_path: Path) -> None:
    config = ServingConfig(prefill=PoolConfig(groups=1, expert_parallel=2, num_cpus_per_actor=0.25, kv_blocks=64),
                           decode=PoolConfig(groups=0))
    path = tmp_path / "serving.yaml"
    path.write_text(config.to_yaml())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        metrics_port = sock.getsockname()[1]
    proc = pools("--local", "--config", str(path), "--namespace", "k2serve-cli-test",
                 "--metrics-port", str(metrics_port))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        group = json.loads(line)
        assert (group["group_id"], group["role"], group["world_size"]) == ("prefill-0", "prefill", 2)
        health = pb_grpc.WorkerGroupStub(grpc.insecure_channel(group["address"])).Health(pb.HealthRequest(),
                                                                                         timeout=10)
        assert (health.healthy, health.group_id, health.role) == (True, "prefill-0", "prefill")
        scrape = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
        assert 'k2serve_worker_group_healthy{group="prefill-0",leader="prefill-0",role="prefill"} 1.0' in scrape
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_pools_rejects_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "serving.yaml"
    path.write_text("decode:\n  expert_parallel: 0\n")
    proc = pools("--local", "--config", str(path))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "decode.expert_parallel" in err and str(path) in err
