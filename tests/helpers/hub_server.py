"""A Hugging Face Hub stand-in on 127.0.0.1 for download tests: serves one model folder in the Hub's URL layout
(the repo-info API with file sizes, and `resolve/REVISION/FILE` with commit and ETag headers), answers only
requests that carry the expected bearer token, and records every request."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Hub:
    url: str
    repo_id: str
    revisions: dict[str, str]  # revision name -> commit sha
    requests: list[str] = field(default_factory=list)


def _commit(revision: str) -> str:
    return hashlib.sha1(revision.encode()).hexdigest()


@contextmanager
def serve_hub(folder: Path, repo_id: str, token: str, revisions: tuple[str, ...] = ("main",)) -> Iterator[Hub]:
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    commits = {rev: _commit(rev) for rev in revisions}
    by_commit = {sha: rev for rev, sha in commits.items()}
    hub = Hub(url="", repo_id=repo_id, revisions=commits)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _revision(self, rev: str) -> str | None:
            return commits.get(rev) and rev or by_commit.get(rev)

        def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _handle(self, head: bool) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append(f"{self.command} {path}")
            if self.headers.get("Authorization") != f"Bearer {token}":
                return self._send(401, b'{"error":"Invalid credentials"}', {"Content-Type": "application/json"}, head)
            info_prefix, resolve_prefix = f"/api/models/{repo_id}/revision/", f"/{repo_id}/resolve/"
            tree_prefix = f"/api/models/{repo_id}/tree/"
            if path.startswith(tree_prefix) and self._revision(path[len(tree_prefix):]):
                tree = [{"type": "file", "path": name, "size": p.stat().st_size,
                         "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for name, p in files.items()]
                return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head)
            if path.startswith(info_prefix) and (rev := self._revision(path[len(info_prefix):])):
                siblings = [{"rfilename": name, "size": p.stat().st_size} for name, p in files.items()]
                body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": commits[rev], "private": False,
                                   "siblings": siblings}).encode()
                return self._send(200, body, {"Content-Type": "application/json"}, head)
            if path.startswith(resolve_prefix):
                rev_name, _, name = path[len(resolve_prefix):].partition("/")
                if (rev := self._revision(rev_name)) and name in files:
                    data = files[name].read_bytes()
                    return self._send(200, data, {"X-Repo-Commit": commits[rev],
                                                  "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                                  "Content-Type": "application/octet-stream"}, head)
            return self._send(404, b'{"error":"not found"}', {"Content-Type": "application/json",
                                                              "X-Error-Code": "EntryNotFound"}, head)

        def do_GET(self) -> None:
            self._handle(head=False)

        def do_HEAD(self) -> None:
            self._handle(head=True)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
