"""A Hugging Face Hub on localhost that serves one model repository, for the paths that start from a hub id.

It answers what huggingface_hub (and through it from_pretrained) asks: the repository's revision (its commit),
its file tree, and HEAD/GET of each file at that commit; or, gated, refuses them all. `extra` adds files the repository holds beside the model
folder's (Meta's repositories carry original/ with a second copy of the weights). Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    endpoint: str
    requests: list[str] = field(default_factory=list)

    def fetched(self) -> list[str]:
        """The files whose contents were downloaded (GET), in order."""
        return [
            r.split(f"/resolve/{COMMIT}/", 1)[1] for r in self.requests if r.startswith("GET ") and "/resolve/" in r
        ]


@contextmanager
def fake_hub(
    repo_id: str, folder: Path, extra: dict[str, bytes] | None = None, gated: bool = False
) -> Iterator[FakeHub]:
    """`gated`: the repository answers every request as the hub answers one whose license was not accepted."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} | (extra or {})
    hub: FakeHub

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            hub.requests.append(f"{self.command} {self.path}")

        def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool = False) -> None:
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, value) -> None:
            self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

        def _file(self, head: bool) -> None:
            name = self.path.split(f"/{repo_id}/resolve/", 1)[1].split("/", 1)[1].split("?")[0]
            if name not in files:
                self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
                return
            body = files[name]
            etag = f'"{hashlib.sha256(body).hexdigest()}"'
            self._send(200, body, {"ETag": etag, "X-Repo-Commit": COMMIT}, head)

        def _refused(self) -> bool:
            if gated:
                why = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
                self._send(
                    401, why.encode(), {"X-Error-Code": "GatedRepo", "X-Error-Message": why}, self.command == "HEAD"
                )
            return gated

        def do_HEAD(self) -> None:
            if not self._refused():
                self._file(head=True)

        def do_GET(self) -> None:
            if self._refused():
                return
            if self.path.startswith(f"/api/models/{repo_id}/tree/"):
                tree = [
                    {"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for n, b in files.items()
                ]
                self._json(tree)
            elif self.path.startswith(f"/api/models/{repo_id}"):
                self._json({"id": repo_id, "sha": COMMIT, "siblings": [{"rfilename": n} for n in files]})
            else:
                self._file(head=False)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hub = FakeHub(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
