"""Bad input: unreadable files are skipped and counted (the log names each); odd modes are converted;
an empty folder, a missing path or a broken shard is a clear error naming it."""
import io
import logging
import tarfile

import numpy as np
import pytest
from conftest import REPO, TINY, run_cli
from PIL import Image

from sslhub.data.images import decode_all, open_image
from sslhub.data.sources import DataError, open_source


def _jpeg(color=(200, 30, 30), mode="RGB", size=(40, 30)):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def messy_folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "good.jpg").write_bytes(_jpeg())
    (d / "truncated.jpg").write_bytes(_jpeg()[:300])
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.jpg").write_text("this is not an image")
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(d / "cmyk.jpg", "JPEG", quality=100)
    arr16 = np.full((32, 32), 65535 // 2, dtype=np.uint16)  # mid-grey, 16 bits
    Image.fromarray(arr16, "I;16").save(d / "grey16.png")
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 0))  # fully transparent blue → white
    rgba.save(d / "rgba.png")
    Image.new("L", (32, 32), 77).save(d / "gray.png")
    return d


def test_unreadable_files_are_skipped_counted_and_named(messy_folder, caplog):
    src = open_source(messy_folder)
    assert len(src) == 8
    with caplog.at_level(logging.WARNING, logger="sslhub.data"):
        dec = decode_all(src, 32, progress=False)
    assert len(dec) == 5 and len(dec.skipped) == 3
    log = caplog.text
    assert "skipped 3 unreadable sample(s)" in log
    for name, why in (("truncated.jpg", "cannot decode"), ("empty.jpg", "empty file (0 bytes)"),
                      ("notes.jpg", "not an image file")):
        assert name in log and why in log


def test_odd_modes_become_8bit_rgb(messy_folder):
    px = lambda name: decode_all(open_source(messy_folder / name), 32, progress=False).images[0, :, 16, 16].tolist()
    r, g, b = px("cmyk.jpg")
    assert r > 240 and g < 20 and b < 20
    assert all(abs(v - 128) <= 1 for v in px("grey16.png"))
    assert px("rgba.png") == [255, 255, 255]
    assert px("gray.png") == [77, 77, 77]


def test_shard_with_bad_samples(tmp_path, caplog):
    shard = tmp_path / "train-00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [("a.jpg", _jpeg()), ("a.cls", b"3"), ("b.jpg", b""), ("b.cls", b"1"),
                           ("c.cls", b"2"), ("d.jpg", _jpeg()), ("d.cls", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    src = open_source(shard)
    assert [s.label for s in src.samples] == [3, 1]
    assert any("c: no image file" in s for s in src.skipped) and any(".cls is not an integer" in s for s in src.skipped)
    with caplog.at_level(logging.WARNING, logger="sslhub.data"):
        dec = decode_all(src, 32, progress=False)
    assert dec.labels.tolist() == [3] and "skipped 3" in caplog.text


def test_clear_errors_for_missing_empty_and_broken_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found in '.*empty'"):
        open_source(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        open_source(tmp_path / "nope")
    with pytest.raises(DataError, match=r"shard\(s\) not found: .*train-0000\[0-1\]|not found"):
        open_source(str(tmp_path / "train-{00000..00001}.tar"))
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 10)
    with pytest.raises(DataError, match="bad.tar: not a readable tar shard"):
        open_source(tmp_path / "bad.tar")
    with pytest.raises(DataError, match="no split 'val'"):
        open_source(REPO / "data/cifar10-sample", "val")
    with pytest.raises(DataError, match="no data given"):
        open_source("")


def test_all_unreadable_is_an_error(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 1 images could be decoded"):
        decode_all(open_source(tmp_path), 32, progress=False)


def test_open_image_rejects_with_the_name():
    with pytest.raises(ValueError, match="photo.jpg: not an image file"):
        open_image(b"hello", "photo.jpg")


def test_training_on_a_messy_imagefolder_completes(tmp_path, messy_folder):
    tree = tmp_path / "tree"
    for cls in ("a", "b"):
        (tree / cls).mkdir(parents=True)
        for f in messy_folder.iterdir():
            (tree / cls / f.name).write_bytes(f.read_bytes())
    res = run_cli("train", str(REPO / "recipes/rotation_cifar10.yaml"), *sum((["--set", s] for s in TINY), []),
                  "--set", f"data.train={tree}", "--set", "data.batch_size=8", "--set", "train.max_steps=2",
                  "--set", f"eval.knn.test={tree}", "--set", "eval.knn.k=[3]", "--out", str(tmp_path / "run"),
                  "--no-progress")
    assert res["steps"] == 2 and res["knn"]["bank_size"] == 10


def test_cli_reports_bad_data_with_exit_code_2(tmp_path, capsys):
    from sslhub.apps.cli import main
    (tmp_path / "empty").mkdir()
    rc = main(["train", str(REPO / "recipes/simclr_cifar10.yaml"), "--set", f"data.train={tmp_path / 'empty'}",
               "--out", str(tmp_path / "run")])
    assert rc == 2
    assert "no images found in" in capsys.readouterr().err
    rc = main(["train", str(REPO / "recipes/simclr_cifar10.yaml"), "--set", "optim.lr=[1]"])
    assert rc == 2 and "optim.lr: expected float" in capsys.readouterr().err
