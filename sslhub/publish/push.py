"""Publish a model folder on the Hugging Face Hub: ``push_to_hub(folder, "org/name")`` or ``sslhub push``.

    sslhub push runs/simclr/export my-org/simclr-r18 [--private] [--revision BRANCH] [--message MSG]
    encoder = sslhub.load_encoder("hf-hub:my-org/simclr-r18[@BRANCH]")     # and back

What is pushed, in one commit: the folder's files (hidden ones skipped), once the folder has passed the
checks — it is in a layout sslhub loads (an sslhub export, timm's or open_clip's Hub layout, a
transformers folder; ``sslhub.inference.loaders.layout``) and it does load; its weights are safetensors and it holds
no pickle file (``.bin``, ``.pt``, ``.pth``, ``.ckpt``, ``.pkl``: unpickling runs code — the error says how
to convert a trusted one). The card is the folder's README.md (every sslhub export has one); a folder
without one gets a card written from its files alone (layout, architecture, parameter count, sizes and
sha256 of the files), so it states nothing that was not measured. The folder itself is never modified.

Endpoint and token come from huggingface_hub's own settings (``HF_ENDPOINT``; ``HF_TOKEN`` or the token
saved by ``hf auth login``), or ``token=``. The token is handed to ``HfApi`` only: it is never printed,
logged or written into a file.

Progress: the bytes of each file are counted as the HTTP requests send them (``UploadProgress``), into a
byte bar per file on stderr, or into ``progress=`` when it is a callable.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from sslhub import formats
from sslhub.errors import SslhubError
from sslhub.inference.loaders import hub as network
from sslhub.inference.loaders import layout
from sslhub.inference.loaders.base import Encoder, LoadError, read_json
from sslhub.publish.card import render_card

log = logging.getLogger(__name__)

# library_name in the card of a folder without one, by layout (sslhub exports carry their own card)
LIBRARIES = {"timm": "timm", "open_clip": "open_clip", "transformers": "transformers"}
NATIVE_USE = {
    "timm": 'import timm\n\nmodel = timm.create_model("hf-hub:{repo}", pretrained=True)',
    "open_clip": 'import open_clip\n\nmodel, _, preprocess = open_clip.create_model_and_transforms("hf-hub:{repo}")',
    "transformers": 'from transformers import AutoModel\n\nmodel = AutoModel.from_pretrained("{repo}")',
}
CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ repo_id }}

{{ summary }}

## Use

```python
from sslhub import load_encoder

encoder = load_encoder("hf-hub:{{ repo_id }}")
features = encoder.embed_images(["image.jpg"])  # (1, {{ dim }})
```

The library that wrote these files reads them too:

```python
{{ native_use }}
```

## Read from the files

| | |
|---|---|
{{ facts }}

| file | bytes | sha256 |
|---|---|---|
{{ files }}
"""


class PushError(SslhubError, ValueError):
    """A push was refused or failed; the message names the folder or repo and says what to do."""


