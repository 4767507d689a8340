"""`k2serve download` against a Hub stand-in on 127.0.0.1 (HF_ENDPOINT): only the files the loader reads, a
bearer token from the environment, progress to the last byte, one folder per revision, no second download;
then `k2serve up --model` serves what it fetched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
from helpers.hub_server import Hub, serve_hub
from helpers.kmock_cluster import running_emulator
from helpers.up import stop, wait_for_line

from k2serve.download import COMPLETE_MARKER, MODEL_FILES, PROGRESS_KEY, HubSource, Progress
from k2serve.operator.kube import CONFIGMAP
from k2serve.worker.loader import resolve_checkpoint

REPO = "moonshotai/Tiny-K2"
TOKEN = "hf_test_token"


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's folder plus files a Hub repository carries that serving never reads."""
    repo = tmp_path_factory.mktemp("hub") / "repo"
    shutil.copytree(resolve_checkpoint("builtin:tiny-k2"), repo)
    (repo / "README.md").write_text("# Tiny K2\n")
    (repo / "pytorch_model.bin").write_bytes(os.urandom(4096))
    (repo / "original").mkdir()
    (repo / "original" / "consolidated.safetensors.bak").write_bytes(os.urandom(1024))
    return repo


def run_download(hub: Hub, tmp: Path, source: str, token: str = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HOME": str(tmp / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, "-P", "-m", "k2serve.cli", "download", source, "--root", str(tmp / "models"),
                           "--progress-file", str(tmp / "progress.json"), "--interval", "0.01"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_source_parsing() -> None:
    assert HubSource.parse("hf://moonshotai/Kimi-K2-Thinking") == HubSource("moonshotai", "Kimi-K2-Thinking", "main")
    src = HubSource.parse("hf://moonshotai/Kimi-K2-Thinking@refs/pr/3")
    assert src.revision == "refs/pr/3" and src.folder == "moonshotai/Kimi-K2-Thinking/refs--pr--3"
    for bad in ("hf://only-org", "hf://a/b/c", "hf://a/..@x", "s3://a/b", "hf://a/b@", "hf://a/b@../../etc"):
        with pytest.raises(ValueError, match="hf://ORG/NAME"):
            HubSource.parse(bad)


def test_download_fetches_only_serving_files_with_progress(model_repo: Path, tmp_path: Path) -> None:
    with serve_hub(model_repo, REPO, TOKEN, revisions=("main", "v2")) as hub:
        refused = run_download(hub, tmp_path, f"hf://{REPO}", token="wrong")
        assert refused.returncode == 1 and "401" in refused.stderr, refused.stderr
        hub.requests.clear()

        done = run_download(hub, tmp_path, f"hf://{REPO}")
        assert done.returncode == 0, done.stderr
        folder = tmp_path / "models" / REPO / "main"
        expected = {p.name for p in model_repo.iterdir() if p.is_file() and p.name not in
                    ("README.md", "pytorch_model.bin")}
        assert {p.name for p in folder.iterdir() if p.is_file()} == expected | {COMPLETE_MARKER}
        for name in expected:
            assert (folder / name).read_bytes() == (model_repo / name).read_bytes()
        fetched = {r.rsplit("/", 1)[-1] for r in hub.requests if r.startswith("GET /" + REPO)}
        assert fetched == expected  # nothing else crossed the wire
        total = sum((model_repo / name).stat().st_size for name in expected)
        assert Progress.from_json((tmp_path / "progress.json").read_text()) == Progress(total, total, done=True)
        assert f"{total}/{total} bytes" in done.stdout

        hub.requests.clear()  # a rerun (e.g. a restarted Job) finds the marker and downloads nothing
        assert run_download(hub, tmp_path, f"hf://{REPO}").returncode == 0 and hub.requests == []

        assert run_download(hub, tmp_path, f"hf://{REPO}@v2").returncode == 0  # a new revision: its own folder
        assert (tmp_path / "models" / REPO / "v2" / COMPLETE_MARKER).is_file() and (folder / COMPLETE_MARKER).is_file()

        missing = run_download(hub, tmp_path, f"hf://{REPO}@no-such-revision")
        assert missing.returncode == 1 and "no-such-revision" in missing.stderr


def test_progress_reaches_the_operators_configmap(model_repo: Path, tmp_path: Path) -> None:
    """What the Job does in a cluster: progress patched into the ConfigMap the operator reads for ModelReady."""
    with running_emulator(tmp_path) as (cluster, kubeconfig, _), serve_hub(model_repo, REPO, TOKEN) as hub:
        cluster.kube._call("POST", CONFIGMAP.path("default"), body={
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "k2-model-progress", "namespace": "default"}})
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home"),
               "KUBECONFIG": str(kubeconfig)}
        done = subprocess.run([sys.executable, "-P", "-m", "k2serve.cli", "download", f"hf://{REPO}", "--root",
                               str(tmp_path / "models"), "--progress-configmap", "default/k2-model-progress"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        data = cluster.kube.get(CONFIGMAP, "default", "k2-model-progress")["data"]
    total = sum(p.stat().st_size for p in (tmp_path / "models" / REPO / "main").iterdir()
                if p.is_file() and p.name != COMPLETE_MARKER)
    assert Progress.from_json(data[PROGRESS_KEY]) == Progress(total, total, done=True)


def test_patterns_name_what_the_loader_reads() -> None:
    assert {"config.json", "*.safetensors", "model.safetensors.index.json", "tiktoken.model",
            "tokenizer_config.json"} <= set(MODEL_FILES)


def test_up_serves_the_downloaded_model(model_repo: Path, tmp_path: Path) -> None:
    with serve_hub(model_repo, REPO, TOKEN) as hub:
        assert run_download(hub, tmp_path, f"hf://{REPO}").returncode == 0
    folder = tmp_path / "models" / REPO / "main"
    log = tmp_path / "up.log"
    # A Ray of its own: with another local Ray running on the machine, Ray's single-node mode would join it.
    ray_tmp = tempfile.mkdtemp(prefix="k2r")  # short: Ray's unix socket paths live under it
    env = {**os.environ, "K2SERVE_CONFIG": "", "RAY_TMPDIR": ray_tmp}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "k2serve.cli", "up", "--model", str(folder), "--port", "0",
                                 "--chain-store", str(tmp_path / "chains.sqlite3")],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        url = wait_for_line(proc, log, r"serving \S+ at (http://\S+)/v1", 150).group(1)
        with httpx.Client(base_url=url, timeout=60) as client:
            model = client.get("/v1/models").json()["data"][0]["id"]
            body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5,
                    "temperature": 0}
            reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 5, reply.text
    finally:
        stop(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)
