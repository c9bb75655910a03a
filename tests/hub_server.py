"""A small Hugging Face Hub for tests: the real ``huggingface_hub`` client pushes to it and pulls from it.

No PyPI package serves both push and pull offline, so this module is one: a FastAPI app run by uvicorn
in a background thread on ``127.0.0.1`` (a free port), storing repositories on disk. It speaks the part
of the Hub API that huggingface_hub 2.4.0 calls for ``create_repo``, ``create_branch``,
``create_commit``/``upload_folder``, ``model_info``/``repo_info``, ``list_repo_tree``,
``hf_hub_download`` and ``snapshot_download`` (model repos only):

    HEAD/GET /                                      a reachability probe (sslhub's offline check)
    POST     /api/repos/create                      409 if it exists; the first commit holds .gitattributes
    POST     /api/validate-yaml                     a README.md's front matter must be a YAML mapping
    GET      /api/models/{repo}[/revision/{rev}]    id, sha, private, siblings (with size and blobId)
    GET      /api/models/{repo}/tree/{rev}[/{dir}]  files and folders, ``?recursive=``
    POST     /api/models/{repo}/branch/{branch}     409 if it exists; ``startingPoint`` or main's head
    POST     /api/models/{repo}/preupload/{rev}     "lfs" for *.safetensors, *.bin and files of 10 MB or more,
                                                    as the Hub answers; else "regular": the bytes come inline
                                                    in the commit
    POST     /{repo}.git/info/lfs/objects/batch     git-LFS batch API, basic transfer: an upload href (one use)
                                                    and a verify href per object it lacks, no actions otherwise
    PUT      /lfs-upload/{ticket}                   the object's bytes, streamed to disk, sha256 and size checked
    POST     /{repo}.git/info/lfs/objects/verify    200 if the object is stored with that size
    POST     /api/models/{repo}/commit/{rev}        ndjson: header, file (base64), lfsFile (an uploaded object),
                                                    deletedFile, deletedFolder
    HEAD/GET /{repo}/resolve/{rev}/{path}           X-Repo-Commit, ETag (git blob sha1), Content-Length;
                                                    ``Range: bytes=a-[b]`` answers 206 (download resume);
                                                    an LFS file (the preupload rule) answers 302, as the Hub
                                                    does: X-Linked-Etag (its sha256), X-Linked-Size and
                                                    Location, an absolute URL of the storage below
                                                    (named ``localhost``: another host, as the CDN is)
    HEAD/GET /lfs-files/{repo}/{blob}?path=P        the object's bytes (the Hub's CDN), Range as above

A revision is a branch or a full 40-hex commit sha; branch names with "/" are not supported.
Errors are answered the way the Hub answers them, so the client raises its usual exceptions: an unknown
or hidden repository is 401 (anonymous) or 404 (authenticated) with ``X-Error-Code: RepoNotFound``, an
invalid token 401 "Invalid credentials in Authorization header", an unknown revision or file 404 with
``RevisionNotFound`` / ``EntryNotFound`` (and ``X-Repo-Commit``), a write outside the token's namespace
403, a path with a ``..`` segment (or absolute, or with a backslash) 400.

Storage: ``ROOT/blobs/<git sha1>`` holds file contents once (a committed LFS object too: downloads serve
every file alike, with its git sha1 as ETag); ``ROOT/lfs/ORG/NAME/<sha256>`` holds the LFS objects uploaded
to a repo; ``ROOT/repos/ORG/NAME.json`` holds the repo's visibility, its branches and every commit as a
full snapshot (``{path: blob sha1}``), so any older commit stays downloadable. Access: ``tokens`` maps a
token to a user name; a user writes to its own namespace. An LFS upload href needs no token (like the
Hub's pre-signed storage URLs): its one-use ticket is the credential.

Push switch: ``lfs = False`` makes preupload answer "regular" for every file, as a server without LFS
would: the weights then travel base64-encoded inside the commit request.

Fault switch: ``break_downloads(repo_id, path, times)`` makes the next ``times`` GETs of that file stop
at the file's midpoint and drop the connection after announcing the full Content-Length, as a network
failure would (a resumed request starting past the midpoint gets no bytes at all).

Pointing the client at it: huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``,
``HF_HUB_DISABLE_XET`` … once, into ``huggingface_hub.constants``, when it is first imported — and in a
pytest session it is imported long before this module (timm imports it). ``client_env`` therefore sets
the variables *and* re-executes ``huggingface_hub.constants`` (``importlib.reload``), so every call site,
which reads ``constants.X`` at call time, sees exactly what a fresh process started with that environment
would; on exit it restores both. Subprocesses simply inherit the environment. Nothing in
huggingface_hub is patched: the client talks HTTP to this server.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib
import json
import os
import re
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlencode

import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

SHA = re.compile(r"^[0-9a-f]{40}$")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
LFS_SUFFIXES = (".safetensors", ".bin")  # the patterns of GITATTRIBUTES
LFS_MIN_SIZE = 10_000_000  # the Hub stores any file of 10 MB or more in LFS


class HubError(Exception):
    """An error answer: status, message (``X-Error-Message`` and JSON ``error``), Hub error code."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


