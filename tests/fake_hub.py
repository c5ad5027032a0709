"""A stand-in for the Hugging Face hub on a loopback port: the few endpoints `snapshot_download`
(and so `hf download`) uses (a repo's revision, its file tree, each file's HEAD and GET), serving
local directories as repos. Tests point HF_ENDPOINT at it, so the real download code runs and no
test reaches the hub.

`refuse_files`: the repo is listed but every file's GET fails (403) before a byte is sent.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """`FakeHub(repo_id, directory)`, or `FakeHub(repos={repo_id: directory, ...})`."""

    def __init__(self, repo_id: str | None = None, directory: Path | None = None, *, refuse_files: bool = False,
                 repos: dict | None = None):
        repos = dict(repos or {}) | ({repo_id: directory} if repo_id else {})
        trees = {repo: {path.name: path.read_bytes() for path in Path(folder).iterdir() if path.is_file()}
                 for repo, folder in repos.items()}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                hub.requests.append(f"{self.command} {self.path}")

            def reply(self, status: int, body: bytes, headers: dict, send_body: bool = True) -> None:
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def repo(self, prefix: str = "/") -> tuple[str | None, str]:
                """The repo a path names (after `prefix`), and the rest of the path."""
                for repo in trees:
                    if self.path.startswith(f"{prefix}{repo}/"):
                        return repo, self.path[len(prefix) + len(repo) + 1:]
                return None, ""

            def file(self) -> bytes | None:
                repo, rest = self.repo()
                if repo is None or not rest.startswith("resolve/"):
                    return None
                return trees[repo].get(rest.split("?")[0].split("/", 2)[-1])

            def do_HEAD(self) -> None:
                self.send_file(send_body=False)

            def send_file(self, send_body: bool) -> None:
                data = self.file()
                if data is None:
                    return self.reply(404, b"", {"X-Error-Code": "EntryNotFound"}, send_body)
                if refuse_files and send_body:
                    return self.reply(403, b'{"error": "refused"}', {"Content-Type": "application/json"})
                self.reply(200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'},
                           send_body)

            def do_GET(self) -> None:
                repo, rest = self.repo("/api/models/")
                files = trees.get(repo, {})
                if repo and rest.startswith("tree/"):
                    tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                            for name, data in files.items()]
                    return self.reply(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
                if repo and rest.startswith("revision/"):
                    info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": name} for name in files]}
                    return self.reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
                if self.path.startswith("/api/"):
                    return self.reply(404, b'{"error": "Repository not found"}',
                                      {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound"})
                self.send_file(send_body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
