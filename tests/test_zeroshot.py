"""Zero-shot classification equals open_clip's own protocol; prompt check; few-shot prototypes."""
import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLE
from PIL import Image

from sslhub import load_encoder
from sslhub.data.images import decode_all
from sslhub.data.sources import open_source
from sslhub.inference.templates import (
    CIFAR_TEMPLATES,
    IMAGENET_TEMPLATES,
    resolve_templates,
)
from sslhub.inference.zeroshot import (
    PrototypeClassifier,
    ZeroShotClassifier,
    check_labels,
)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def images():
    d = decode_all(open_source(SAMPLE, "test"), 32, progress=False)
    return [Image.fromarray(d.images[i].permute(1, 2, 0).numpy()) for i in range(0, 500, 25)], d.labels[::25]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSLHUB_CACHE", str(tmp_path / "cache"))


def test_equals_open_clip_build_zero_shot_classifier(open_clip_folder, images):
    from open_clip import build_zero_shot_classifier

    folder, model, preprocess, tokenizer = open_clip_folder
    enc = load_encoder(folder)
    clf = ZeroShotClassifier(enc, CLASSES, templates="cifar", cache=False)
    ref_w = build_zero_shot_classifier(model, tokenizer, CLASSES, CIFAR_TEMPLATES, num_classes_per_batch=3)  # (D, C)
    assert torch.allclose(clf.weights, ref_w.T, atol=1e-5)
    with torch.no_grad():  # open_clip's own classification loop (as in CLIP_benchmark)
        feats = model.encode_image(torch.stack([preprocess(im) for im in images[0]]), normalize=True)
        ref_p = (model.logit_scale.exp() * feats @ ref_w).softmax(dim=-1)
    p = clf.predict_proba(images[0])
    assert p.shape == (20, 10) and torch.allclose(p, ref_p, atol=1e-5)
    idx, names = clf.predict(images[0], k=3)
    assert torch.equal(idx, ref_p.topk(3, dim=-1).indices) and names[0][0] == CLASSES[idx[0, 0]]
    m = clf.evaluate(images[0], images[1])
    assert set(m) == {"top1", "top5", "mean_per_class_recall"} and 0 <= m["top1"] <= m["top5"] <= 100


def test_class_matrix_cache_memory_and_disk(open_clip_folder, tmp_path):
    enc = load_encoder(open_clip_folder[0])
    assert enc.fingerprint
    a = ZeroShotClassifier(enc, CLASSES[:3], templates=IMAGENET_TEMPLATES[:5])
    files = list((tmp_path / "cache" / "zeroshot").glob("*.safetensors"))
    assert len(files) == 1
    enc.embed_text = None  # a cache hit must not touch the text tower
    b = ZeroShotClassifier(enc, CLASSES[:3], templates=IMAGENET_TEMPLATES[:5])
    assert torch.equal(a.weights, b.weights)
    from sslhub.inference import zeroshot
    zeroshot._MEMORY_CACHE.clear()
    c = ZeroShotClassifier(enc, CLASSES[:3], templates=IMAGENET_TEMPLATES[:5])  # from disk
    assert torch.equal(a.weights, c.weights)
    with pytest.raises(TypeError):  # other classes: not cached, needs the tower
        ZeroShotClassifier(enc, CLASSES[:4], templates=IMAGENET_TEMPLATES[:5])


def test_bad_labels_and_templates(open_clip_folder):
    enc = load_encoder(open_clip_folder[0])
    with pytest.raises(ValueError, match="label list is empty"):
        ZeroShotClassifier(enc, [])
    with pytest.raises(ValueError, match="'Cat' \(#2\) repeats 'cat' \(#0\)"):
        ZeroShotClassifier(enc, ["cat", "dog", "Cat"])
    with pytest.raises(ValueError, match="is empty"):
        ZeroShotClassifier(enc, ["cat", "  "])
    with pytest.raises(ValueError, match="no '{}'"):
        ZeroShotClassifier(enc, ["cat", "dog"], templates=["a photo"])
    with pytest.raises(ValueError, match="unknown template set 'imagenett'"):
        resolve_templates("imagenett")
    assert len(resolve_templates("imagenet")) == 80 and len(resolve_templates("cifar")) == 18


def test_vision_only_encoder_is_refused_with_a_way_out(tmp_path):
    from sslhub.models.backbone import Backbone, EncoderConfig
    from sslhub.publish.export import export_encoder

    export_encoder(Backbone(EncoderConfig(arch="resnet18", image_size=32, model_args={"channels": [8, 8, 8, 8]})),
                   tmp_path / "e")
    with pytest.raises(TypeError, match="PrototypeClassifier"):
        ZeroShotClassifier(load_encoder(tmp_path / "e"), ["cat", "dog"])


class _FakeText:
    """An encoder whose text embeddings are chosen by hand: 'kitten' ≈ 'cat'."""
    has_text = True
    vecs = {"cat": [1.0, 0.0, 0.0], "kitten": [0.98, 0.2, 0.0], "truck": [0.0, 0.0, 1.0]}

    def embed_text(self, texts, batch_size=256, normalize=False, progress=None):
        out = torch.tensor([self.vecs[t.split()[-1].rstrip(".")] for t in texts])
        return F.normalize(out, dim=-1) if normalize else out


def test_prompt_check_flags_confusable_labels():
    warnings = check_labels(_FakeText(), ["cat", "kitten", "truck"], threshold=0.9)
    assert len(warnings) == 1
    w = warnings[0]
    assert w["labels"] == ("cat", "kitten") and w["similarity"] == pytest.approx(0.98 / (0.98**2 + 0.04) ** 0.5, abs=1e-4)
    assert "embed almost alike" in w["suggestion"]
    assert check_labels(_FakeText(), ["cat", "truck"]) == []


def test_prototype_classifier_is_nearest_class_mean(tmp_path):
    from sslhub.models.backbone import Backbone, EncoderConfig
    from sslhub.publish.export import export_encoder

    torch.manual_seed(0)
    export_encoder(Backbone(EncoderConfig(arch="resnet18", cifar_stem=True, image_size=32,
                                          model_args={"channels": [8, 16, 32, 32]})), tmp_path / "e")
    enc = load_encoder(tmp_path / "e")
    train = decode_all(open_source(SAMPLE, "train"), 32, progress=False)
    test = decode_all(open_source(SAMPLE, "test"), 32, progress=False)
    shots = {c: train.images[train.labels == i][:10] for i, c in enumerate(CLASSES)}
    clf = PrototypeClassifier(enc, shots)
    feats = enc.embed_images(test.images, normalize=True)
    protos = F.normalize(torch.stack([F.normalize(enc.embed_images(v), dim=-1).mean(0) for v in shots.values()]), dim=-1)
    assert torch.allclose(clf.weights, protos, atol=1e-5)
    assert torch.equal(clf.predict(test.images)[0][:, 0], (feats @ protos.T).argmax(1))
    assert clf.evaluate(test.images, test.labels)["top1"] > 10  # random-init features already beat chance
    with pytest.raises(ValueError, match="no example images"):
        PrototypeClassifier(enc, {"a": train.images[:2], "b": []})
