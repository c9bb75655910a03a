"""Issue 14: `sslhub eval zeroshot` and `sslhub eval retrieval` checked by value, not by shape, with an oracle
encoder (``tests/oracle_encoder.py``) loaded by the real CLI through ``load_encoder``: each image is embedded
as the text embedding of its own class name or captions, so the wiring (decoding, labels and class names,
prompt templates, caption owners, the metrics) must give 100; then the oracle errs in known ways and the
metrics must equal values worked out by hand below (never with sslhub's metric code).

The ground truth (which image has which class or captions) is read from the shards here, with tarfile.
"""
import io
import json
import tarfile

import pytest
from conftest import REPO, SAMPLE, run_cli
from oracle_encoder import install, read_shard, write_oracle

FLICKR = REPO / "data" / "flickr8k-sample"
CIFAR_SHARD = SAMPLE / "test-00000.tar.gz"
FLICKR_SHARD = FLICKR / "test-00000.tar.gz"
CLASSES = json.loads((SAMPLE / "dataset.json").read_text())["classes"]


@pytest.fixture
def oracles(monkeypatch, tmp_path):
    monkeypatch.setenv("SSLHUB_CACHE", str(tmp_path / "cache"))  # no zero-shot class matrix from elsewhere
    return install(monkeypatch)


def cifar_labels(shard=CIFAR_SHARD) -> dict[str, int]:
    """key → class index of the shard's ``.cls``, in shard order."""
    return {k: int(f["cls"].decode()) for k, f in read_shard(shard).items()}


def flickr_captions() -> dict[str, list[str]]:
    """key → its 5 captions (the ``.json``), in shard order."""
    return {k: json.loads(f["json"])["captions"] for k, f in read_shard(FLICKR_SHARD).items()}


def zeroshot(model, data, *extra):
    return run_cli("eval", "zeroshot", "--model", str(model), "--test", str(data), "--templates", "cifar",
                   "--workers", "0", *extra)


def retrieval(model):
    return run_cli("eval", "retrieval", "--model", str(model), "--data", str(FLICKR), "--split", "test",
                   "--workers", "0")


# ----------------------------------------------------------------------------------------------- zero-shot
@pytest.mark.parametrize("classes", ["dataset", "shuffled", "subset"])
def test_zeroshot_oracle_scores_100(oracles, tmp_path, classes):
    """Each image is its class name's text: top-1 = top-5 = mean per-class recall = 100 on the test images.

    ``shuffled``: --classes names the classes in another order than dataset.json; labels must follow the
    names, not the positions. ``subset``: 7 of the 10 classes, shuffled: the 150 images of the other 3 are
    left out (and said), the rest still score 100.
    """
    labels = cifar_labels()
    assert len(labels) == 500
    model = write_oracle(tmp_path / "oracle", "words", [CIFAR_SHARD], {k: [CLASSES[c]] for k, c in labels.items()})
    order = {"dataset": None, "shuffled": (3, 7, 0, 9, 5, 1, 8, 2, 6, 4), "subset": (8, 2, 6, 0, 9, 4, 1)}[classes]
    extra = ["--classes", ",".join(CLASSES[i] for i in order)] if order else []
    res = zeroshot(model, SAMPLE, *extra)
    assert res["classes"] == (7 if classes == "subset" else 10) and res["templates"] == 18
    left_out = {"left_out": 150, "unknown_classes": ["cat", "dog", "horse"]} if classes == "subset" else {}
    assert res["zeroshot"] == {"top1": 100.0, "top5": 100.0, "mean_per_class_recall": 100.0, **left_out}
    named = {CLASSES[i] for i in order or range(10)}
    assert set(oracles[-1].seen) == {k for k, c in labels.items() if CLASSES[c] in named}  # each one embedded


# Per class (CIFAR-10 order), how many test images the uneven set takes: 50 in all
UNEVEN = {"airplane": 8, "automobile": 2, "bird": 6, "cat": 4, "deer": 7, "dog": 3, "frog": 5, "horse": 9,
          "ship": 4, "truck": 2}


