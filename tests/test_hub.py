"""Push and pull through a real HTTP server that speaks the Hub API (``tests/hub_server.py``).

The real huggingface_hub client talks HTTP to the test Hub on 127.0.0.1; nothing in it is mocked. Each
pull starts from an empty cache. Shown here: round trips of an sslhub export, a timm-layout folder and an
open_clip CLIP (identical weights and embeddings; plain timm and open_clip load them too), pinned
revisions (a branch, an older commit), a second pull with the server stopped, and clear errors for a
missing repo or revision, paths with ``..``, an interrupted download, a pickle-only repo, a private repo
without a token — and that a token never reaches stdout, stderr, the logs or the pushed files. A push
reports each file's bytes as they are sent, whether the weights go through LFS (as on the Hub) or inline.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import torch
from conftest import run_cli
from hub_server import client_env, git_blob_sha1, running_hub
from safetensors.torch import load_file

from sslhub import load_encoder
from sslhub.inference.loaders.base import LoadError
from sslhub.publish.push import PushError, push_to_hub

USER = "sslhub-test"
TOKEN = "hf_sslhubTestUserWriteToken0123456789"  # the test Hub's token for USER
TEXTS = ["a photo of a cat", "a dog", ""]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The test Hub, started, with huggingface_hub pointed at it (endpoint, home, token; no Xet)."""
    root = tmp_path_factory.mktemp("hub")
    with running_hub(root, {TOKEN: USER}) as server:
        from huggingface_hub import constants

        assert constants.ENDPOINT == server.url and constants.HF_HUB_CACHE.startswith(str(root))
        yield server


@pytest.fixture
def cache(hub, tmp_path) -> Iterator[Path]:
    """An empty huggingface_hub cache for this test."""
    with client_env(HF_HUB_CACHE=str(tmp_path / "hf_cache")):
        yield tmp_path / "hf_cache"


def make_export(folder: Path, seed: int, channels: tuple[int, ...] = (8, 8, 8, 8)) -> Path:
    """A small sslhub export (CIFAR-stem ResNet-18, 8 channels by default) with seed-dependent random weights."""
    from sslhub.models.backbone import Backbone, EncoderConfig
    from sslhub.publish.export import export_encoder

    torch.manual_seed(seed)
    backbone = Backbone(EncoderConfig(arch="resnet18", cifar_stem=True, image_size=32,
                                      model_args={"channels": list(channels)}))
    return export_encoder(backbone, folder, {"method": "simclr", "steps": 0})


@pytest.fixture(scope="module")
def sslhub_export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("sslhub") / "export", seed=0)


