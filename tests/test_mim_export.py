"""A trained MAE / SimMIM run: its reconstruction picture in the run folder and the export, an encoder that plain timm
loads with no sslhub import, the head beside it, and a reloaded model that reconstructs as the trained one did."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_VIT
from safetensors.torch import load_file

from sslhub import formats, load_encoder
from sslhub.methods.mim import MIM_HEAD, PICTURE, load_masked_model
from sslhub.train.recipe import load_recipe
from sslhub.train.trainer import Trainer

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", params=["mae", "simmim"])
def trained(request, tmp_path_factory):
    name = request.param
    extra = ["method_args.decoder_dim=32", "method_args.decoder_depth=1", "method_args.decoder_heads=2"] \
        if name == "mae" else []
    r = load_recipe(REPO / f"recipes/{name}_imagenette.yaml",
                    [*TINY_VIT, "data.batch_size=16", "train.max_steps=3", "optim.warmup_epochs=0", *extra])
    out = tmp_path_factory.mktemp(name)
    trainer = Trainer(r, out, progress=False)
    result = trainer.fit()
    return name, out, trainer, result


def test_pictures_in_run_folder_export_and_card(trained):
    name, out, _, result = trained
    export = out / formats.RUN_EXPORT
    for folder in (out, export):
        data = (folder / PICTURE).read_bytes()
        assert data.startswith(PNG)
    from PIL import Image

    img = Image.open(export / PICTURE)
    assert img.width > 4 * 32 and img.height > 8 * 32  # 4 panels of 8 held-out images
    card = (export / formats.CARD).read_text()
    assert f"]({PICTURE})" in card and "reconstructions of held-out images" in card
    assert result["pretext"]["masked_mse"] > 0  # held-out masked reconstruction error, in the card too
    assert "masked_mse" in card


def test_encoder_alone_in_model_safetensors_head_beside_it(trained):
    name, out, trainer, _ = trained
    export = out / formats.RUN_EXPORT
    enc = load_file(str(export / formats.WEIGHTS))
    assert set(enc) == set(trainer.method.backbone.model.state_dict())  # timm's names, nothing of the decoder
    head = load_file(str(export / MIM_HEAD))
    assert head and all(k.startswith(type(trainer.method).head_keys) for k in head)
    cfg = json.loads((export / formats.CONFIG).read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["sslhub"]["masked_modeling"]["method"] == name


def test_plain_timm_loads_the_encoder_without_sslhub(trained, tmp_path):
    _, out, _, _ = trained
    export = out / formats.RUN_EXPORT
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "x.npy", x.numpy())
    code = (
        "import sys, numpy as np, timm, torch\n"
        f"m = timm.create_model('local-dir:{export}', pretrained=True).eval()\n"
        "assert not any(k.startswith('sslhub') for k in sys.modules), 'sslhub was imported'\n"
        f"x = torch.from_numpy(np.load('{tmp_path / 'x.npy'}'))\n"
        f"np.save('{tmp_path / 'y.npy'}', m(x).detach().numpy())\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, cwd=tmp_path)
    want = load_encoder(export).model.eval()(x).detach().numpy()
    assert np.allclose(np.load(tmp_path / "y.npy"), want, atol=1e-5)


def test_reloaded_export_reconstructs_as_the_trained_method(trained):
    _, out, trainer, _ = trained
    loaded = load_masked_model(out / formats.RUN_EXPORT)
    method = trainer.method.eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mask = method.draw_mask(3, torch.Generator().manual_seed(0))
    for a, b in zip(method.reconstruction_panels(images, mask), loaded.reconstruction_panels(images, mask)):
        assert torch.equal(a, b)


def test_a_non_masked_modeling_export_is_refused(tmp_path):
    from sslhub.errors import InputError
    from sslhub.models.backbone import Backbone, EncoderConfig
    from sslhub.publish.export import export_encoder

    folder = export_encoder(Backbone(EncoderConfig(arch="resnet18", image_size=32)), tmp_path / "e", {"method": "x"})
    with pytest.raises(InputError, match="not a masked-modeling export"):
        load_masked_model(folder)


def test_dino_vit_recipe_exports_a_teacher_with_attention_maps(tmp_path):
    """recipes/dino_vit_imagenette.yaml (a ViT with dynamic_img_size for the local crops) exports a teacher that the
    demo's attention tab reads at the encoder's own size: one map per head over the patch grid."""
    from PIL import Image

    from sslhub.inference.attention import attention_heads

    r = load_recipe(REPO / "recipes/dino_vit_imagenette.yaml",
                    [*TINY_VIT, "encoder.model_args={patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2, "
                                "dynamic_img_size: true}", "method_args.views2.size=32",
                     "method_args.local_views.size=16", "method_args.n_local_views=2", "method_args.out_dim=64",
                     "method_args.hidden_dim=64", "method_args.bottleneck_dim=32", "data.batch_size=16",
                     "train.max_steps=2", "eval.knn.test="])
    result = Trainer(r, tmp_path, progress=False).fit()
    enc = load_encoder(result["export"])
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    heads = attention_heads(enc, img)
    assert heads.shape == (2, 8, 8)  # 32 px / 4-px patches, 2 heads
    assert np.all(heads >= 0) and np.all(heads.sum(axis=(1, 2)) <= 1 + 1e-5)  # softmax rows, the class token left out
