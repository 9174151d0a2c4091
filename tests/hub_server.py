"""A small in-process server that speaks the part of the Hugging Face Hub protocol huggingface_hub 2.4 uses.

Enough for `create_repo`, `create_branch`, `create_commit` (regular, base64 uploads: preupload answers
`uploadMode: "regular"`, so neither LFS nor xet is involved), `repo_info`, `list_repo_tree`, `list_repo_refs`,
`hf_hub_download` / `snapshot_download` and transformers' `from_pretrained(repo_id)`. State lives in memory:
per repo, commits (sha -> {path: bytes}) and branches (name -> sha). Errors carry the `X-Error-Code` headers
the client turns into `RepositoryNotFoundError`, `RevisionNotFoundError` and `RemoteEntryNotFoundError`.

Test hooks: `fail_next(pattern, count, status)` answers the next matching requests with an error status;
`drop_next(pattern, count, after_bytes)` sends headers and `after_bytes` of the body, then closes the
connection. Hostile modes, each switched on per request pattern like those: `stall(pattern)` accepts matching
requests and never answers them (until `clear_faults()`); `tamper_next(pattern, change)` sends a file's body
changed by `change(bytes) -> bytes` under the file's own ETag (a body of another length gets a Content-Length to
match, so it is longer or shorter than the file's metadata says); `before_next(pattern, action)` runs `action()`
(e.g. moving a branch) before answering. `put(repo_id, files)` commits straight into the server's state, for
repo contents a client would not upload (a `torch.py`, a name with a NUL byte). Every request is logged in
`requests` (stalled ones in `stalled`); routes the server does not know are logged in `unhandled` and answered
501, so a test can assert that the client used nothing this server only pretends to implement.

huggingface_hub reads `HF_ENDPOINT`, `HF_HOME` and `HF_HUB_OFFLINE` once, at import. `patch_client` repoints
an already imported client (and transformers' shared `HfApi`); `client_env` gives the environment variables
for a fresh subprocess.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import socket
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER = "tester"  # the account every token belongs to; `create_repo("name")` lands in its namespace
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha(content: bytes) -> str:
    """The git object id of a file; the Hub reports it as a regular file's `oid`, and the client compares it
    with its own to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    files: dict[str, bytes]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """A branch name or a full commit sha; None when it is neither."""
        sha = self.branches.get(revision, revision if COMMIT_SHA.match(revision) else None)
        return self.commits.get(sha) if sha else None


class HubError(Exception):
    """An error answer: HTTP status, the `X-Error-Code` header (if any) and a message."""

    def __init__(
        self, status: int, message: str, code: str | None = None, commit: str | None = None, **extra
    ):
        super().__init__(message)
        self.status, self.code, self.commit, self.extra = status, code, commit, extra


@dataclass
class _Fault:
    pattern: re.Pattern
    count: int
    status: int | None = None  # answer this status...
    after_bytes: int | None = None  # ...or send this much of the body, then close the connection...
    stall: bool = False  # ...or never answer...
    change: Callable[[bytes], bytes] | None = None  # ...or send a file's body changed by this...
    action: Callable[[], None] | None = None  # ...or run this first, then answer as usual