def uneven_set(folder):
    """The first UNEVEN[c] test images of each class, in a shard of their own whose dataset.json lists the
    classes in reverse order (its .cls renumbered to match): labels only make sense through its class names."""
    folder.mkdir()
    reversed_classes = CLASSES[::-1]
    taken = {c: [] for c in CLASSES}
    files = read_shard(CIFAR_SHARD)
    with tarfile.open(folder / "test-00000.tar.gz", "w:gz") as tar:
        for key, f in files.items():
            name = CLASSES[int(f["cls"].decode())]
            if len(taken[name]) == UNEVEN[name]:
                continue
            taken[name].append(key)
            for ext, data in (("jpg", f["jpg"]), ("cls", str(reversed_classes.index(name)).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert {c: len(k) for c, k in taken.items()} == UNEVEN
    (folder / "dataset.json").write_text(json.dumps({
        "name": "cifar10-uneven", "classes": reversed_classes,
        "splits": {"test": {"n": 50, "shards": ["test-00000.tar.gz"]}}}))
    return taken


def test_zeroshot_oracle_known_mistakes(oracles, tmp_path):
    """The oracle errs on three classes; every other image is its own class name.

    Scores are (image · class row): an image embedded as texts with counts n_1 > n_2 > … ranks those classes
    in that order, and every class it does not name after them (score exactly 0).

    - cat (4 images): "dog dog cat" → dog first, cat 2nd: top-1 wrong, top-5 right.
    - horse (first 3 of 9): "truck truck horse" → horse 2nd: top-1 wrong, top-5 right.
    - ship (4 images), each a wrong class 5 down to 1 times then ship once:
        first 2: airplane×6 automobile×5 bird×4 deer×3 frog×2 ship → ship 6th: top-5 wrong;
        last 2:  airplane×5 automobile×4 bird×3 deer×2 ship        → ship 5th: top-5 right.

    By hand, over the 50 images:
      top-1: 50 − 4 (cat) − 3 (horse) − 4 (ship) = 39 right → 78.0
      top-5: 50 − 2 (first 2 ships) = 48 right → 96.0
      mean per-class recall: 7 classes at 100, cat 0, ship 0, horse 6/9 = 66.67
                             → (700 + 66.666…) / 10 = 76.67
    """
    data = tmp_path / "uneven"
    taken = uneven_set(data)
    texts = {k: [name] for name, keys in taken.items() for k in keys}
    for k in taken["cat"]:
        texts[k] = ["dog", "dog", "cat"]
    for k in taken["horse"][:3]:
        texts[k] = ["truck", "truck", "horse"]
    wrong = ["airplane", "automobile", "bird", "deer", "frog"]
    for k in taken["ship"][:2]:
        texts[k] = [c for n, c in zip((6, 5, 4, 3, 2), wrong, strict=True) for _ in range(n)] + ["ship"]
    for k in taken["ship"][2:]:
        texts[k] = [c for n, c in zip((5, 4, 3, 2), wrong[:4], strict=True) for _ in range(n)] + ["ship"]
    model = write_oracle(tmp_path / "oracle", "words", [data / "test-00000.tar.gz"], texts)
    res = zeroshot(model, data)
    assert res["classes"] == 10
    assert res["zeroshot"] == {"top1": 78.0, "top5": 96.0, "mean_per_class_recall": 76.67}


# ----------------------------------------------------------------------------------------------- retrieval
def test_retrieval_oracle_scores_100(oracles, tmp_path):
    """Each image is the sum of its 5 captions' (orthogonal) text embeddings: R@1 = 100 both ways."""
    caps = flickr_captions()
    model = write_oracle(tmp_path / "oracle", "sentences", [FLICKR_SHARD], caps)
    res = retrieval(model)
    assert res["images"] == 100 and res["captions"] == 500
    for direction in ("image_to_text", "text_to_image"):
        assert res["retrieval"][direction] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0}, direction
    assert set(oracles[-1].seen) == set(caps)


def test_retrieval_oracle_known_mistakes(oracles, tmp_path):
    """Every image keeps its own 5 captions (weight 1) but some also carry other images' captions (weight 2).

    Captions are orthogonal unit axes, so caption c scores (weight of c in image m) / |m| with image m:
    an image of 5 own captions has |m| = √5 and each of them scores 1/√5 ≈ 0.447 with it.

    Images by shard order, #0…#99:
    - #0↔#1, #2↔#3 swapped: own + 2×(the partner's 5) → |m| = √(5 + 20) = 5.
        image→text: partner's 5 captions at 2/5 first, own ones 6th → R@1, R@5 wrong, R@10 right.
        text→image: each of their 20 captions scores 2/5 with the partner, 1/5 with its own → 2nd: R@1 wrong.
    - #10, #11, #12: own + 2×(captions 0–2 of #20, #21, #22) → |m| = √(5 + 12) = √17.
        image→text: 3 foreign captions at 2/√17 first, own 4th → R@1 wrong, R@5 right.
        text→image: those 9 captions score 2/√17 ≈ 0.485 > 1/√5 with #10–12 → their image 2nd: R@1 wrong.
        (#10–12's own captions score 1/√17 with them and 0 elsewhere: right.)
    - #50…#54: own + 2×(caption 0 of #40); #60…#63: own + 2×(caption 0 of #41) → |m| = √(5 + 4) = 3.
        image→text: the foreign caption at 2/3 first, own 2nd → R@1 wrong (9 images).
        text→image: caption 0 of #40 scores 2/3 with 5 images before its own (1/√5) → 6th: R@1, R@5 wrong;
                    caption 0 of #41: 4 images before its own → 5th: R@1 wrong, R@5 right.
    - #70…#79: own + 2×(caption 0 of #42) → |m| = 3.
        image→text: as #50…: R@1 wrong (10 images).
        text→image: caption 0 of #42 has 10 images before its own → 11th: R@1, R@5, R@10 wrong.
    - #80: own + 2×(the 10 captions of #81 and #82) → |m| = √(5 + 40) = √45.
        image→text: 10 foreign captions first, own 11th → R@1, R@5, R@10 wrong.
        text→image: the captions of #81, #82 score 2/√45 ≈ 0.298 < 1/√5 with #80: their own image stays 1st
        (only because embeddings are normalised: unnormalised, 2 > 1 would put #80 first).

    By hand:
      image→text over 100 images: R@1 misses 4 + 3 + 5 + 4 + 10 + 1 = 27 → 73.0;
                                  R@5 misses 4 + 1 = 5 → 95.0; R@10 misses 1 → 99.0
      text→image over 500 captions: R@1 misses 20 + 9 + 1 + 1 + 1 = 32 → 468/500 = 93.6;
                                    R@5 misses 2 → 498/500 = 99.6; R@10 misses 1 → 499/500 = 99.8
    """
    caps = flickr_captions()
    keys = list(caps)
    assert len(keys) == 100
    texts = {k: list(c) for k, c in caps.items()}

    def add(i, extra):
        texts[keys[i]] += [t for t in extra for _ in range(2)]

    for a, b in ((0, 1), (2, 3)):
        add(a, caps[keys[b]])
        add(b, caps[keys[a]])
    for i, j in ((10, 20), (11, 21), (12, 22)):
        add(i, caps[keys[j]][:3])
    for i in range(50, 55):
        add(i, caps[keys[40]][:1])
    for i in range(60, 64):
        add(i, caps[keys[41]][:1])
    for i in range(70, 80):
        add(i, caps[keys[42]][:1])
    add(80, caps[keys[81]] + caps[keys[82]])
    model = write_oracle(tmp_path / "oracle", "sentences", [FLICKR_SHARD], texts)
    res = retrieval(model)
    assert res["images"] == 100 and res["captions"] == 500
    assert res["retrieval"]["image_to_text"] == {"R@1": 73.0, "R@5": 95.0, "R@10": 99.0}
    assert res["retrieval"]["text_to_image"] == {"R@1": 93.6, "R@5": 99.6, "R@10": 99.8}
