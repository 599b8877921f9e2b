"""A stand-in for the Hugging Face Hub on 127.0.0.1 (its file API, and the write API of create_repo,
create_branch and create_commit, as huggingface_hub calls them), for the tests."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub(http.server.ThreadingHTTPServer):
    """``repos`` are served at main and COMMIT. Repos created or pushed through the write API live in a temporary
    folder, one folder per commit, and are served the same way (by branch or commit). With ``token``, writes
    (and reads of private repos) need ``Authorization: Bearer <token>``, else 401, as on the hub; writes under
    the ``read_only`` owners are answered 403, as the hub answers a token without write access there."""

    def __init__(
        self, repos: dict[str, Path], gated: tuple[str, ...] = (), *, token: str | None = None,
        read_only: tuple[str, ...] = (),
    ) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.repos = repos
        self.gated = gated  # answered as the hub answers a gated repo without an accepted token
        self.token = token
        self.read_only = read_only
        self.requests: list[str] = []
        self.store = Path(tempfile.mkdtemp(prefix="hub-store-"))
        self.refs: dict[str, dict[str, str]] = {repo: {"main": COMMIT} for repo in repos}  # repo -> branch -> commit
        self.commits: dict[tuple[str, str], Path] = {(repo, COMMIT): Path(path) for repo, path in repos.items()}
        self.private: set[str] = set()
        self.pushes: list[dict] = []  # one per commit received: repo, branch, summary, paths, commit
        self.lock = threading.Lock()

    def tree(self, repo_id: str, revision: str = "main") -> tuple[str, Path] | str:
        """The commit and folder that ``revision`` (a branch or a commit) names, or the hub's error code."""
        if repo_id not in self.refs:
            return "RepoNotFound"
        commit = self.refs[repo_id].get(revision, revision)
        folder = self.commits.get((repo_id, commit))
        return (commit, folder) if folder is not None else "RevisionNotFound"

    def commit(self, repo_id: str, branch: str, summary: str, changes: dict[str, bytes | None]) -> str:
        """A new commit on ``branch``: the parent's files, then ``changes`` (path -> content, None deletes)."""
        with self.lock:
            parent = self.refs[repo_id][branch]
            digest = hashlib.sha1(f"{repo_id}\n{parent}\n{summary}\n{len(self.commits)}".encode())
            for path, content in sorted(changes.items()):
                digest.update(path.encode() + b"\0" + (content if content is not None else b"<deleted>"))
            commit = digest.hexdigest()
            folder = self.store / commit
            shutil.copytree(self.commits[(repo_id, parent)], folder)
            for path, content in changes.items():
                target = folder.joinpath(*PurePosixPath(path).parts)
                if content is None:
                    target.unlink(missing_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(content)
            self.commits[(repo_id, commit)] = folder
            self.refs[repo_id][branch] = commit
            self.pushes.append({"repo": repo_id, "branch": branch, "summary": summary, "paths": sorted(changes),
                                "commit": commit})
            return commit

    def server_close(self) -> None:
        super().server_close()
        shutil.rmtree(self.store, ignore_errors=True)


def _git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    """HEAD/GET /{owner}/{name}/resolve/{revision}/{filename}, with the headers huggingface_hub reads; GET
    /api/models/...; and the POSTs of create_repo, create_branch and create_commit."""

    def log_message(self, *args) -> None:
        pass

    def _authorized(self) -> bool:
        return self.server.token is None or self.headers.get("Authorization") == f"Bearer {self.server.token}"

    def _api(self, parts: list[str]) -> None:
        """What snapshot_download and repo_info ask: GET /api/models/{owner}/{name}[/revision/{revision}] (the
        commit), GET /api/models/{owner}/{name}/tree/{revision} (the files)."""
        repo_id = "/".join(parts[2:4])
        if repo_id in self.server.private and not self._authorized():
            self._fail(401, "RepoNotFound")
            return
        kind = parts[4] if len(parts) > 4 else "revision"
        if kind not in ("revision", "tree") or len(parts) == 5:
            self._fail(404, "RepoNotFound")
            return
        found = self.server.tree(repo_id, unquote(parts[5]) if len(parts) > 5 else "main")
        if isinstance(found, str):
            self._fail(404, found)
            return
        commit, repo = found
        files = sorted(p for p in repo.rglob("*") if p.is_file())
        if kind == "revision":
            info = {"id": repo_id, "sha": commit, "private": repo_id in self.server.private,
                    "siblings": [{"rfilename": p.relative_to(repo).as_posix()} for p in files]}
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
        if "/".join(parts[:2]) in self.server.private and not self._authorized():
            self._fail(401, "RepoNotFound")
            return None
        found = self.server.tree("/".join(parts[:2]), unquote(parts[3]))
        if isinstance(found, str):
            self._fail(404, found)
            return None
        commit, repo = found
        path = repo.joinpath(*parts[4:])
        if not path.is_file():
            # as the hub does: with the commit, so that huggingface_hub caches that the file is absent there
            self._fail(404, "EntryNotFound", **{"X-Repo-Commit": commit})
            return None
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        return path

    def _fail(self, status: int, code: str, message: str | None = None, **extra: str) -> None:
        headers = {name: extra.pop(name) for name in list(extra) if name.startswith("X-")}
        body = json.dumps({"error": message or code, **extra}).encode() if message else b""
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message or code)
        self.send_header("Content-Length", str(len(body)))
        if body:
            self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, data: object, status: int = 200) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        self.server.requests.append(f"POST {self.path}")
        parts = [unquote(p) for p in self.path.split("?")[0].strip("/").split("/")]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if parts == ["api", "validate-yaml"]:  # asked before a commit that holds a README.md; no token needed
            self._validate_yaml(json.loads(body)["content"])
            return
        if not self._authorized():
            sent = "Authorization" in self.headers
            self._fail(401, "Unauthorized", "Invalid credentials in Authorization header" if sent
                       else "You must be authenticated to access this resource")
            return
        create = parts == ["api", "repos", "create"]
        owner = json.loads(body).get("organization") if create else parts[2] if len(parts) > 2 else None
        if owner in self.server.read_only:
            self._fail(403, "Forbidden", "You don't have the rights to write in this namespace")
        elif create:
            self._create(json.loads(body))
        elif len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit", "branch"):
            repo_id, action, revision = "/".join(parts[2:4]), parts[4], parts[5]
            if repo_id not in self.server.refs:
                self._fail(404, "RepoNotFound", f"Repository not found: {repo_id}")
            elif action == "branch":
                self._branch(repo_id, revision, json.loads(body or b"{}"))
            elif revision not in self.server.refs[repo_id]:  # a commit goes on a branch
                self._fail(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            elif action == "preupload":
                self._preupload(repo_id, revision, json.loads(body))
            else:
                self._commit(repo_id, revision, body)
        else:
            self._fail(404, "NotFound", f"no route for POST {self.path}")

    def _validate_yaml(self, content: str) -> None:
        """The hub refuses a README.md whose front matter is not a YAML mapping."""
        errors = []
        if content.startswith("---\n"):
            front = content[4:].split("\n---\n", 1)
            try:
                import yaml
            except ImportError:
                yaml = None
            if len(front) < 2:
                errors.append("the metadata block (---) is not closed")
            elif yaml is not None:
                try:
                    if not isinstance(yaml.safe_load(front[0]), dict):
                        errors.append("metadata must be a YAML mapping")
                except yaml.YAMLError as err:
                    errors.append(f"invalid YAML: {err}")
        self._json({"errors": [{"message": e} for e in errors], "warnings": []}, 400 if errors else 200)

    def _create(self, payload: dict) -> None:
        if not payload.get("organization"):  # the stand-in has no users whose namespace a bare name would take
            self._fail(400, "BadRequest", "the stand-in hub needs owner/name")
            return
        repo_id = f"{payload['organization']}/{payload['name']}"
        with self.server.lock:
            if repo_id in self.server.refs:
                # the hub's 409 still gives the url, which create_repo(exist_ok=True) returns
                self._fail(409, "Conflict", "You already created this model repo",
                           url=f"http://{self.headers['Host']}/{repo_id}")
                return
            folder = self.server.store / f"created-{len(self.server.refs)}"
            folder.mkdir()
            commit = hashlib.sha1(f"created {repo_id}".encode()).hexdigest()
            self.server.refs[repo_id] = {"main": commit}
            self.server.commits[(repo_id, commit)] = folder
            if payload.get("visibility") == "private" or payload.get("private"):
                self.server.private.add(repo_id)
        self._json({"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id, "id": commit})

    def _branch(self, repo_id: str, branch: str, payload: dict) -> None:
        refs = self.server.refs[repo_id]
        if branch in refs:
            self._fail(409, "Conflict", f"Reference already exists: refs/heads/{branch}")
            return
        found = self.server.tree(repo_id, payload.get("startingPoint") or "main")
        if isinstance(found, str):
            self._fail(404, found)
            return
        refs[branch] = found[0]
        self._json({})

    def _preupload(self, repo_id: str, branch: str, payload: dict) -> None:
        """Every file "regular" (its content comes inline in the commit, no LFS), with the oid of the file it
        replaces, so that huggingface_hub leaves out unchanged files."""
        commit, folder = self.server.tree(repo_id, branch)
        files = []
        for item in payload["files"]:
            existing = folder.joinpath(*PurePosixPath(item["path"]).parts)
            oid = _git_oid(existing.read_bytes()) if existing.is_file() else None
            files.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._json({"files": files, "commitOid": commit})

    def _commit(self, repo_id: str, branch: str, body: bytes) -> None:
        """The ndjson of create_commit: a header (summary, description), then one line per file operation."""
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), None)
        if header is None:
            self._fail(400, "BadRequest", "the commit has no header line")
            return
        changes: dict[str, bytes | None] = {}
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                continue
            path = PurePosixPath(value["path"])
            if path.is_absolute() or ".." in path.parts:
                self._fail(400, "BadRequest", f"invalid path {value['path']!r}")
                return
            if key == "file" and value.get("encoding") == "base64":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                changes[value["path"]] = None
            else:  # lfsFile: never asked for, preupload answers "regular" for every file
                self._fail(400, "BadRequest", f"the stand-in hub takes no {key} operations")
                return
        commit = self.server.commit(repo_id, branch, header["summary"], changes)
        self._json({"success": True, "commitOid": commit, "pullRequestUrl": None,
                    "commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{commit}"})

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