def check_target(repo_id: str, revision: str | None) -> str:
    """Validate ``ORG/NAME`` and the branch to push to; returns the branch (``main`` by default)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PushError(f"{repo_id!r}: give the repo as ORG/NAME, e.g. my-org/simclr-resnet18")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(f"{repo_id!r} is not a valid Hub repo id ({e})") from None
    branch = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", branch) or not re.fullmatch(r"[\w.-]+", branch) or ".." in branch:
        raise PushError(f"--revision {branch!r}: give a branch name (letters, digits, '.', '-', '_'), "
                        "e.g. v1 or experiment-2; a push creates the branch when it does not exist")
    return branch


def publishable_files(folder: Path) -> tuple[Encoder, list[tuple[str, Path]]]:
    """The folder loaded (proof that it is a model sslhub reads) and its files to upload, as (repo path, path)."""
    what = str(folder)
    if not folder.is_dir():
        raise PushError(f"{what}: no such folder (give the folder an export or a library wrote, "
                        "e.g. runs/simclr/export)")
    files = [(p.relative_to(folder).as_posix(), p) for p in sorted(folder.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    root = folder.resolve()
    outside = [f"{rel} → {p.resolve()}" for rel, p in files if not p.resolve().is_relative_to(root)]
    if outside:  # a link would publish a file from elsewhere on this machine (a key, a token, another model)
        raise PushError(f"{what} holds links to files outside it ({'; '.join(outside[:3])}"
                        f"{' …' if len(outside) > 3 else ''}): only the folder's own files are published. Replace "
                        "each link with a copy of the file if it belongs to the model, or remove it")
    layout.detect_layout(folder, what)  # a folder of pickles only is refused here, with the conversion recipe
    pickles = [rel for rel, _ in files if rel.endswith(formats.PICKLE_SUFFIXES)]
    if pickles:
        raise PushError(f"{what} holds pickle files ({', '.join(pickles)}) beside its safetensors weights: only "
                        "safetensors are published, because unpickling a file can run arbitrary code. Move or "
                        "delete them and push again (if they hold weights the folder lacks, convert them first: "
                        "torch.load(FILE, map_location='cpu', weights_only=True) if you trust the file, then "
                        "safetensors.torch.save_file(state, 'model.safetensors')).")
    try:
        encoder = layout.load_folder(folder, what)
    except LoadError:
        raise
    except Exception as e:  # the family loaders raise their libraries' own errors for broken configs
        raise LoadError(f"{what}: recognised as a model folder but it does not load "
                        f"({type(e).__name__}: {e}); fix it before publishing") from None
    return encoder, files


def _tensor_facts(paths: list[Path]) -> tuple[int, list[str]]:
    """Parameter count and dtypes, read from the safetensors headers (no tensor is loaded)."""
    from safetensors import safe_open

    count, dtypes = 0, set()
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                count += math.prod(tensor.get_shape())
                dtypes.add(tensor.get_dtype())
    return count, sorted(dtypes)


def _architecture(folder: Path, kind: str) -> str:
    """The architecture as the folder's config names it."""
    if kind == "open_clip":
        cfg = read_json(folder / formats.OPEN_CLIP_CONFIG)["model_cfg"]
        return f"CLIP, {cfg.get('embed_dim')}-d joint embedding (`model_cfg` in open_clip_config.json)"
    cfg = read_json(folder / formats.CONFIG)
    if kind == "timm":
        return f"`{cfg['architecture']}`"
    return f"`{cfg['model_type']}` ({', '.join(cfg.get('architectures') or [])})"


def files_card(repo_id: str, folder: Path, encoder: Encoder, files: list[tuple[str, Path]]) -> str:
    """A model card for a folder that came without one: only what its files say."""
    from huggingface_hub import ModelCard, ModelCardData

    kind = encoder.kind
    params, dtypes = _tensor_facts([p for rel, p in files if rel.endswith(".safetensors")])
    facts = {"layout": kind, "architecture": _architecture(folder, kind),
             "parameters": f"{params:,} ({', '.join(dtypes)})", "feature dimension": encoder.dim,
             "input size": encoder.image_size, "text tower": "yes" if encoder.has_text else "no"}
    rows = []
    for rel, path in files:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        rows.append(f"| `{rel}` | {path.stat().st_size} | `{digest.hexdigest()}` |")
    data = ModelCardData(library_name=LIBRARIES[kind], tags=["sslhub", kind, "image-feature-extraction"],
                         pipeline_tag="zero-shot-image-classification" if encoder.has_text else
                         "image-feature-extraction")
    summary = (f"A {kind} image {'and text ' if encoder.has_text else ''}encoder, published with `sslhub push`. "
               "This card was written from the files alone; no training or evaluation record came with them, "
               "so none is reported here.")
    card = ModelCard.from_template(data, template_str=CARD_TEMPLATE, repo_id=repo_id, summary=summary,
                                   dim=encoder.dim, native_use=NATIVE_USE[kind].format(repo=repo_id),
                                   facts="\n".join(f"| {k} | {v} |" for k, v in facts.items()),
                                   files="\n".join(rows))
    return str(card)


def _card_bytes(repo_id: str, folder: Path, encoder: Encoder, files: list[tuple[str, Path]]) -> bytes | None:
    """The card to add, or None when the folder has its own README.md."""
    if (folder / "README.md").is_file():
        return None
    if encoder.kind == "sslhub":
        return render_card(json.loads((folder / formats.CONFIG).read_text()), repo_hint=f"hf-hub:{repo_id}").encode()
    return files_card(repo_id, folder, encoder, files).encode()


ProgressCallback = Callable[[str, int, int], None]  # (path in the repo, bytes of it sent so far, its size)
PIECE = 1 << 20  # the commit body is handed to the socket in pieces of this many bytes, each one counted
_PATH_IN_LINE = re.compile(rb'"path": *("(?:[^"\\]|\\.)*")')


