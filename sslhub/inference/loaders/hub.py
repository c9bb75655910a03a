"""Weights from the network: ``hf-hub:`` snapshots, and clear, fast errors when there is no network.

huggingface_hub retries an unreachable host with back-off (about 45 s before it gives up), so before a
download we probe the endpoint once (``PROBE_TIMEOUT_S``); when it cannot be reached the library is put
in offline mode for that call: weights already in the cache still load, anything else fails at once.
A snapshot is fetched at the commit whose file list was checked (no pickle-only repo, no file name that
could escape the cache), and the branch's commit is recorded in the cache, so the same name loads again
without a network. Every failure becomes a :class:`LoadError` that says what to do.
"""
from __future__ import annotations

import contextlib
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from sslhub import formats
from sslhub.inference.loaders.base import LoadError, pickle_error

PROBE_TIMEOUT_S = 5.0
ETAG_TIMEOUT_S = 10.0  # per metadata request, passed to huggingface_hub explicitly
# What a snapshot fetches: configs, safetensors weights, tokenizer files and the card — never pickles.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "README.md",
                  "tokenizer*", "vocab*", "merges*", "spiece*"]


# Every request huggingface_hub sends while sslhub pushes or pulls has bounded waits (its own client has none:
# a server that accepts the connection and never answers would hold the call forever). Per socket operation,
# so a slow upload that keeps moving is not cut: connect, each read, each write, a free connection.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0  # the longest wait for any part of an answer (a large commit is processed before it)
WRITE_TIMEOUT_S = 60.0


@contextlib.contextmanager
def bounded_http() -> Iterator[None]:
    """huggingface_hub's shared HTTP client with bounded timeouts, for the duration of the block.

    Not thread-safe: the client factory is huggingface_hub's global.
    """
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    def factory():
        client = default_client_factory()
        client.timeout = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S, WRITE_TIMEOUT_S, CONNECT_TIMEOUT_S)  # + pool
        return client

    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(default_client_factory)


