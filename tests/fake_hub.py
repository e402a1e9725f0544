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
        return [  # .../resolve/<revision>/<file>
            r.split("/resolve/", 1)[1].partition("/")[2]
            for r in self.requests
            if r.startswith("GET ") and "/resolve/" in r
        ]


def online_env(hub: FakeHub, hf_home: Path) -> dict[str, str | None]:
    """A CLI run's environment that reaches `hub` as the Hugging Face Hub, with its cache in `hf_home`."""
    return {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": None,
        "TRANSFORMERS_OFFLINE": None,
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


@contextmanager
def fake_hub(
    repo_id: str,
    folder: Path,
    extra: dict[str, bytes] | None = None,
    gated: bool = False,
    repo_type: str = "model",
) -> Iterator[FakeHub]:
    """`gated`: the repository answers every request as the hub answers one whose license was not accepted.
    `repo_type` "dataset": a dataset repository (its API under /api/datasets/, its files under /datasets/)."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} | (extra or {})
    api = f"/api/{repo_type}s/{repo_id}"
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
            _, resolve, rest = self.path.partition(f"/{repo_id}/resolve/")
            name = rest.partition("/")[2].split("?")[0]
            if not resolve or name not in files:
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

        def _tree(self) -> list[dict]:
            """The entries under the folder the path names (tree/<revision>[/<folder>]): its files and subfolders, or
            with recursive=true every file below it."""
            where, _, query = self.path.split(f"{api}/tree/", 1)[1].partition("?")
            folder = where.partition("/")[2].strip("/")
            below = {n: b for n, b in files.items() if not folder or n.startswith(folder + "/")}
            entries, folders = [], set()
            for name, body in below.items():
                rest = name[len(folder) + 1 :] if folder else name
                if "/" in rest and "recursive=true" not in query.lower():
                    folders.add((f"{folder}/" if folder else "") + rest.split("/", 1)[0])
                    continue
                entries.append({"type": "file", "path": name, "size": len(body), "oid": hashlib.sha1(body).hexdigest()})
            return entries + [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]

        def do_HEAD(self) -> None:
            if not self._refused():
                self._file(head=True)

        def do_GET(self) -> None:
            if self._refused():
                return
            if self.path.startswith(f"{api}/tree/"):
                self._json(self._tree())
            elif self.path.startswith(api):
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
