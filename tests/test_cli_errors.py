"""Bad arguments are one line and exit code 2, never a traceback from a library (scikit-learn, torch's sampler):
a --low-shot fraction too small for the data, a batch size or step count that cannot work, a --resume with
another method or architecture than the run's."""
import numpy as np
import pytest
import torch
from conftest import REPO, SAMPLE

from sslhub.apps.cli import main
from sslhub.errors import InputError
from sslhub.eval.linear import check_low_shot, linear_probe, low_shot

TINY_RUN = ["--set", "encoder.model_args.channels=[8,8,8,8]", "--set", "data.batch_size=32", "--set",
            "data.num_workers=0", "--set", "method_args.views.size=32", "--set", "eval.knn.test=", "--no-progress"]


def cli_error(capsys, *argv: str) -> str:
    """Run ``sslhub ARGV``; it must exit 2 with one ``sslhub: error:`` line (and no traceback) on stderr."""
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sslhub: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------ --low-shot
def test_low_shot_fractions_that_cannot_work_are_explained():
    labels = np.repeat(np.arange(10), 100)  # 100 per class, as data/cifar10-sample's train split
    check_low_shot(labels, [0.02, 0.1, 1.0])
    with pytest.raises(InputError, match=r"^--low-shot 0\.01 keeps 1 label\(s\) of class 'airplane' \(100 in the "
                                         r"training data\) and the probe needs 2 labels of each class .*: use "
                                         r"--low-shot 0\.02 or more$"):
        check_low_shot(labels, [0.1, 0.01], "--low-shot", [f"{c}" for c in ["airplane", *"bcdefghij"]])
    for bad in (0, -0.1, 1.5):
        with pytest.raises(InputError, match=r"must be in \(0, 1\]"):
            check_low_shot(labels, [bad], "--low-shot")
    single = np.array([0, 0, 0, 0, 1])  # class 1: one image in all
    with pytest.raises(InputError, match="^low-shot fraction 1: class 1 has 1 training label.* leave it out"):
        check_low_shot(single, [1.0])


def test_probes_too_small_to_hold_out_are_input_errors():
    x, y = torch.randn(10, 4), torch.arange(10) % 5  # 2 per class
    assert low_shot(x, y, x, y, fractions=(1.0,), c_grid=(1.0,))["100%"]["labels"] == 10
    with pytest.raises(InputError, match="low-shot fraction 0.5 keeps 1 label"):  # was sklearn: 0 samples to fit
        low_shot(x, y, x, y, fractions=(0.5,), c_grid=(1.0,))
    with pytest.raises(InputError, match="too few to hold out"):  # one image per class: nothing left to fit
        linear_probe(x[:5], y[:5], x, y, c_grid=(1.0,))


def test_cli_low_shot_too_small_for_the_data(open_clip_folder, capsys):
    line = cli_error(capsys, "eval", "linear", "--model", str(open_clip_folder[0]), "--train", str(SAMPLE),
                     "--test", str(SAMPLE), "--low-shot", "0.1", "0.01", "--workers", "0")
    assert "--low-shot 0.01 keeps 1 label(s) of class" in line and "use --low-shot 0.02 or more" in line


# -------------------------------------------------------------------------------------- sslhub train
@pytest.mark.parametrize("override, message", [("data.batch_size=0", "the global batch must be a positive integer"),
                                               ("train.max_steps=-5", "must be >= 1")])
def test_cli_train_impossible_sizes(override, message, tmp_path, capsys):
    line = cli_error(capsys, "train", str(REPO / "recipes/rotation_cifar10.yaml"), "--set", override,
                     "--out", str(tmp_path / "run"), "--no-progress")
    assert line.startswith(f"sslhub: error: --set {override}: ") and message in line
    assert not (tmp_path / "run").exists()


def test_cli_resume_with_another_method_or_architecture(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", str(REPO / "recipes/rotation_cifar10.yaml"), *TINY_RUN, "--set", "train.max_steps=2",
                 "--out", out]) == 0
    line = cli_error(capsys, "train", str(REPO / "recipes/simclr_cifar10.yaml"), *TINY_RUN, "--set",
                     "train.max_steps=4", "--out", out, "--resume")
    assert "method: 'rotation' → 'simclr'" in line and "--resume" in line
    line = cli_error(capsys, "train", str(REPO / "recipes/rotation_cifar10.yaml"), *TINY_RUN, "--set",
                     "train.max_steps=4", "--set", "encoder.arch=resnet34", "--set",
                     "encoder.model_args.channels=[8,8,8,16]", "--out", out, "--resume")
    assert "encoder.arch: 'resnet18' → 'resnet34'" in line and "encoder.model_args.channels" in line
    assert "method:" not in line


def test_ctrl_c_outside_training_is_one_line(monkeypatch, capsys):
    """Ctrl-C while a command loads or evaluates (the training loop has its own: tests/test_guard.py)."""
    from sslhub.apps import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_train", interrupted)
    assert cli.main(["train", "recipes/simclr_cifar10.yaml"]) == 130
    err = capsys.readouterr().err
    assert err == "sslhub: interrupted (Ctrl-C) during `sslhub train`\n"