def parse_hub_id(spec: str, name: str = "") -> tuple[str, str | None]:
    """``"ORG/NAME@REV"`` → ``("ORG/NAME", "REV")``; ``"ORG/NAME"`` → ``("ORG/NAME", None)``."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    what = name or f"hf-hub:{spec}"
    repo, at, revision = spec.strip().partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or (at and not revision):
        raise LoadError(f"{what}: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION "
                        "(a branch, tag or commit), e.g. hf-hub:timm/resnet50.a1_in1k@main")
    if at and unsafe_name(revision):
        raise LoadError(f"{what}: {revision!r} is not a revision name (no '..', '.' or empty parts, no "
                        "leading '/'); give a branch, tag or commit, e.g. @main or @v1.0")
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise LoadError(f"{what}: {repo!r} is not a valid Hub repo id ({e})") from None
    return repo, revision or None


def unsafe_name(path: str) -> bool:
    """A repo path that could point outside its folder, on any system: absolute (``/x``, ``C:x``), with a
    backslash (a separator on Windows: ``..\\x``), a NUL, or a ``..``/``.``/empty part."""
    return (not isinstance(path, str) or path.startswith("/") or "\\" in path or "\0" in path
            or re.match(r"[A-Za-z]:", path) is not None
            or any(part in ("", ".", "..") for part in path.split("/")))


def _reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # the server answered
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def network_guard() -> Iterator[dict]:
    """Run a download with huggingface_hub in offline mode if its endpoint cannot be reached.

    Yields ``{"unreachable": ENDPOINT or None}`` for the error message. Not thread-safe: the offline
    flag is a module global of huggingface_hub, restored on exit.
    """
    from huggingface_hub import constants

    state = {"unreachable": None}
    if constants.is_offline_mode() or _reachable(constants.ENDPOINT):
        yield state
        return
    saved, state["unreachable"] = constants.HF_HUB_OFFLINE, constants.ENDPOINT
    constants.HF_HUB_OFFLINE = True
    try:
        yield state
    finally:
        constants.HF_HUB_OFFLINE = saved


def is_network_error(e: BaseException) -> bool:
    """An error (or one it was raised from) that means the weights could not be fetched."""
    from huggingface_hub.errors import EntryNotFoundError

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (OSError, EntryNotFoundError)) or type(e).__module__.startswith(("httpx", "requests")):
            return True
        e = e.__cause__ or e.__context__
    return False


def download_error(name: str, e: BaseException, net: dict | None = None) -> LoadError:
    if net and net.get("unreachable"):
        detail = f"no network: {net['unreachable']} could not be reached, and they are not in the local cache"
    else:
        detail = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:300]
    return LoadError(
        f"{name}: the weights could not be downloaded ({detail}). Without internet, load a "
        "local folder instead: on a machine with access, fetch or save the model (`hf download ORG/NAME "
        "--local-dir DIR`; timm.models.save_for_hf(model, DIR, safe_serialization=True); "
        "model.save_pretrained(DIR)), copy DIR here, and call load_encoder('DIR') or load_encoder('local-dir:DIR'). "
        "Weights already in the Hugging Face cache load with HF_HUB_OFFLINE=1.")


def _remember_ref(snapshot: Path, revision: str) -> None:
    """Record ``revision`` → this snapshot's commit in the cache's ``refs/`` folder.

    The snapshot is fetched by commit sha (the one whose file list was checked), and huggingface_hub only
    records a branch's commit when it is asked for the branch itself; this writes the same file it would
    (the cache layout is documented: ``refs/<revision>`` holds the commit), so ``hf-hub:ORG/NAME[@BRANCH]``
    loads from the cache later without a network.
    """
    ref = snapshot.parent.parent / "refs" / revision
    if revision == snapshot.name or snapshot.parent.name != "snapshots" or (
            ref.is_file() and ref.read_text() == snapshot.name):
        return  # a commit needs no ref; not huggingface_hub's cache layout; or already recorded
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.tmp")
    tmp.write_text(snapshot.name)
    tmp.replace(ref)


def fetch_snapshot(spec: str, name: str) -> Path:
    """Download (or find in the cache) the files of ``hf-hub:ORG/NAME[@REV]`` that a loader may read."""
    from huggingface_hub import HfApi, constants, get_token, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = parse_hub_id(spec, name)
    requested, net = revision, None
    try:
        with network_guard() as net, bounded_http():
            if not constants.is_offline_mode():
                info = HfApi().model_info(repo, revision=revision, timeout=ETAG_TIMEOUT_S)
                files = [s.rfilename for s in info.siblings or []]
                unsafe = sorted(f for f in files if unsafe_name(f))
                if unsafe:
                    raise LoadError(f"{name}: the repo lists unsafe file names ({', '.join(map(repr, unsafe[:3]))})"
                                    ": an absolute path, a backslash or a '..' part could write outside the "
                                    "cache, so nothing is downloaded from it")
                pickles = sorted(f for f in files if f.endswith(formats.PICKLE_SUFFIXES))
                if pickles and not any(f.endswith(".safetensors") for f in files):
                    raise pickle_error(name, pickles, formats.WEIGHTS)
                revision = info.sha or revision
            path = Path(snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                          etag_timeout=ETAG_TIMEOUT_S))
            _remember_ref(path, requested or "main")
    except LoadError:
        raise
    except RevisionNotFoundError:
        raise LoadError(f"{name}: the repo {repo} has no revision {revision!r} "
                        "(give a branch, tag or commit)") from None
    except RepositoryNotFoundError:
        why = ("no token was sent: set HF_TOKEN or run `hf auth login`" if not get_token() else
               "the token sent (HF_TOKEN or `hf auth login`) does not give access to it")
        raise LoadError(f"{name}: no model repo {repo} on {constants.ENDPOINT}, or it is private or gated and "
                        f"{why}") from None
    except HfHubHTTPError as e:
        if e.response.status_code in (401, 403):
            raise LoadError(f"{name}: {constants.ENDPOINT} refused the request ({e.response.status_code}: "
                            f"{e.server_message or 'access denied'}); check the token in HF_TOKEN or "
                            "`hf auth login`") from None
        raise download_error(name, e, net) from e
    except Exception as e:
        if is_network_error(e):
            raise download_error(name, e, net) from e
        raise
    return path