class UploadProgress:
    """What a push has sent of each file, counted where the bytes leave: one byte bar per file (tqdm, on
    stderr; from its first byte, its last line kept), and ``callback(path_in_repo, bytes_sent, size)``.

    huggingface_hub sends a file in one of two ways, as the server's preupload answer says:
    - ``lfs`` (weights and anything of 10 MB or more, on the Hub): streamed from disk into a PUT, or parts
      of one. :func:`counted_add` makes the file object it reads count the bytes the request has taken.
    - ``regular`` (small text files on the Hub; every file on a server without LFS): base64 inside the
      ndjson body of the commit request. :meth:`watching` streams that body in ``PIECE``-byte pieces and
      credits each piece to the file whose line it belongs to (scaled from base64 to file bytes).
    Not counted: files the Hub already holds unchanged (not sent again), and uploads through Xet
    (huggingface.co with hf_xet installed), which hf_xet reads itself: huggingface_hub's own Xet bars show those
    (on a terminal). The push's last log line names the files not counted.
    """

    def __init__(self, sizes: dict[str, int], bars: bool = True, callback: ProgressCallback | None = None):
        self.sizes, self.sent, self.callback, self.show = sizes, dict.fromkeys(sizes, 0), callback, bars
        self.bars: dict[str, object] = {}  # path → its tqdm bar, while it is being sent
        self._lock = threading.Lock()  # LFS files are uploaded from several threads

    def report(self, path: str, done: int) -> None:
        """``done`` bytes of ``path`` have been sent (a retry that sends them again does not count twice)."""
        with self._lock:
            done, size = min(done, self.sizes[path]), self.sizes[path]
            if done <= self.sent[path]:
                return
            if self.show:
                if path not in self.bars:
                    self.bars[path] = tqdm(total=size, desc=path, unit="B", unit_scale=True, dynamic_ncols=True)
                self.bars[path].update(done - self.sent[path])
                if done == size:
                    self.bars.pop(path).close()
            self.sent[path] = done
        if self.callback is not None:
            self.callback(path, done, size)

    def __enter__(self) -> UploadProgress:
        return self

    def __exit__(self, *exc) -> None:
        for bar in self.bars.values():  # files cut short by an error
            bar.close()

    @contextlib.contextmanager
    def watching(self, session, commit_path: str) -> Iterator[None]:
        """Count the commit request that ``session`` (huggingface_hub's httpx client) sends, for the block."""
        saved = session.event_hooks
        session.event_hooks = {**saved, "request": [*saved["request"], self._commit_hook(commit_path)]}
        try:
            yield
        finally:
            session.event_hooks = saved

    def _commit_hook(self, commit_path: str) -> Callable:
        """An httpx request hook that counts the body of the POST to ``commit_path`` as it is sent."""
        import httpx2

        progress = self

        class CountedBody(httpx2.SyncByteStream):
            def __init__(self, body: bytes, lines: list[tuple[int, int, str]]):
                self.body, self.lines = body, lines

            def __iter__(self) -> Iterator[bytes]:
                for start in range(0, len(self.body), PIECE):
                    end = min(start + PIECE, len(self.body))
                    yield self.body[start:end]  # the transport has written it when it asks for the next one
                    for first, last, path in self.lines:
                        if first < end and last > start:
                            progress.report(path, progress.sizes[path] * (min(end, last) - first) // (last - first))

        def hook(request) -> None:
            if request.method == "POST" and request.url.path.endswith(commit_path):
                body = request.content
                request.stream = CountedBody(body, self._file_lines(body))

        return hook

    def _file_lines(self, body: bytes) -> list[tuple[int, int, str]]:
        """(start, end, path) of every ndjson line of ``body`` that carries one of the files inline."""
        lines, start = [], 0
        while start < len(body):
            end = body.find(b"\n", start)
            end = len(body) if end < 0 else end + 1
            if body.startswith(b'{"key": "file"', start):
                found = _PATH_IN_LINE.search(body, start, end)
                path = json.loads(found.group(1)) if found else None
                if path in self.sizes:
                    lines.append((start, end, path))
            start = end
        return lines


@functools.cache
def counted_add():
    """huggingface_hub's ``CommitOperationAdd``, whose uploaded bytes report to an :class:`UploadProgress`.

    ``as_file(with_tqdm=True)`` is how huggingface_hub opens a file it streams into an LFS upload (one PUT
    or parts of it); the file object returned here reports the furthest offset read instead of drawing
    huggingface_hub's own bar (so the bars are the same for every upload mode). A subclass made on first
    use, since huggingface_hub is imported only when a push runs.
    """
    from huggingface_hub import CommitOperationAdd

    class CountedAdd(CommitOperationAdd):
        progress: UploadProgress | None = None  # set per operation, after construction

        @contextlib.contextmanager
        def as_file(self, with_tqdm: bool = False):
            with super().as_file() as file:
                if with_tqdm and self.progress is not None:
                    read, origin = file.read, file.tell()

                    def counted_read(size: int | None = -1) -> bytes:
                        data = read(size)
                        self.progress.report(self.path_in_repo, file.tell() - origin)
                        return data

                    file.read = counted_read
                yield file

    return CountedAdd


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                token: str | None = None, commit_message: str | None = None,
                progress: bool | ProgressCallback = True):
    """Publish ``folder`` to ``repo_id`` (created if needed, ``private`` then) on branch ``revision``.

    Returns huggingface_hub's ``CommitInfo``: a ``str`` (the commit URL) with ``.oid``, the commit sha.
    ``private`` applies when the repo is created; an existing repo keeps its visibility. Files already in
    the repo that the folder lacks are kept, as with ``HfApi.upload_folder``. ``progress``: ``True`` draws
    a byte bar per file on stderr as it is sent, ``False`` nothing; a callable is called as
    ``progress(path_in_repo, bytes_sent, size)`` as the bytes go out (and no bar is drawn).
    """
    from huggingface_hub import HfApi, constants, get_session, get_token
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    branch = check_target(repo_id, revision)
    encoder, files = publishable_files(folder)
    card = _card_bytes(repo_id, folder, encoder, files)
    token = token or get_token()
    if not token:
        raise PushError(f"{repo_id}: no Hugging Face token. Set HF_TOKEN, run `hf auth login`, or pass token=; "
                        "it needs write access to the namespace")
    Add = counted_add()
    operations = [Add(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files]
    if card is not None:
        operations.append(Add(path_in_repo="README.md", path_or_fileobj=card))
    sizes = {op.path_in_repo: op.upload_info.size for op in operations}
    log.info("pushing %d files (%.1f MB, %s layout) from %s to %s@%s on %s", len(operations),
             sum(sizes.values()) / 1e6, encoder.kind, folder, repo_id, branch, constants.ENDPOINT)
    api = HfApi(token=token)
    t0 = time.monotonic()
    try:
        with network.bounded_http():
            api.create_repo(repo_id, private=private, exist_ok=True)
            if branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            meter = UploadProgress(sizes, bars=progress is True, callback=progress if callable(progress) else None)
            for op in operations:
                op.progress = meter
            # get_session(): huggingface_hub's shared client, inside this block the bounded one
            with meter, meter.watching(get_session(), f"/api/models/{repo_id}/commit/{branch}"):
                info = api.create_commit(repo_id, operations=operations, revision=branch,
                                         commit_message=commit_message or f"Upload {encoder.kind} encoder with sslhub")
        sent = sum(meter.sent.values())
        log.info("pushed %s@%s in %.1f s: %.1f MB sent%s", repo_id, branch, time.monotonic() - t0, sent / 1e6,
                 "" if sent == sum(sizes.values()) else
                 f" (not counted: {', '.join(p for p in sizes if meter.sent[p] < sizes[p])}, already on the Hub "
                 "or uploaded through Xet)")
        return info
    except HfHubHTTPError as e:
        status = e.response.status_code
        said = e.server_message or (str(e).strip().splitlines() or [""])[0]
        if status in (401, 403, 404):
            raise PushError(f"{repo_id}: {constants.ENDPOINT} refused the push ({status}: {said}). Check that the "
                            f"token (HF_TOKEN, `hf auth login`) is valid and may write to {repo_id.split('/')[0]}"
                            ) from None
        raise PushError(f"{repo_id}: the push to {constants.ENDPOINT} failed ({status}: {said})") from None
    except Exception as e:
        if "Timeout" in type(e).__name__:
            raise PushError(f"{repo_id}: {constants.ENDPOINT} did not answer in time ({type(e).__name__}; each "
                            f"connect waits {network.CONNECT_TIMEOUT_S:g} s, each read {network.READ_TIMEOUT_S:g} s): check "
                            "HF_ENDPOINT and the network, then push again (nothing is half-committed)") from None
        if isinstance(e, ConnectionError) or type(e).__module__.startswith(("httpx", "requests")):
            raise PushError(f"{repo_id}: {constants.ENDPOINT} could not be reached ({type(e).__name__}: "
                            f"{(str(e).strip().splitlines() or [''])[0]}); check HF_ENDPOINT, HF_HUB_OFFLINE "
                            "and the network") from None
        raise


def push_command(args: argparse.Namespace) -> dict:
    """``sslhub push FOLDER ORG/NAME``: the result line names the repo, branch, commit and its URL."""
    info = push_to_hub(args.folder, args.repo, private=args.private, revision=args.revision,
                       commit_message=args.message)
    return {"repo": args.repo, "revision": args.revision or "main", "commit": info.oid, "url": info.commit_url}
