"""Labels are matched by class name between a bank / train set and its test set, never by folder position."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sslhub import load_encoder
from sslhub.errors import InputError
from sslhub.eval import protocols
from sslhub.eval.labels import match_labels

COLOURS = {"blue": (20, 40, 230), "green": (30, 200, 40), "red": (220, 30, 30), "yellow": (230, 220, 30)}


def folder(root, classes, n=6, seed=0):
    """An ImageFolder of flat-coloured 32-px images with a little noise: a class is its colour."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            img = np.clip(np.array(COLOURS[c]) + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return load_encoder("timm:resnet18", pretrained=False)  # random weights: flat colours still separate


def test_knn_with_a_class_missing_from_the_test_set(tmp_path, encoder):
    bank = folder(tmp_path / "bank", ["blue", "green", "red", "yellow"])
    test = folder(tmp_path / "test", ["green", "yellow"], seed=1)  # positions 0, 1 here; 1, 3 in the bank
    res = protocols.knn(encoder, str(bank), "train", str(test), "test", ks=(3,), progress=False)
    assert res["top1@k=3"] == 100.0  # by position it was 0: every green query called blue, every yellow green


def test_unknown_test_classes_are_left_out_and_named(tmp_path, encoder):
    bank = folder(tmp_path / "bank", ["blue", "green", "red"])
    test = folder(tmp_path / "test", ["green", "red", "yellow"], seed=1)
    res = protocols.knn(encoder, str(bank), "train", str(test), "test", ks=(3,), progress=False)
    assert res["unknown_classes"] == ["yellow"] and res["left_out"] == 6 and res["test_size"] == 12
    assert res["top1@k=3"] == 100.0


def test_disjoint_class_sets_are_an_error(tmp_path, encoder):
    bank = folder(tmp_path / "bank", ["blue", "green"])
    test = folder(tmp_path / "test", ["red", "yellow"], seed=1)
    with pytest.raises(InputError, match="no class in common"):
        protocols.knn(encoder, str(bank), "train", str(test), "test", ks=(3,), progress=False)


def test_match_labels_reindexes_by_name():
    labels, keep, info = match_labels(["a", "b", "c", "d"], ["d", "b", "x"], torch.tensor([0, 1, 2, 0]))
    assert labels.tolist() == [3, 1, 3] and keep.tolist() == [True, True, False, True]
    assert info == {"unknown_classes": ["x"], "left_out": 1}
    same, keep, info = match_labels(None, ["a"], torch.tensor([0, 0]))  # one side without names: as numbers
    assert same.tolist() == [0, 0] and keep.all() and info == {}


def test_linear_probe_cli_matches_by_name(tmp_path):
    from conftest import run_cli

    bank = folder(tmp_path / "bank", ["blue", "green", "red", "yellow"], n=8)
    test = folder(tmp_path / "test", ["green", "yellow"], seed=1)
    out = tmp_path / "enc"
    import timm
    torch.manual_seed(0)
    timm.models.save_for_hf(timm.create_model("resnet18", num_classes=0, pretrained=False), out,
                            safe_serialization=True)
    res = run_cli("eval", "linear", "--model", str(out), "--train", str(bank), "--test", str(test), "--workers", "0")
    assert res["linear"]["top1"] == 100.0


def test_post_training_knn_never_uses_another_data_set(tmp_path, caplog):
    """A stock recipe on the user's own ImageFolder (no held-out split): no k-NN figure in the result or the
    card — before, the bundled CIFAR-10 sample served as queries against the user's classes."""
    import json

    from conftest import REPO, TINY, run_cli

    data = folder(tmp_path / "mine", ["blue", "green", "red", "yellow"], n=8)
    res = run_cli("train", str(REPO / "recipes/rotation_cifar10.yaml"), *sum((["--set", s] for s in TINY), []),
                  "--set", f"data.train={data}", "--set", "data.batch_size=8", "--set", "train.max_steps=1",
                  "--out", str(tmp_path / "run"), "--no-progress")
    assert "knn" not in res
    cfg = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert "knn" not in cfg["sslhub"].get("eval", {})
    assert caplog.text.count("no 'test' split of its own") == 1  # resolved and said once


def test_post_training_knn_uses_the_training_data_own_test_split(tmp_path):
    from conftest import REPO, SAMPLE, TINY, run_cli

    res = run_cli("train", str(REPO / "recipes/rotation_cifar10.yaml"), *sum((["--set", s] for s in TINY), []),
                  "--set", f"data.train={SAMPLE}", "--set", "train.max_steps=1", "--out", str(tmp_path / "run"),
                  "--no-progress")
    assert res["knn"]["test"] == str(SAMPLE) and res["knn"]["test_size"] == 500
