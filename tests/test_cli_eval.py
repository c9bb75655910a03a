"""`sslhub eval {linear,zeroshot,retrieval}` and `sslhub index {build,search}` end to end on the bundled data."""
import json

import pytest
from conftest import REPO, SAMPLE, TINY, run_cli
from PIL import Image

FLICKR = REPO / "data" / "flickr8k-sample"


@pytest.fixture(scope="module")
def sslhub_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return run_cli("train", str(REPO / "recipes/rotation_cifar10.yaml"), *sum((["--set", s] for s in TINY), []),
                   "--set", "train.max_steps=1", "--set", "eval.knn.test=", "--out", str(out), "--no-progress")["export"]


def test_eval_linear_with_low_shot(sslhub_export):
    res = run_cli("eval", "linear", "--model", sslhub_export, "--train", str(SAMPLE), "--test", str(SAMPLE),
                  "--low-shot", "0.1", "--workers", "0")
    assert res["linear"]["train_size"] == 1000 and res["linear"]["test_size"] == 500
    assert 10 < res["linear"]["top1"] <= 100  # random-init features of real images beat chance
    assert res["low_shot"]["10%"]["labels"] == 100


def test_eval_zeroshot_and_prompt_check(open_clip_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("SSLHUB_CACHE", str(tmp_path))
    res = run_cli("eval", "zeroshot", "--model", str(open_clip_folder[0]), "--test", str(SAMPLE),
                  "--templates", "cifar", "--workers", "0")
    assert res["classes"] == 10 and res["templates"] == 18
    assert set(res["zeroshot"]) == {"top1", "top5", "mean_per_class_recall"}
    assert isinstance(res["prompt_check"], list)


def test_eval_zeroshot_needs_class_names(open_clip_folder, tmp_path, capsys):
    from sslhub.apps.cli import main
    for name in ("a", "b"):
        (tmp_path / "flat").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "flat" / f"{name}.png")
    rc = main(["eval", "zeroshot", "--model", str(open_clip_folder[0]), "--test", str(tmp_path / "flat"),
               "--workers", "0"])
    assert rc == 2 and "no class names found" in capsys.readouterr().err


def test_eval_retrieval_flickr_protocol(open_clip_folder):
    res = run_cli("eval", "retrieval", "--model", str(open_clip_folder[0]), "--data", str(FLICKR), "--split", "test",
                  "--workers", "0")
    assert res["images"] == 100 and res["captions"] == 500
    for direction in ("image_to_text", "text_to_image"):
        r = res["retrieval"][direction]
        assert r["R@1"] <= r["R@5"] <= r["R@10"] <= 100


def test_eval_retrieval_on_a_vision_only_model_is_clear(sslhub_export, capsys):
    from sslhub.apps.cli import main
    rc = main(["eval", "retrieval", "--model", sslhub_export, "--data", str(FLICKR), "--workers", "0"])
    assert rc == 2 and "no text tower" in capsys.readouterr().err


def test_index_build_and_search(open_clip_folder, tmp_path):
    res = run_cli("index", "build", "--model", str(open_clip_folder[0]), "--data", str(SAMPLE), "--split", "test",
                  "--out", str(tmp_path / "index"), "--workers", "0")
    assert res["vectors"] == 500 and res["kind"] == "flat"
    img = tmp_path / "q.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(img)
    out = run_cli("index", "search", "--index", str(tmp_path / "index"), "--image", str(img), "--k", "3")
    hits = out["results"][0]["hits"]
    assert len(hits) == 3 and {"id", "score", "label", "class"} <= set(hits[0])
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    out = run_cli("index", "search", "--index", str(tmp_path / "index"), "--text", "a red car", "a cat", "--k", "2")
    assert [r["query"] for r in out["results"]] == ["a red car", "a cat"]
    assert json.loads((tmp_path / "index" / "meta.json").read_text())["info"]["model"] == str(open_clip_folder[0])
