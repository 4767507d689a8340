"""`k2serve download`: fetch a model from the Hugging Face Hub (or any server with its URL layout, via
`HF_ENDPOINT`) into a folder the loader reads, once. The operator's download Job runs this in-cluster to fill a
PVC; users run it by hand before `k2serve up --model`.

A source is `hf://ORG/NAME[@REVISION]`. Each revision lands in a folder of its own (`ROOT/ORG/NAME/REVISION`),
so changing the revision downloads next to the old copy instead of mixing files. A `.k2serve-complete` marker
written last says the folder is whole; a rerun finds it and returns at once. Progress (bytes done / total) is
written as JSON to a file and, in-cluster, into a ConfigMap the operator reads for `ModelReady`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HF_SCHEME = "hf://"
# Only what the loader and tokenizer read: no original/ folders, GGUF copies, PyTorch .bin or READMEs.
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tiktoken.model", "tokenizer_config.json", "chat_template.jinja")
COMPLETE_MARKER = ".k2serve-complete"
PROGRESS_KEY = "progress.json"
TOKEN_ENV = "HF_TOKEN"
DEFAULT_REVISION = "main"
# Also the CRD's CEL rule for `spec.model.source` (RE2 there, re here: this pattern means the same in both).
HUB_SOURCE_PATTERN = r"^hf://[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(@[A-Za-z0-9._/-]{1,128})?$"
_SOURCE = re.compile(HUB_SOURCE_PATTERN)


@dataclass(frozen=True)
class HubSource:
    org: str
    name: str
    revision: str = DEFAULT_REVISION

    @classmethod
    def parse(cls, source: str) -> "HubSource":
        if not _SOURCE.fullmatch(source) or ".." in source:
            raise ValueError(f"{source!r}: expected hf://ORG/NAME[@REVISION]")
        repo, _, revision = source.removeprefix(HF_SCHEME).partition("@")
        org, _, name = repo.partition("/")
        return cls(org, name, revision or DEFAULT_REVISION)

    @property
    def repo_id(self) -> str:
        return f"{self.org}/{self.name}"

    @property
    def folder(self) -> str:
        """Relative folder of this revision under the download root (a branch name's slashes flattened)."""
        return f"{self.org}/{self.name}/{self.revision.replace('/', '--')}"


def is_hub_source(source: str) -> bool:
    return source.startswith(HF_SCHEME)


@dataclass(frozen=True)
class Progress:
    bytes_done: int
    bytes_total: int
    done: bool = False

    def to_json(self) -> str:
        return json.dumps({"bytesDone": self.bytes_done, "bytesTotal": self.bytes_total, "done": self.done})

    @classmethod
    def from_json(cls, text: str) -> "Progress":
        d = json.loads(text)
        return cls(int(d["bytesDone"]), int(d["bytesTotal"]), bool(d.get("done", False)))


def _bytes_on_disk(folder: Path, names: set[str]) -> int:
    """Finished files plus the partial ones (`*.incomplete`) huggingface_hub writes under .cache/ meanwhile."""
    done = sum((folder / name).stat().st_size for name in names if (folder / name).is_file())
    return done + sum(p.stat().st_size for p in (folder / ".cache").rglob("*.incomplete") if p.is_file())


def download(source: HubSource, root: Path, *, token: str | None = None, report: Callable[[Progress], None],
             interval_s: float = 2.0) -> Path:
    """Fills ROOT/<source.folder> with the model files of that revision; returns the folder."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    target = root / source.folder
    marker = target / COMPLETE_MARKER
    if marker.is_file():
        report(Progress.from_json(marker.read_text()))
        return target
    info = HfApi(token=token).model_info(source.repo_id, revision=source.revision, files_metadata=True)
    siblings = {s.rfilename: s.size or 0 for s in info.siblings or []}
    wanted = set(filter_repo_objects(list(siblings), allow_patterns=list(MODEL_FILES)))
    if "config.json" not in wanted:
        raise FileNotFoundError(f"{source.repo_id}@{source.revision}: no config.json; not a model repository")
    total = sum(siblings[name] for name in wanted)
    target.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(interval_s):
            report(Progress(min(_bytes_on_disk(target, wanted), total), total))

    poller = threading.Thread(target=poll, name="download-progress", daemon=True)
    poller.start()
    try:
        # Pinned to the commit model_info resolved, so a branch moving mid-download cannot mix two revisions.
        snapshot_download(source.repo_id, revision=info.sha or source.revision, local_dir=target,
                          allow_patterns=list(MODEL_FILES), token=token)
    finally:
        stop.set()
        poller.join()
    missing = [name for name in wanted if not (target / name).is_file()]
    if missing:
        raise RuntimeError(f"{source.repo_id}@{source.revision}: download ended without {sorted(missing)[:5]}")
    final = Progress(total, total, done=True)
    marker.write_text(final.to_json())
    report(final)
    return target


def configmap_reporter(namespace: str, name: str) -> Callable[[Progress], None]:
    """Writes progress into ConfigMap `name` (the operator created it; the Job's Role may patch only it).
    In a pod: its ServiceAccount; elsewhere: $KUBECONFIG."""
    import kubernetes.client
    import kubernetes.config

    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    api = kubernetes.client.CoreV1Api()

    def report(progress: Progress) -> None:
        api.patch_namespaced_config_map(name, namespace, {"data": {PROGRESS_KEY: progress.to_json()}})

    return report


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="k2serve download", description="Download a model's serving files from "
                                 "the Hugging Face Hub (HF_ENDPOINT for a mirror; token from $HF_TOKEN).")
    ap.add_argument("source", help="hf://ORG/NAME[@REVISION]")
    ap.add_argument("--root", default="models", help="download root; the model lands in ROOT/ORG/NAME/REVISION")
    ap.add_argument("--progress-file", help="write progress JSON here as it advances")
    ap.add_argument("--progress-configmap", help="NAMESPACE/NAME: in-cluster, patch progress into this ConfigMap")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between progress reports")
    args = ap.parse_args(argv)
    try:
        source = HubSource.parse(args.source)
    except ValueError as e:
        ap.error(str(e))
    sinks: list[Callable[[Progress], None]] = []
    if args.progress_file:
        path = Path(args.progress_file)
        sinks.append(lambda p: path.write_text(p.to_json()))
    if args.progress_configmap:
        namespace, _, name = args.progress_configmap.partition("/")
        sinks.append(configmap_reporter(namespace, name))

    def report(progress: Progress) -> None:
        for sink in sinks:
            sink(progress)
        print(f"k2serve download: {progress.bytes_done}/{progress.bytes_total} bytes", flush=True)

    try:
        folder = download(source, Path(args.root), token=os.environ.get(TOKEN_ENV) or None, report=report,
                          interval_s=args.interval)
    except Exception as e:  # one line for the Job's log and termination message, not a traceback
        print(f"k2serve download: {source.repo_id}@{source.revision}: {e}", file=sys.stderr)
        return 1
    print(f"k2serve download: {folder} complete", flush=True)
    return 0
