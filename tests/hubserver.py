"""A stand-in for the Hugging Face Hub on 127.0.0.1 (its file API, as huggingface_hub calls it), for the tests."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import threading
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub(http.server.ThreadingHTTPServer):
    def __init__(self, repos: dict[str, Path], gated: tuple[str, ...] = ()) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.repos = repos
        self.gated = gated  # answered as the hub answers a gated repo without an accepted token
        self.requests: list[str] = []


class Handler(http.server.BaseHTTPRequestHandler):
    """HEAD/GET /{owner}/{name}/resolve/{revision}/{filename}, with the headers huggingface_hub reads."""

    def log_message(self, *args) -> None:
        pass

    def _api(self, parts: list[str]) -> None:
        """What snapshot_download asks first: GET /api/models/{owner}/{name}/revision/{revision} (the commit),
        then GET /api/models/{owner}/{name}/tree/{commit} (the files)."""
        repo = self.server.repos.get("/".join(parts[2:4]))
        if repo is None or len(parts) < 6:
            self._fail(404, "RepoNotFound")
            return
        files = sorted(p for p in repo.rglob("*") if p.is_file())
        if parts[4] == "revision":
            info = {"id": "/".join(parts[2:4]), "sha": COMMIT, "siblings": [{"rfilename": p.relative_to(repo).as_posix()} for p in files]}
        else:
            info = [
                {"type": "file", "path": p.relative_to(repo).as_posix(), "size": p.stat().st_size,
                 "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                for p in files
            ]
        body = json.dumps(info).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _file(self) -> Path | None:
        parts = self.path.split("?")[0].strip("/").split("/")
        self.server.requests.append(f"{self.command} {self.path}")
        if parts[:2] == ["api", "models"] and self.command == "GET":
            self._api(parts)
            return None
        if len(parts) < 5 or parts[2] != "resolve":
            self._fail(404, "RepoNotFound")
            return None
        if "/".join(parts[:2]) in self.server.gated:
            self._fail(403, "GatedRepo")
            return None
        repo = self.server.repos.get("/".join(parts[:2]))
        if repo is None:
            self._fail(404, "RepoNotFound")
            return None
        if parts[3] not in ("main", COMMIT):
            self._fail(404, "RevisionNotFound")
            return None
        path = repo.joinpath(*parts[4:])
        if not path.is_file():
            self._fail(404, "EntryNotFound")
            return None
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        return path

    def _fail(self, status: int, code: str) -> None:
        self.send_response(status)
        if code == "EntryNotFound":  # as the hub does: huggingface_hub then caches that the file is absent
            self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802
        self._file()

    def do_GET(self) -> None:  # noqa: N802
        path = self._file()
        if path is not None:
            self.wfile.write(path.read_bytes())


class Silent:
    """A server that accepts connections and never answers (a firewall that drops the replies): it counts them."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:  # closed
                return
            self.connections.append(connection)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def close(self) -> None:
        self.socket.close()
        for connection in self.connections:
            connection.close()


def hub_env(endpoint: str, home: Path, offline: bool = False) -> dict[str, str]:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_TOKEN", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env