def timm_export(folder: Path, arch: str, **model_args):
    """``timm.models.save_for_hf`` of a random ``arch``: the folder and the model."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **model_args).eval()
    timm.models.save_for_hf(model, str(folder), model_args=model_args, safe_serialization=True)
    return folder, model


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory):
    return timm_export(tmp_path_factory.mktemp("timm"), "vit_tiny_patch16_224", img_size=32, patch_size=8,
                       depth=2, num_classes=0)


def assert_same_state(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def assert_cache_intact(cache: Path) -> None:
    """No partial download anywhere, and every cached blob holds exactly the bytes its name says: the git
    blob sha1 (the ETag) of a regular file, the sha256 (the X-Linked-Etag of the Hub's redirect) of an LFS file."""
    assert not [p for p in cache.rglob("*.incomplete")]
    for blob in cache.glob("models--*/blobs/*"):
        data = blob.read_bytes()
        assert blob.name in (git_blob_sha1(data), hashlib.sha256(data).hexdigest()), blob


# ------------------------------------------------------------------------------------------ round trips
def test_sslhub_export_round_trip(hub, cache, sslhub_export):
    repo = f"{USER}/tiny-simclr"
    info = push_to_hub(sslhub_export, repo, commit_message="first export")
    assert info.oid == hub.head(repo) and info == f"{hub.url}/{repo}/commit/{info.oid}"
    on_hub = hub.files(repo)
    assert sorted(on_hub) == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    assert on_hub["README.md"] == (sslhub_export / "README.md").read_bytes()  # the export's own card
    assert not list(cache.glob("models--*"))

    enc = load_encoder(f"hf-hub:{repo}")
    local = load_encoder(sslhub_export)
    assert enc.kind == "sslhub" and enc.name == f"hf-hub:{repo}"
    assert list(cache.glob("models--sslhub-test--tiny-simclr/snapshots/*/model.safetensors"))  # fetched here
    assert_same_state(enc.model.model.state_dict(), load_file(str(sslhub_export / "model.safetensors")))
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(enc.embed_images(x), local.embed_images(x))
    assert_cache_intact(cache)


def test_timm_folder_round_trip_with_a_card_from_its_files(hub, cache, timm_folder):
    folder, model = timm_folder
    repo = f"{USER}/tiny-vit"
    push_to_hub(folder, repo)
    assert not (folder / "README.md").exists()  # the folder is left as it was
    card = hub.files(repo)["README.md"].decode()
    assert "library_name: timm" in card and "pipeline_tag: image-feature-extraction" in card
    params = sum(t.numel() for t in load_file(str(folder / "model.safetensors")).values())
    assert f"| parameters | {params:,} (F32) |" in card and "| feature dimension | 192 |" in card
    assert "`vit_tiny_patch16_224`" in card and "license" not in card  # no license was given: none is claimed

    enc = load_encoder(f"hf-hub:{repo}")
    assert enc.kind == "timm" and enc.dim == 192
    assert_same_state(enc.model.state_dict(), model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc.embed_images(x), model.forward_head(model.forward_features(x), pre_logits=True))


def test_open_clip_round_trip(hub, cache, open_clip_folder):
    folder, model, _, tokenizer = open_clip_folder
    repo = f"{USER}/tiny-clip"
    push_to_hub(folder, repo)
    assert "pipeline_tag: zero-shot-image-classification" in hub.files(repo)["README.md"].decode()

    enc = load_encoder(f"hf-hub:{repo}")
    assert enc.kind == "open_clip" and enc.has_text
    assert_same_state(enc.model.state_dict(), model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc.embed_images(x), model.encode_image(x), atol=1e-6)
        assert torch.allclose(enc.embed_text(TEXTS), model.encode_text(tokenizer(TEXTS)), atol=1e-5)


PLAIN_LIBRARIES = """
import sys
import open_clip, timm, torch
from safetensors.torch import save_file

out, timm_repo, clip_repo = sys.argv[1:]
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
vit = timm.create_model(f"hf-hub:{timm_repo}", pretrained=True).eval()
clip, _, _ = open_clip.create_model_and_transforms(f"hf-hub:{clip_repo}")
clip.eval()
tokenizer = open_clip.get_tokenizer(f"hf-hub:{clip_repo}")
with torch.no_grad():
    outputs = {"x": x, "timm": vit.forward_head(vit.forward_features(x), pre_logits=True),
               "clip_image": clip.encode_image(x), "clip_text": clip.encode_text(tokenizer(["a photo of a cat"]))}
save_file({k: v.contiguous() for k, v in outputs.items()}, f"{out}/outputs.safetensors")
save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, f"{out}/timm.safetensors")
save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, f"{out}/clip.safetensors")
"""


def test_plain_timm_and_open_clip_load_the_pushed_repos(hub, tmp_path, timm_folder, open_clip_folder):
    """A fresh process with only HF_ENDPOINT (and an empty HF_HOME) set: the libraries' own hf-hub: loaders."""
    (folder, vit), (clip_folder, clip, _, tokenizer) = timm_folder, open_clip_folder
    push_to_hub(folder, f"{USER}/plain-vit")
    push_to_hub(clip_folder, f"{USER}/plain-clip")
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "fresh_home"), "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    run = subprocess.run([sys.executable, "-c", PLAIN_LIBRARIES, str(tmp_path), f"{USER}/plain-vit",
                          f"{USER}/plain-clip"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert list((tmp_path / "fresh_home" / "hub").glob("models--sslhub-test--plain-*"))  # fetched, not found
    assert_same_state(load_file(str(tmp_path / "timm.safetensors")), vit.state_dict())
    assert_same_state(load_file(str(tmp_path / "clip.safetensors")), clip.state_dict())
    out = load_file(str(tmp_path / "outputs.safetensors"))
    with torch.no_grad():
        assert torch.equal(out["timm"], vit.forward_head(vit.forward_features(out["x"]), pre_logits=True))
        assert torch.allclose(out["clip_image"], clip.encode_image(out["x"]), atol=1e-6)
        assert torch.allclose(out["clip_text"], clip.encode_text(tokenizer(["a photo of a cat"])), atol=1e-5)