def git_blob_sha1(data: bytes) -> str:
    """The id git (and the Hub, in ``oid``/``ETag``) gives a regular file's contents."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def unsafe_path(path: str) -> str | None:
    """Why a repo file path is refused (``..`` or ``.`` segment, absolute, backslash, empty), or None."""
    if not path or path.startswith("/") or "\\" in path or "\0" in path:
        return "must be a relative POSIX path"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "must not contain '..', '.' or empty segments"
    return None


class HubStore:
    """Repositories on disk: content-addressed blobs and one JSON file per repo (branches, commits)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "lfs").mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()

    def _file(self, repo_id: str) -> Path:
        org, name = repo_id.split("/")
        return self.root / "repos" / org / f"{name}.json"

    def get(self, repo_id: str) -> dict | None:
        path = self._file(repo_id)
        return json.loads(path.read_text()) if path.is_file() else None

    def _save(self, repo_id: str, repo: dict) -> None:
        path = self._file(repo_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(repo, indent=1))
        os.replace(tmp, path)

    def create(self, repo_id: str, private: bool) -> bool:
        """Create ``repo_id`` with a first commit (``.gitattributes``, as the Hub does); False if it exists."""
        with self._lock:
            if self.get(repo_id) is not None:
                return False
            self._save(repo_id, {"private": private, "created": time.time(), "refs": {}, "commits": {}})
            self.commit(repo_id, "main", {".gitattributes": GITATTRIBUTES}, "initial commit")
            return True

    def resolve(self, repo: dict, revision: str) -> str | None:
        """A branch name or a full commit sha → the commit sha (None if unknown)."""
        if revision in repo["refs"]:
            return repo["refs"][revision]
        return revision if SHA.match(revision) and revision in repo["commits"] else None

    def blob(self, blob_id: str) -> bytes:
        return (self.root / "blobs" / blob_id).read_bytes()

    def lfs_object(self, repo_id: str, oid: str) -> Path:
        """Where ``repo_id``'s LFS object ``oid`` is stored (a repo sees only the objects pushed to it)."""
        if not re.fullmatch(r"[0-9a-f]{64}", oid):
            raise HubError(400, f"an LFS oid is a sha256 in hex, not {oid!r}")
        return self.root / "lfs" / repo_id / oid

    def has_lfs(self, repo_id: str, oid: str, size: int) -> bool:
        path = self.lfs_object(repo_id, oid)
        return path.is_file() and path.stat().st_size == size

    def commit(self, repo_id: str, branch: str, changes: dict[str, bytes | None], summary: str,
               parent: str | None = None, check_paths: bool = True) -> str:
        """Commit ``changes`` (path → bytes, or None to delete) on ``branch``; returns the new sha.

        ``parent``: the head the client based its commit on (412 if the branch moved since).
        ``check_paths=False`` stores unsafe paths as a hostile or broken Hub could serve them.
        """
        with self._lock:
            repo = self.get(repo_id)
            head = repo["refs"].get(branch)
            if branch not in repo["refs"] and repo["refs"]:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent is not None and parent != head:
                raise HubError(412, f"A commit has happened since {parent}: the head of {branch} is {head}")
            files = dict(repo["commits"][head]["files"]) if head else {}
            for path, content in changes.items():
                why = unsafe_path(path) if check_paths else None
                if why:
                    raise HubError(400, f"Invalid path {path!r}: {why}")
                if content is None:
                    files.pop(path, None)
                    continue
                blob_id = git_blob_sha1(content)
                (self.root / "blobs" / blob_id).write_bytes(content)
                files[path] = blob_id
            record = {"parent": head, "summary": summary, "files": files, "date": time.time()}
            sha = hashlib.sha1(json.dumps({**record, "ns": time.time_ns()}, sort_keys=True).encode()).hexdigest()
            repo["commits"][sha] = record
            repo["refs"][branch] = sha
            self._save(repo_id, repo)
            return sha

    def create_branch(self, repo_id: str, branch: str, start: str) -> None:
        with self._lock:
            repo = self.get(repo_id)
            if branch in repo["refs"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            sha = self.resolve(repo, start)
            if sha is None:
                raise HubError(404, f"Invalid rev id: {start}", "RevisionNotFound")
            repo["refs"][branch] = sha
            self._save(repo_id, repo)


def _free_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


class HubServer:
    """The test Hub: ``start()`` serves on ``self.url`` from a thread, ``stop()`` shuts it down (restartable)."""

    def __init__(self, root: Path, tokens: dict[str, str]):
        self.store = HubStore(root)
        self.tokens = dict(tokens)  # token → user name
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header), in order
        self._broken: dict[tuple[str, str], int] = {}  # (repo_id, path) → GETs left to cut short
        self.lfs = True  # preupload sends weights and large files through LFS, as the Hub does
        self.lfs_redirects = 0  # downloads of LFS files answered with the Hub's redirect
        self._tickets: dict[str, tuple[str, str, int]] = {}  # LFS upload ticket → (repo_id, oid, size)
        self._sock = _free_socket()
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = self._build_app()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "HubServer":
        sock = self._sock if self._sock is not None else _free_socket(self.port)
        self._sock = None
        config = uvicorn.Config(self._logged, interface="asgi3", log_level="warning", access_log=False,
                                lifespan="off", proxy_headers=False, timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name=f"test-hub-{self.port}")
        self._thread.start()
        deadline = time.time() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"the test Hub did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Shut down (open connections are closed): the port then refuses connections until ``start()``."""
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=20)
            self._server = self._thread = None

    async def _logged(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            self.requests.append((scope["method"], scope["path"], (headers.get(b"range") or b"").decode() or None))
        await self.app(scope, receive, send)

    # ------------------------------------------------------------------ test controls
    def break_downloads(self, repo_id: str, path: str, times: int = 1) -> None:
        """Cut the next ``times`` GETs of ``path`` at the file's midpoint (0 switches it off)."""
        self._broken[(repo_id, path)] = times

    def seed(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> str:
        """Create a repo holding ``files`` without any path check, as a hostile or broken Hub could."""
        self.store.create(repo_id, private)
        return self.store.commit(repo_id, "main", files, "seeded", check_paths=False)

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.store.get(repo_id)["refs"][branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path → contents of every file of ``repo_id`` at ``revision``."""
        repo = self.store.get(repo_id)
        manifest = repo["commits"][self.store.resolve(repo, revision)]["files"]
        return {path: self.store.blob(blob_id) for path, blob_id in manifest.items()}

    # ------------------------------------------------------------------ access rules
    def _user(self, request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        if not auth:
            return None
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _repo(self, request: Request, org: str, name: str, write: bool = False) -> dict:
        """The repo if the caller may see it (and write to it with ``write``), else the Hub's error."""
        user = self._user(request)
        repo = self.store.get(f"{org}/{name}") if re.fullmatch(r"[\w.-]+", org + name) else None
        if repo is None or (repo["private"] and user != org):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write and user != org:
            raise HubError(401 if user is None else 403, f"You don't have the rights to write to {org}/{name}")
        return repo

    def _revision(self, repo: dict, revision: str) -> str:
        sha = self.store.resolve(repo, revision)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    # ------------------------------------------------------------------ the API
    def _build_app(self) -> FastAPI:
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        store = self.store

        @app.exception_handler(HubError)
        def hub_error(request: Request, e: HubError) -> JSONResponse:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            return JSONResponse({"error": e.message}, status_code=e.status, headers=headers)

        @app.api_route("/", methods=["GET", "HEAD"])
        def root() -> Response:
            return Response("sslhub test Hub\n", media_type="text/plain")

        @app.post("/api/repos/create")
        async def create_repo(request: Request) -> JSONResponse:
            body = await request.json()
            user = self._user(request)
            org, name = body.get("organization") or user, body.get("name", "")
            if user is None:
                raise HubError(401, "You must be authenticated to create a repo")
            if body.get("type", "model") != "model" or not re.fullmatch(r"[\w.-]+", f"{org}{name}"):
                raise HubError(400, "only model repos named ORG/NAME are supported here")
            if org != user:
                raise HubError(403, f"You don't have the rights to create a model under the namespace {org}")
            private = body.get("visibility", "private" if body.get("private") else "public") == "private"
            url = f"{self.url}/{org}/{name}"
            if not store.create(f"{org}/{name}", private):
                return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
            return JSONResponse({"url": url, "name": f"{org}/{name}", "id": f"{org}/{name}"})

        @app.post("/api/validate-yaml")
        async def validate_yaml(request: Request) -> JSONResponse:
            content = (await request.json()).get("content", "")
            match = re.match(r"^---\s*\n(.*?)\n---\s*$", content, re.S | re.M)
            try:
                meta = yaml.safe_load(match.group(1)) if match else {}
            except yaml.YAMLError as e:
                return JSONResponse({"errors": [{"message": f"invalid YAML: {e}"}]}, status_code=400)
            if not isinstance(meta, (dict, type(None))):
                return JSONResponse({"errors": [{"message": "metadata must be a YAML mapping"}]}, status_code=400)
            return JSONResponse({"errors": [], "warnings": []})

        def info(request: Request, org: str, name: str, revision: str) -> JSONResponse:
            repo = self._repo(request, org, name)
            sha = self._revision(repo, revision)
            manifest = repo["commits"][sha]["files"]
            siblings = [{"rfilename": p, "blobId": b, "size": (store.root / "blobs" / b).stat().st_size}
                        for p, b in sorted(manifest.items())]
            return JSONResponse({"id": f"{org}/{name}", "modelId": f"{org}/{name}", "author": org, "sha": sha,
                                 "private": repo["private"], "disabled": False, "gated": False, "tags": [],
                                 "siblings": siblings,
                                 "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z",
                                                               time.gmtime(repo["commits"][sha]["date"]))})

        @app.get("/api/models/{org}/{name}")
        def model_info(request: Request, org: str, name: str) -> JSONResponse:
            return info(request, org, name, "main")

        @app.get("/api/models/{org}/{name}/revision/{revision}")
        def model_info_at(request: Request, org: str, name: str, revision: str) -> JSONResponse:
            return info(request, org, name, revision)

        @app.get("/api/models/{org}/{name}/tree/{revision}")
        @app.get("/api/models/{org}/{name}/tree/{revision}/{folder:path}")
        def tree(request: Request, org: str, name: str, revision: str, folder: str = "",
                 recursive: bool = False) -> JSONResponse:
            repo = self._repo(request, org, name)
            manifest = repo["commits"][self._revision(repo, revision)]["files"]
            prefix = folder.strip("/") + "/" if folder.strip("/") else ""
            entries: dict[str, dict] = {}
            for path, blob_id in sorted(manifest.items()):
                if not path.startswith(prefix):
                    continue
                parts = path[len(prefix):].split("/")
                for depth in range(1, len(parts)):  # the folders on the way
                    sub = prefix + "/".join(parts[:depth])
                    if recursive or depth == 1:
                        entries.setdefault(sub, {"type": "directory", "oid": hashlib.sha1(sub.encode()).hexdigest(),
                                                 "size": 0, "path": sub})
                if recursive or len(parts) == 1:
                    size = (store.root / "blobs" / blob_id).stat().st_size
                    entries[path] = {"type": "file", "oid": blob_id, "size": size, "path": path}
            if prefix and not entries:
                raise HubError(404, f"Entry not found: {folder}", "EntryNotFound")
            return JSONResponse(list(entries.values()))

        @app.post("/api/models/{org}/{name}/branch/{branch}")
        async def create_branch(request: Request, org: str, name: str, branch: str) -> JSONResponse:
            self._repo(request, org, name, write=True)
            body = await request.json() if await request.body() else {}
            if unsafe_path(branch) or SHA.match(branch):
                raise HubError(400, f"Invalid branch name {branch!r}")
            store.create_branch(f"{org}/{name}", branch, body.get("startingPoint") or "main")
            return JSONResponse({})

        @app.post("/api/models/{org}/{name}/preupload/{revision}")
        async def preupload(request: Request, org: str, name: str, revision: str) -> JSONResponse:
            repo = self._repo(request, org, name, write=True)
            sha = self._revision(repo, revision)
            manifest = repo["commits"][sha]["files"]
            out = []
            for f in (await request.json()).get("files", []):
                why = unsafe_path(f["path"])
                if why:
                    raise HubError(400, f"Invalid path {f['path']!r}: {why}")
                lfs = self.lfs and (f["path"].endswith(LFS_SUFFIXES) or f.get("size", 0) >= LFS_MIN_SIZE)
                oid = manifest.get(f["path"])  # what the client compares with its file: sha256 for LFS, else git sha1
                if lfs and oid:
                    oid = hashlib.sha256(store.blob(oid)).hexdigest()
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
            return JSONResponse({"files": out, "commitOid": sha})

        @app.post("/{org}/{repo_git}/info/lfs/objects/{action}")
        async def lfs_batch(request: Request, org: str, repo_git: str, action: str) -> JSONResponse:
            name = repo_git.removesuffix(".git")
            self._repo(request, org, name, write=True)
            body = await request.json()
            if action == "verify":
                if not store.has_lfs(f"{org}/{name}", body.get("oid", ""), body.get("size", -1)):
                    raise HubError(404, f"LFS object {body.get('oid')} of size {body.get('size')} is not stored")
                return JSONResponse({})
            if action != "batch" or not repo_git.endswith(".git") or body.get("operation") != "upload":
                raise HubError(400, "only LFS uploads (batch, verify) are supported by this test Hub")
            objects = []
            for obj in body.get("objects", []):
                oid, size = obj.get("oid", ""), obj.get("size")
                if not isinstance(size, int):
                    raise HubError(400, f"LFS objects are a sha256 oid and an integer size, not {obj}")
                entry = {"oid": oid, "size": size, "authenticated": True}
                if not store.has_lfs(f"{org}/{name}", oid, size):
                    ticket = secrets.token_urlsafe(16)
                    self._tickets[ticket] = (f"{org}/{name}", oid, size)
                    entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{ticket}", "header": {}},
                                        "verify": {"href": f"{self.url}/{org}/{name}.git/info/lfs/objects/verify",
                                                   "header": {}}}
                objects.append(entry)
            return JSONResponse({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

        @app.put("/lfs-upload/{ticket}")
        async def lfs_upload(request: Request, ticket: str) -> Response:
            if ticket not in self._tickets:
                raise HubError(403, "unknown or used LFS upload ticket")
            repo_id, oid, size = self._tickets[ticket]
            target = store.lfs_object(repo_id, oid)
            target.parent.mkdir(parents=True, exist_ok=True)
            digest, part = hashlib.sha256(), target.with_name(f"{ticket}.part")
            with open(part, "wb") as f:
                async for chunk in request.stream():
                    digest.update(chunk)
                    f.write(chunk)
            if digest.hexdigest() != oid or part.stat().st_size != size:
                part.unlink()
                raise HubError(400, f"the bytes sent are not LFS object {oid} of size {size}")
            os.replace(part, target)
            del self._tickets[ticket]
            return Response(status_code=200)

        @app.post("/api/models/{org}/{name}/commit/{revision}")
        async def commit(request: Request, org: str, name: str, revision: str) -> JSONResponse:
            repo = self._repo(request, org, name, write=True)
            if request.query_params.get("create_pr"):
                raise HubError(400, "pull requests are not supported by this test Hub")
            head = self._revision(repo, revision)
            if revision not in repo["refs"]:
                raise HubError(400, f"commits go to a branch, not to the commit {revision}")
            header: dict[str, Any] = {}
            changes: dict[str, bytes | None] = {}
            for line in (await request.body()).decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    header = value
                elif key == "file":
                    changes[value["path"]] = (base64.b64decode(value["content"]) if value.get("encoding") == "base64"
                                              else value["content"].encode())
                elif key == "deletedFile":
                    changes[value["path"]] = None
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    changes.update({p: None for p in repo["commits"][head]["files"] if p.startswith(folder)})
                elif key == "lfsFile":
                    uploaded = store.has_lfs(f"{org}/{name}", value["oid"], value["size"])
                    if value.get("algo") != "sha256" or not uploaded:
                        raise HubError(400, f"{value['path']}: LFS object {value['oid']} was never uploaded")
                    changes[value["path"]] = store.lfs_object(f"{org}/{name}", value["oid"]).read_bytes()
                else:
                    raise HubError(400, f"unsupported commit operation {key!r}")
            sha = store.commit(f"{org}/{name}", revision, changes, header.get("summary", ""),
                               parent=header.get("parentCommit"))
            return JSONResponse({"success": True, "commitOid": sha, "pullRequestUrl": None,
                                 "commitUrl": f"{self.url}/{org}/{name}/commit/{sha}"})

        @app.api_route("/{org}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
        def resolve(request: Request, org: str, name: str, revision: str, path: str) -> Response:
            repo = self._repo(request, org, name)
            sha = self._revision(repo, revision)
            why = unsafe_path(path)
            if why:
                raise HubError(400, f"Invalid path {path!r}: {why}")
            blob_id = repo["commits"][sha]["files"].get(path)
            if blob_id is None:
                raise HubError(404, "Entry not found", "EntryNotFound", commit=sha)
            data = store.blob(blob_id)
            if self.lfs and (path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE):
                # the Hub sends an LFS file's bytes from its storage: a redirect whose headers carry the
                # object's sha256 and size, which the client reads from the 302 itself (no redirect followed)
                # another host name for the same loopback server, as the Hub's CDN is another host: the client
                # reads the metadata from the 302 and sends its GET there without the Authorization header
                where = f"http://localhost:{self.port}/lfs-files/{org}/{name}/{blob_id}?{urlencode({'path': path})}"
                self.lfs_redirects += 1
                return Response(status_code=302, headers={
                    "Location": where, "X-Repo-Commit": sha, "ETag": f'"{blob_id}"',
                    "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data)),
                    "Content-Length": "0"})
            return self._serve(request, f"{org}/{name}", path, data, {"X-Repo-Commit": sha, "ETag": f'"{blob_id}"'})

        @app.api_route("/lfs-files/{org}/{name}/{blob_id}", methods=["GET", "HEAD"])
        def lfs_file(request: Request, org: str, name: str, blob_id: str) -> Response:
            """The storage an LFS redirect points to; like the Hub's signed CDN URLs it needs no token."""
            if not re.fullmatch(r"[0-9a-f]{40}", blob_id):
                raise HubError(404, "Entry not found", "EntryNotFound")
            data = store.blob(blob_id)
            return self._serve(request, f"{org}/{name}", request.query_params.get("path", ""), data,
                               {"ETag": f'"{hashlib.sha256(data).hexdigest()}"'})

        return app

    def _serve(self, request: Request, repo_id: str, path: str, data: bytes, extra: dict[str, str]) -> Response:
        """A file's bytes, with ``Range`` (206) and the ``break_downloads`` fault switch."""
        headers = {**extra, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        start, end, status = 0, len(data) - 1, 200
        wanted = request.headers.get("range")
        if wanted:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
            if not m or int(m.group(1)) >= len(data):
                raise HubError(416, f"Range not satisfiable: {wanted} (size {len(data)})")
            start, end, status = int(m.group(1)), min(int(m.group(2) or end), end), 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        headers["Content-Length"] = str(end - start + 1)
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        left = self._broken.get((repo_id, path), 0)
        if left > 0:
            self._broken[(repo_id, path)] = left - 1
            return _CutResponse(data[start:max(start, len(data) // 2)], status, headers)
        return Response(data[start:end + 1], status_code=status, headers=headers)


class _CutResponse(Response):
    """Sends the headers (with the full Content-Length) and ``part`` of the body, then drops the connection."""

    def __init__(self, part: bytes, status: int, headers: dict[str, str]):
        super().__init__(status_code=status, headers=headers)
        self.part = part

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.part, "more_body": True})
        # returning here with the body incomplete makes uvicorn close the connection (it logs one error line)


@contextlib.contextmanager
def client_env(**values: str | None) -> Iterator[None]:
    """Set (or, with None, unset) environment variables and make the imported huggingface_hub re-read them.

    See the module docstring: ``huggingface_hub.constants`` is re-executed on entry and on exit.
    """
    from huggingface_hub import constants

    def apply(env: dict) -> None:  # None: unset the variable
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        importlib.reload(constants)

    saved = {k: os.environ.get(k) for k in values}
    try:
        apply(values)
        yield
    finally:
        apply(saved)


@contextlib.contextmanager
def running_hub(root: Path, tokens: dict[str, str]) -> Iterator[HubServer]:
    """A started test Hub under ``root`` with huggingface_hub pointed at it (endpoint, its own home, the first
    token, no Xet, no telemetry, nothing inherited from the user's environment); stopped on exit."""
    server = HubServer(root / "server", tokens).start()
    env = {"HF_ENDPOINT": server.url, "HF_HOME": str(root / "hf_home"), "HF_TOKEN": next(iter(tokens)),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_CACHE": None, "HF_TOKEN_PATH": None, "HUGGING_FACE_HUB_TOKEN": None, "HF_HUB_OFFLINE": None,
           "HF_HUB_DISABLE_IMPLICIT_TOKEN": None}
    try:
        with client_env(**env):
            yield server
    finally:
        server.stop()
