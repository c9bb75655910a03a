"""End to end: recipe → train → k-NN → export → load_encoder / plain timm give the same features."""
import json
import subprocess
import textwrap

import torch
from conftest import REPO, SAMPLE, TINY, python, run_cli

from sslhub import load_encoder
from sslhub.data.images import decode_all
from sslhub.data.sources import open_source


def test_train_evaluate_export_load(tmp_path):
    res = run_cli("train", str(REPO / "recipes/simclr_cifar10.yaml"), *sum((["--set", s] for s in TINY), []),
                  "--set", "train.max_steps=3", "--set", "optim.warmup_epochs=0", "--out", str(tmp_path / "run"),
                  "--no-progress")
    export = tmp_path / "run" / "export"
    assert res["export"] == str(export) and res["steps"] == 3
    assert {"top1@k=20", "top1@k=200", "top5@k=20"} <= set(res["knn"])
    assert 0 <= res["knn"]["top1@k=20"] <= 100
    assert sorted(p.name for p in export.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["architecture"] == "resnet18_cifar" and cfg["sslhub"]["steps"] == 3
    assert cfg["sslhub"]["eval"]["knn"]["top1@k=20"] == res["knn"]["top1@k=20"]
    # the trainer's k-NN is the one `sslhub eval knn` computes on the folder a user loads
    again = run_cli("eval", "knn", "--model", str(export), "--train", str(SAMPLE), "--test", str(SAMPLE))
    assert {k: again["knn"][k] for k in ("top1@k=20", "top1@k=200")} == {k: res["knn"][k] for k in ("top1@k=20", "top1@k=200")}
    card = (export / "README.md").read_text()
    assert "library_name: sslhub" in card and str(res["knn"]["top1@k=20"]) in card
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,lr,loss") and len(rows) == 4
    assert (tmp_path / "run" / "training_curves.png").stat().st_size > 5000

    enc = load_encoder(export)
    assert enc.dim == 128 and enc.image_size == 32 and not enc.has_text
    test = decode_all(open_source(SAMPLE, "test"), 32, progress=False)
    feats = enc.embed_images(test.images[:16])
    assert feats.shape == (16, 128)
    # PIL images and file paths go through encoder.preprocess and give the same features
    from PIL import Image
    pil = [Image.fromarray(test.images[i].permute(1, 2, 0).numpy()) for i in range(4)]
    assert torch.allclose(enc.embed_images(pil), feats[:4], atol=1e-4)
    pil[0].save(tmp_path / "a.png")
    assert torch.allclose(enc.embed_images([str(tmp_path / "a.png")]), feats[:1], atol=1e-4)

    # Plain timm (CIFAR stem registered by `import sslhub`) loads identical weights.
    torch.save(test.images[:16], tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sslhub, timm, torch
        from sslhub.data.augment import eval_transform
        m = timm.create_model("local-dir:{export}", pretrained=True).eval()
        x = eval_transform(torch.load("{tmp_path / 'x.pt'}", weights_only=True), 32,
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        with torch.no_grad():
            torch.save(m(x), "{tmp_path / 'y.pt'}")
    """)
    subprocess.run([python(), "-c", script], check=True, cwd=REPO)
    assert torch.allclose(torch.load(tmp_path / "y.pt", weights_only=True), feats, atol=1e-5)


def test_vit_export_loads_in_plain_timm_without_sslhub(tmp_path):
    res = run_cli("train", str(REPO / "recipes/rotation_cifar10.yaml"),
                  "--set", "encoder.arch=vit_tiny_patch16_224",
                  "--set", "encoder.cifar_stem=false",
                  "--set", "encoder.model_args={patch_size: 8, depth: 2}",
                  "--set", "data.batch_size=16", "--set", "data.num_workers=0",
                  "--set", "train.max_steps=2", "--set", "eval.knn.test=", "--out", str(tmp_path / "run"),
                  "--no-progress")
    export = res["export"]
    enc = load_encoder(f"local-dir:{export}")
    x = torch.randn(3, 3, 32, 32)
    feats = enc.embed_images(x)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys, timm, torch
        m = timm.create_model("local-dir:{export}", pretrained=True).eval()
        assert "sslhub" not in sys.modules
        with torch.no_grad():
            torch.save(m(torch.load("{tmp_path / 'x.pt'}", weights_only=True)), "{tmp_path / 'y.pt'}")
    """)
    subprocess.run([python(), "-c", script], check=True, cwd=tmp_path)
    assert torch.allclose(torch.load(tmp_path / "y.pt", weights_only=True), feats, atol=1e-5)


def test_eval_knn_cli(tmp_path):
    run = run_cli("train", str(REPO / "recipes/rotation_cifar10.yaml"), *sum((["--set", s] for s in TINY), []),
                  "--set", "train.max_steps=1", "--set", "eval.knn.test=", "--out", str(tmp_path / "r"),
                  "--no-progress")
    res = run_cli("eval", "knn", "--model", run["export"], "--train", str(SAMPLE), "--test", str(SAMPLE),
                  "--k", "5", "20", "--workers", "0")
    assert res["knn"]["bank_size"] == 1000 and res["knn"]["test_size"] == 500
    assert set(res["knn"]) >= {"top1@k=5", "top1@k=20"}


def test_bad_evaluation_data_keeps_the_export(tmp_path, capsys):
    """A k-NN test set that cannot be read fails the run with its message, after the export is written."""
    from sslhub.apps.cli import main

    rc = main(["train", str(REPO / "recipes/simclr_cifar10.yaml"), *sum((["--set", s] for s in TINY), []),
               "--set", "train.max_steps=2", "--set", f"eval.knn.test={tmp_path / 'missing'}",
               "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing" in err and "is written, without evaluation figures" in err
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
    assert load_encoder(tmp_path / "run" / "export").dim == 128