# ------------------------------------------------------------------------------------------ progress
@pytest.fixture(scope="module")
def larger_export(tmp_path_factory) -> Path:
    """An export with a few MB of weights (channels 16-32-64-128: ≈ 2.8 MB)."""
    return make_export(tmp_path_factory.mktemp("larger") / "export", seed=4, channels=(16, 32, 64, 128))


@pytest.mark.parametrize("lfs", [True, False], ids=["weights-through-lfs", "every-file-inline"])
def test_push_reports_the_bytes_of_each_file_as_they_are_sent(hub, larger_export, lfs):
    """Through LFS (a PUT streamed from disk, as the Hub takes weights) and inline (base64 in the commit
    body, as a server without LFS takes every file), each file's count grows to its size."""
    weights = (larger_export / "model.safetensors").stat().st_size
    assert weights > 2_000_000
    repo, calls, again, n = f"{USER}/progress-{lfs}", [], [], len(hub.requests)
    hub.lfs = lfs
    try:
        push_to_hub(larger_export, repo, progress=lambda *call: calls.append(call))
        puts = [r for r in hub.requests[n:] if r[0] == "PUT"]
        push_to_hub(larger_export, repo, progress=lambda *call: again.append(call))
    finally:
        hub.lfs = True
    assert again == []  # unchanged files are not sent again
    assert len(puts) == (1 if lfs else 0)  # the weights went the intended way
    assert hub.files(repo)["model.safetensors"] == (larger_export / "model.safetensors").read_bytes()
    sizes = {p.name: p.stat().st_size for p in larger_export.iterdir()}
    assert {path for path, _, _ in calls} == set(sizes)
    for path, size in sizes.items():
        counts = [done for p, done, total in calls if p == path and total == size]
        assert counts == sorted(set(counts)) and counts[-1] == size, (path, counts)
    steps = [done for p, done, _ in calls if p == "model.safetensors"]
    assert len(steps) >= 3 and steps[0] < weights // 2  # counted while it is sent, not once at the end