class HubServer:
    """The Hub's state and its HTTP front (`url`); start with `serve()`."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.unhandled: list[str] = []
        self.stalled: list[str] = []  # "METHOD /path" of requests left without an answer
        self._faults: list[_Fault] = []
        self._release = threading.Event()  # set: stalled requests give up (their connection closes)
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ---- test hooks ----

    def fail_next(self, pattern: str, count: int = 1, status: int = 500) -> None:
        """Answer the next `count` requests whose "METHOD /path" `re.search`es `pattern` with `status`."""
        with self._lock:
            self._faults.append(_Fault(re.compile(pattern), count, status=status))

    def drop_next(self, pattern: str, count: int = 1, after_bytes: int = 0) -> None:
        """Cut the next `count` matching requests' connections after the headers and `after_bytes` of body."""
        with self._lock:
            self._faults.append(_Fault(re.compile(pattern), count, after_bytes=after_bytes))

    def stall(self, pattern: str, count: int = 10**9) -> None:
        """Accept matching requests and never answer them (until `clear_faults` or `stop`)."""
        with self._lock:
            self._faults.append(_Fault(re.compile(pattern), count, stall=True))

    def tamper_next(self, pattern: str, change: Callable[[bytes], bytes], count: int = 1) -> None:
        """Send the body of the next matching file downloads as `change(body)`, headers (ETag) unchanged but for
        the Content-Length, which fits the new body."""
        with self._lock:
            self._faults.append(_Fault(re.compile(pattern), count, change=change))

    def before_next(self, pattern: str, action: Callable[[], None], count: int = 1) -> None:
        """Run `action()` before answering the next matching requests."""
        with self._lock:
            self._faults.append(_Fault(re.compile(pattern), count, action=action))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._release.set()  # stalled requests end; new ones are answered
            self._release = threading.Event()

    def _take_fault(self, request_line: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.count > 0 and fault.pattern.search(request_line):
                    fault.count -= 1
                    return fault
        return None

    # ---- inspection helpers for tests ----

    def commit_count(self, repo_id: str) -> int:
        return len(self.repos[repo_id].commits)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].resolve(revision).files)

    def head(self, repo_id: str, branch: str = "main") -> Commit:
        return self.repos[repo_id].resolve(branch)

    def put(self, repo_id: str, files: dict[str, bytes | None], branch: str = "main") -> Commit:
        """Commit `files` to `branch` server-side (None deletes a file), as someone else's push would."""
        with self._lock:
            repo = self.repos[repo_id]
            parent = repo.commits[repo.branches[branch]]
            contents = {**parent.files, **files}
            commit = self._new_commit(
                repo, parent, "server-side change", {k: v for k, v in contents.items() if v is not None}
            )
            repo.branches[branch] = commit.sha
            return commit

    # ---- state changes ----

    def _new_commit(self, repo: Repo, parent: Commit | None, title: str, files: dict[str, bytes]) -> Commit:
        # The sha only has to be unique and 40 hex digits; git's own would hash a tree object.
        seed = f"{repo.repo_id}:{parent.sha if parent else ''}:{title}:{next(self._counter)}".encode()
        sha = hashlib.sha1(seed + b"".join(git_blob_sha(v).encode() for v in files.values())).hexdigest()
        date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        commit = Commit(sha, parent.sha if parent else None, title, files, date)
        repo.commits[sha] = commit
        return commit

    def create_repo(self, repo_id: str, private: bool) -> Repo:
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo")
        repo = Repo(repo_id, private)
        # The real Hub starts every repo with one commit holding .gitattributes.
        repo.branches["main"] = self._new_commit(
            repo, None, "initial commit", {".gitattributes": GITATTRIBUTES}
        ).sha
        self.repos[repo_id] = repo
        return repo

    def get_repo(self, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    @staticmethod
    def get_commit(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def commit(self, repo: Repo, branch: str, lines: list[dict]) -> Commit:
        """Apply an NDJSON commit payload (header, file, deletedFile, deletedFolder) to `branch`."""
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        parent = repo.commits[repo.branches[branch]]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, parent.sha):
            raise HubError(412, f"Parent commit {header['parentCommit']} is not the head of {branch}")
        files = dict(parent.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "Only base64-encoded files are supported")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(prefix)}
            else:  # lfsFile needs an LFS store; preupload never asks for one
                raise HubError(400, f"Unsupported commit operation {key!r}")
        # As in git (and on the Hub), a commit that changes nothing is still a commit: skipping it is the
        # client's job.
        commit = self._new_commit(repo, parent, header.get("summary") or "Update", files)
        repo.branches[branch] = commit.sha
        return commit

    # ---- lifecycle ----

    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True).start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