def test_cli_push_shows_a_byte_bar_per_file(hub, larger_export):
    """`sslhub push` in a fresh process (stderr not a terminal): a bar per file, its bytes, and the time."""
    run = subprocess.run([sys.executable, "-m", "sslhub", "push", str(larger_export), f"{USER}/progress-cli"],
                         env=os.environ, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    from tqdm import tqdm

    for path in ("model.safetensors", "config.json", "README.md"):
        size = tqdm.format_sizeof((larger_export / path).stat().st_size)
        assert re.search(rf"{re.escape(path)}: 100%\|[^\r\n]*\| {re.escape(size)}/{re.escape(size)} ", run.stderr), \
            (path, size, run.stderr[-3000:])
    assert re.search(rf"pushed {USER}/progress-cli@main in [0-9.]+ s: [0-9.]+ MB sent\n", run.stderr), run.stderr
    assert json.loads(run.stdout.splitlines()[-1])["commit"] == hub.head(f"{USER}/progress-cli")


# ------------------------------------------------------------------------------------ revisions, cache
def test_pinned_revisions(hub, cache, tmp_path):
    repo = f"{USER}/revisions"
    v1, v2, v3 = (make_export(tmp_path / f"v{i}", seed=i) for i in (1, 2, 3))
    weights = {v: load_file(str(v / "model.safetensors")) for v in (v1, v2, v3)}
    assert not torch.equal(weights[v1]["conv1.weight"], weights[v2]["conv1.weight"])
    first = push_to_hub(v1, repo).oid
    push_to_hub(v2, repo)
    push_to_hub(v3, repo, revision="exp")  # a new branch, made from main
    assert hub.head(repo) not in (first, hub.head(repo, "exp"))
    for spec, folder in ((f"@{first}", v1), ("", v2), ("@main", v2), ("@exp", v3)):
        enc = load_encoder(f"hf-hub:{repo}{spec}")
        assert_same_state(enc.model.model.state_dict(), weights[folder])


def test_second_pull_works_with_the_server_stopped(hub, cache, sslhub_export):
    repo = f"{USER}/offline"
    sha = push_to_hub(sslhub_export, repo).oid
    online = load_encoder(f"hf-hub:{repo}")
    pinned = load_encoder(f"hf-hub:{repo}@{sha}")
    hub.stop()
    try:
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(hub.url, timeout=5)  # really down
        t = time.time()
        again, again_pinned = load_encoder(f"hf-hub:{repo}"), load_encoder(f"hf-hub:{repo}@{sha}")
        assert time.time() - t < 30  # the endpoint probe fails at once: no retrying with back-off
        with pytest.raises(LoadError, match=f"(?s)could not be downloaded \\(no network: {hub.url} could not be "
                                            "reached.*local-dir:DIR"):
            load_encoder(f"hf-hub:{repo}@never-fetched")
    finally:
        hub.start()
    x = torch.randn(2, 3, 32, 32)
    for enc in (again, pinned, again_pinned):
        assert_same_state(enc.model.model.state_dict(), online.model.model.state_dict())
        assert torch.equal(enc.embed_images(x), online.embed_images(x))


# ------------------------------------------------------------------------------------------ bad input
def test_missing_repo_and_revision(hub, cache, sslhub_export):
    repo = f"{USER}/bad-input"
    push_to_hub(sslhub_export, repo)
    with pytest.raises(LoadError, match=f"no model repo {USER}/no-such-model on {hub.url}, or it is private"):
        load_encoder(f"hf-hub:{USER}/no-such-model")
    with pytest.raises(LoadError, match=f"the repo {repo} has no revision 'no-such-branch'"):
        load_encoder(f"hf-hub:{repo}@no-such-branch")
    with pytest.raises(LoadError, match="has no revision '0{40}'"):
        load_encoder(f"hf-hub:{repo}@{'0' * 40}")


def test_paths_with_dotdot_are_refused(hub, cache, sslhub_export):
    with pytest.raises(LoadError, match="'../main' is not a revision name"):
        load_encoder(f"hf-hub:{USER}/bad-input@../main")
    # a hostile Hub listing a file that would land outside the cache: nothing is downloaded
    files = {p.name: p.read_bytes() for p in sslhub_export.iterdir()}
    hub.seed(f"{USER}/hostile", {**files, "../../escape.json": b"{}"})
    with pytest.raises(LoadError, match=r"unsafe file names \('../../escape.json'\)"):
        load_encoder(f"hf-hub:{USER}/hostile")
    assert not list(cache.glob("models--*/snapshots/*/*"))
    # the server refuses such paths too (huggingface_hub refuses them before sending: this request is raw)
    repo = f"{USER}/hostile"
    head = hub.head(repo)
    lines = [{"key": "header", "value": {"summary": "escape"}},
             {"key": "file", "value": {"path": "a/../../x.json", "content": "e30=", "encoding": "base64"}}]
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"}
    commit = urllib.request.Request(f"{hub.url}/api/models/{repo}/commit/main", method="POST", headers=headers,
                                    data="\n".join(map(json.dumps, lines)).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(commit, timeout=30)
    assert refused.value.code == 400 and "Invalid path 'a/../../x.json'" in refused.value.headers["X-Error-Message"]
    assert hub.head(repo) == head
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{hub.url}/{repo}/resolve/main/%2E%2E/%2E%2E/secret", timeout=30)
    assert refused.value.code == 400 and "Invalid path '../../secret'" in refused.value.headers["X-Error-Message"]


def test_interrupted_download_leaves_no_corrupt_file(hub, cache, tmp_path):
    from huggingface_hub import constants

    folder, model = timm_export(tmp_path / "resnet", "resnet10t")
    repo = f"{USER}/interrupted"
    push_to_hub(folder, repo)
    size = (folder / "model.safetensors").stat().st_size
    assert size > 2 * constants.DOWNLOAD_CHUNK_SIZE  # the client keeps a first chunk: a retry resumes with Range
    hub.break_downloads(repo, "model.safetensors", times=100)  # a connection that keeps breaking
    with pytest.raises(LoadError, match=r"could not be downloaded \(RemoteProtocolError: peer closed connection"):
        load_encoder(f"hf-hub:{repo}")
    assert not list(cache.glob("models--*/snapshots/*/model.safetensors"))
    assert_cache_intact(cache)

    hub.break_downloads(repo, "model.safetensors", times=1)  # one break: the client resumes where it stopped
    n = len(hub.requests)
    enc = load_encoder(f"hf-hub:{repo}")
    # the weights come from the storage the Hub's redirect names, as on the Hub (their /resolve answers 302)
    gets = [r for r in hub.requests[n:] if r[0] == "GET" and r[1].startswith(f"/lfs-files/{repo}/")]
    assert [r[2] for r in gets] == [None, f"bytes={constants.DOWNLOAD_CHUNK_SIZE}-"]
    assert hub.lfs_redirects > 0
    assert_cache_intact(cache)
    head = ("fc.weight", "fc.bias")  # the encoder is the model without its classifier
    assert_same_state(enc.model.state_dict(), {k: v for k, v in model.state_dict().items() if k not in head})


def test_pickle_only_repo_is_refused(hub, cache, tmp_path):
    from huggingface_hub import HfApi

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet10t", "num_classes": 0}))
    torch.save({"conv1.weight": torch.zeros(1)}, folder / "pytorch_model.bin")
    repo = f"{USER}/pickled"
    HfApi().create_repo(repo)
    HfApi().upload_folder(folder_path=folder, repo_id=repo)  # as another tool would publish it
    with pytest.raises(LoadError, match=r"(?s)pickle files only \(pytorch_model.bin\).*weights_only=True.*save_file"):
        load_encoder(f"hf-hub:{repo}")
    assert not list(cache.rglob("*.bin"))
    with pytest.raises(LoadError, match=r"pickle files only \(pytorch_model.bin\)"):
        push_to_hub(folder, f"{USER}/pickled-again")


def test_private_repo_needs_a_token(hub, cache, sslhub_export, monkeypatch):
    repo = f"{USER}/private"
    push_to_hub(sslhub_export, repo, private=True)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(LoadError, match=f"no model repo {repo} on .* private or gated and no token was sent: "
                                        "set HF_TOKEN or run `hf auth login`"):
        load_encoder(f"hf-hub:{repo}")
    with pytest.raises(PushError, match="no Hugging Face token. Set HF_TOKEN, run `hf auth login`"):
        push_to_hub(sslhub_export, repo)
    monkeypatch.setenv("HF_TOKEN", "hf_notAValidToken")
    with pytest.raises(LoadError, match=r"refused the request \(401: Invalid credentials in Authorization header\)"
                                        "; check the token in HF_TOKEN"):
        load_encoder(f"hf-hub:{repo}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    enc = load_encoder(f"hf-hub:{repo}")
    assert_same_state(enc.model.model.state_dict(), load_file(str(sslhub_export / "model.safetensors")))


def test_push_refuses_folders_and_targets_it_cannot_publish(hub, tmp_path, sslhub_export):
    with pytest.raises(PushError, match="no such folder"):
        push_to_hub(tmp_path / "missing", f"{USER}/x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("hello")
    with pytest.raises(LoadError, match="not a model"):
        push_to_hub(tmp_path / "notes", f"{USER}/x")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in sslhub_export.iterdir():
        (mixed / p.name).write_bytes(p.read_bytes())
    torch.save({}, mixed / "training_state.pt")
    with pytest.raises(PushError, match=r"holds pickle files \(training_state.pt\) beside its safetensors weights"):
        push_to_hub(mixed, f"{USER}/x")
    for repo, revision, message in (("no-namespace", None, "ORG/NAME"), (f"{USER}/x", "a" * 40, "a branch name"),
                                    (f"{USER}/x", "../main", "a branch name")):
        with pytest.raises(PushError, match=message):
            push_to_hub(sslhub_export, repo, revision=revision)
    with pytest.raises(PushError, match="refused the push \\(403: .*may write to someone-else"):
        push_to_hub(sslhub_export, "someone-else/x")


def test_push_refuses_a_link_to_a_file_outside_the_folder(hub, tmp_path, sslhub_export):
    """A symlink in an export (say, to ~/.ssh/id_rsa or a token file) would publish that file: refused before
    anything is sent; a link to a file inside the folder is its own file and is published."""
    secret = tmp_path / "elsewhere" / "token.txt"
    secret.parent.mkdir()
    secret.write_text("hf_not_for_the_hub")
    folder = tmp_path / "linked"
    folder.mkdir()
    for p in sslhub_export.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "notes.txt").symlink_to(secret)
    n = len(hub.requests)
    with pytest.raises(PushError, match=r"holds links to files outside it \(notes.txt → .*token.txt\)"):
        push_to_hub(folder, f"{USER}/linked")
    assert not [r for r in hub.requests[n:] if r[0] != "GET"], "nothing was sent"
    (folder / "notes.txt").unlink()
    (folder / "card.md").symlink_to(folder / "README.md")  # inside the folder: fine
    push_to_hub(folder, f"{USER}/linked")
    assert hub.files(f"{USER}/linked")["card.md"] == (folder / "README.md").read_bytes()


def test_token_is_never_printed_logged_or_pushed(hub, timm_folder, monkeypatch, capfd, caplog):
    """The token given as an argument (API) and in HF_TOKEN (CLI), at the most verbose log level."""
    secret = "hf_leakCheck" + secrets.token_hex(12)
    hub.tokens[secret] = USER
    folder, _ = timm_folder
    repo = f"{USER}/secret-check"
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")  # its own logger stops at WARNING by default
    monkeypatch.delenv("HF_TOKEN")
    with client_env(HF_DEBUG="1"):  # huggingface_hub's own debug mode: it logs every request
        push_to_hub(folder, repo, token=secret, private=True)
        monkeypatch.setenv("HF_TOKEN", secret)
        out = run_cli("-v", "push", str(folder), repo, "--revision", "cli", "--message", "from the CLI")
    assert out == {"repo": repo, "revision": "cli", "commit": hub.head(repo, "cli"),
                   "url": f"{hub.url}/{repo}/commit/{hub.head(repo, 'cli')}"}
    captured = capfd.readouterr()
    assert "authorization: <TOKEN>" in caplog.text  # every request was logged, its token header redacted
    for text in (captured.out, captured.err, caplog.text, json.dumps(out)):
        assert secret not in text
    for record in caplog.records:
        assert secret not in record.getMessage() and secret not in str(record.exc_info)
    for branch in ("main", "cli"):
        pushed = hub.files(repo, branch)
        assert "README.md" in pushed and all(secret.encode() not in data for data in pushed.values())
    assert all(secret.encode() not in p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_push_to_a_server_that_never_answers_fails_in_bounded_time(hub, tmp_path, sslhub_export, monkeypatch):
    """A loopback socket that accepts connections and never answers: the push fails within the read timeout
    with a message naming the endpoint (before, it waited forever in create_repo)."""
    import socket
    import threading
    import time

    from sslhub.inference.loaders import hub as network

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held, stop = [], threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # accepted, never read from or answered
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    monkeypatch.setattr(network, "READ_TIMEOUT_S", 2.0)
    try:
        with client_env(HF_ENDPOINT=url):
            t0 = time.monotonic()
            with pytest.raises(PushError, match=rf"{re.escape(url)} did not answer in time .*each read 2 s"):
                push_to_hub(sslhub_export, f"{USER}/black-hole")
            assert time.monotonic() - t0 < 20
    finally:
        stop.set()
        for s in held:
            s.close()
        listener.close()