@contextmanager
def serve():
    server = HubServer().start()
    try:
        yield server
    finally:
        server.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every answer has a Content-Length
    hub: HubServer

    def log_message(self, format, *args):  # the request log is `hub.requests`
        pass

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    do_PUT = do_DELETE = do_POST  # not served, but logged in `unhandled` like any unknown route

    # ---- plumbing ----

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, fault: _Fault | None = None):
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.hub.requests.append((self.command, self.path, status))
        if self.command == "HEAD":
            return
        if fault is not None and fault.after_bytes is not None:
            self.wfile.write(body[: fault.after_bytes])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None, fault=None):
        self._send(status, json.dumps(payload).encode(), headers, fault)

    def _dispatch(self):
        url = urlsplit(self.path)
        # Split before unquoting: a revision like "refs%2Fpr%2F1" is one segment.
        parts = [unquote(part) for part in url.path.strip("/").split("/")]
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
        fault = self.hub._take_fault(f"{self.command} {url.path}")
        if fault is not None and fault.status is not None:
            self._json(fault.status, {"error": f"Injected failure {fault.status}"})
            return
        if fault is not None and fault.stall:
            self.hub.stalled.append(f"{self.command} {url.path}")
            self.hub._release.wait()
            self.close_connection = True
            return
        if fault is not None and fault.action is not None:
            fault.action()
        try:
            with self.hub._lock:
                status, payload, headers = self._route(parts, query, body)
        except HubError as error:
            headers = {"X-Error-Message": str(error)}
            if error.code:
                headers["X-Error-Code"] = error.code
            if error.commit:
                headers["X-Repo-Commit"] = error.commit
            self._json(error.status, {"error": str(error), **error.extra}, headers, fault)
            return
        if isinstance(payload, bytes):
            if fault is not None and fault.change is not None and self.command == "GET":
                payload = fault.change(payload)
            self._send(status, payload, headers, fault)
        else:
            self._json(status, payload, headers, fault)

    @property
    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "").startswith("Bearer hf_")

    def _require_token(self):
        if not self._authorized:
            raise HubError(401, "Invalid credentials in Authorization header")

    # ---- routes ----

    def _route(self, parts: list[str], query: dict, body: bytes):
        method, hub = self.command, self.hub
        if parts[:1] == ["api"]:
            rest = parts[1:]
            if method == "POST" and rest == ["repos", "create"]:
                return self._create_repo(json.loads(body))
            if method == "POST" and rest == ["validate-yaml"]:
                return self._validate_yaml(json.loads(body))
            if method == "GET" and rest == ["whoami-v2"]:
                self._require_token()
                return 200, {"type": "user", "name": USER, "orgs": []}, None
            if len(rest) >= 3 and rest[0] == "models":
                repo = hub.get_repo(f"{rest[1]}/{rest[2]}", self._authorized)
                return self._repo_api(repo, method, rest[3:], query, body)
        elif len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            repo = hub.get_repo(f"{parts[0]}/{parts[1]}", self._authorized)
            return self._resolve(repo, parts[3], "/".join(parts[4:]))
        hub.unhandled.append(f"{method} {self.path}")
        raise HubError(501, f"The test Hub server does not implement {method} {self.path}")

    def _create_repo(self, payload: dict):
        self._require_token()
        if payload.get("type", "model") != "model":
            raise HubError(400, "The test Hub server hosts model repos only")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        try:
            self.hub.create_repo(repo_id, private)
        except HubError as error:
            error.extra["url"] = f"{self.hub.url}/{repo_id}"  # the client reads it even from the 409
            raise
        return 200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id}, None

    def _validate_yaml(self, payload: dict):
        content = payload.get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        if match:
            try:
                metadata = yaml.safe_load(match.group(1))
            except yaml.YAMLError as error:
                return 400, {"errors": [{"message": f"Invalid YAML: {error}"}]}, None
            if metadata is not None and not isinstance(metadata, dict):
                return 400, {"errors": [{"message": "The metadata must be a YAML mapping"}]}, None
        return 200, {"warnings": []}, None

    def _repo_api(self, repo: Repo, method: str, rest: list[str], query: dict, body: bytes):
        hub = self.hub
        if method == "GET" and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
            return 200, self._info(repo, hub.get_commit(repo, rest[1] if rest else "main")), None
        if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            commit = hub.get_commit(repo, rest[1])
            recursive = query.get("recursive", "").lower() in ("1", "true")
            return 200, self._tree(commit, "/".join(rest[2:]), recursive), None
        if method == "GET" and rest == ["refs"]:
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                for name, sha in repo.branches.items()
            ]
            return 200, {"branches": branches, "tags": [], "converts": []}, None
        if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
            self._require_token()
            commit = hub.get_commit(repo, rest[1])
            files = [
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha(commit.files[item["path"]]) if item["path"] in commit.files else None,
                }
                for item in json.loads(body)["files"]
            ]
            return 200, {"files": files, "commitOid": commit.sha}, None
        if method == "POST" and len(rest) == 2 and rest[0] == "commit":
            self._require_token()
            if query.get("create_pr"):
                raise HubError(400, "The test Hub server does not do pull requests")
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            commit = hub.commit(repo, rest[1], lines)
            url = f"{hub.url}/{repo.repo_id}/commit/{commit.sha}"
            return (
                200,
                {"success": True, "commitOid": commit.sha, "commitUrl": url, "pullRequestUrl": None},
                None,
            )
        if method == "POST" and len(rest) == 2 and rest[0] == "branch":
            self._require_token()
            branch = rest[1]
            if branch in repo.branches:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            repo.branches[branch] = hub.get_commit(repo, start).sha
            return 200, {}, None
        hub.unhandled.append(f"{method} {self.path}")
        raise HubError(501, f"The test Hub server does not implement {method} {self.path}")

    def _info(self, repo: Repo, commit: Commit) -> dict:
        return {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.date,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }

    def _tree(self, commit: Commit, path: str, recursive: bool) -> list[dict]:
        prefix = f"{path}/" if path else ""
        if path and path not in commit.files and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{path} does not exist", "EntryNotFound", commit=commit.sha)
        entries, folders = [], set()
        for file_path, data in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            below = file_path[len(prefix) :].split("/")
            for depth in range(1, len(below) if recursive else min(2, len(below))):
                folders.add(prefix + "/".join(below[:depth]))
            if recursive or len(below) == 1:
                entries.append(
                    {"type": "file", "path": file_path, "oid": git_blob_sha(data), "size": len(data)}
                )
        entries += [
            {"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0}
            for folder in sorted(folders)
        ]
        return entries

    def _resolve(self, repo: Repo, revision: str, path: str):
        commit = self.hub.get_commit(repo, revision)
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound", commit=commit.sha)
        data = commit.files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{git_blob_sha(data)}"',
            "Accept-Ranges": "bytes",
        }
        if self.command == "HEAD":
            return 200, b"", {**headers, "Content-Length": str(len(data))}
        # The client resumes an interrupted download with "Range: bytes=N-".
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return 206, data[start : end + 1], headers
        return 200, data, headers


def patch_client(monkeypatch, server: HubServer, hf_home: Path, offline: bool = False) -> None:
    """Point an already imported huggingface_hub (and transformers) at `server`, with a cache in `hf_home`.

    huggingface_hub copies `HF_ENDPOINT`/`HF_HOME`/`HF_HUB_OFFLINE` into `constants` at import; functions read
    `constants` at call time, `HfApi()` copies the endpoint when it is made, so the module-level `api` and
    transformers' cached `HfApi` are repointed (transformers' one is reset and rebuilt on its next use).
    """
    import huggingface_hub
    import transformers.utils.hub
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", server.url)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)


def client_env(server: HubServer, hf_home: Path, base: dict | None = None) -> dict:
    """Environment for a subprocess whose huggingface_hub should talk to `server` from its first import."""
    env = {key: value for key, value in (base or {}).items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=server.url,
        HF_HOME=str(hf_home),
        HF_TOKEN="hf_dummy",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    return env
