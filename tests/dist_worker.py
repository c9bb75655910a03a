"""Run by tests/test_distributed.py under torchrun: one step of a method on this rank's slice."""
import sys

import torch

from sslhub import distributed as D
from sslhub.methods.base import Batch
from sslhub.recipe import recipe_from_dict
from sslhub.registry import get_method

DETERMINISTIC_VIEWS = {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip_p": 0.0, "jitter_p": 0.0, "gray_p": 0.0}
# variants of a method tested on their own: name → (method, method_args)
VARIANTS = {"clip-global-loss": ("clip", {"local_loss": False})}
TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8,
                                             "head_width": 16},
             "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def build(name: str, workdir: str = "."):
    import json
    from pathlib import Path

    method, args = VARIANTS.get(name, (name, {}))
    encoder = {"arch": "resnet18", "cifar_stem": True, "image_size": 16, "model_args": {"channels": [8, 16, 16, 16]}}
    if get_method(method).needs_text:  # an image–text method: a one-layer CLIP from a JSON config
        (Path(workdir) / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
        encoder = {"arch": str(Path(workdir) / "tiny-clip.json"), "image_size": 16}
    r = recipe_from_dict({"method": method, "encoder": encoder,
                          "method_args": {**args, "views": {"size": 16, **DETERMINISTIC_VIEWS}}})
    torch.manual_seed(0)
    m = get_method(method).create(r.encoder, r.method_args)
    if D.is_dist():
        D.convert_batchnorm(m)
    return m


def captions(n: int) -> list[str]:
    """Captions of different lengths, one per image."""
    return [f"a photo of {' and '.join(['thing'] * (1 + i % 3))} number {i}" for i in range(n)]


def step(method, images, texts=None):
    texts = texts if texts is not None else captions(images.shape[0])
    out = method.loss(Batch(images, texts=texts if method.needs_text else None,
                            rng=torch.Generator().manual_seed(0)))
    out["loss"].backward()
    params = [p for p in method.parameters() if p.requires_grad]
    D.average_gradients(params)
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    loss = D.all_reduce_mean(out["loss"].detach())
    return loss, grads


if __name__ == "__main__":
    name, out_dir = sys.argv[1], sys.argv[2]
    D.init_from_env()
    images = torch.load(f"{out_dir}/images.pt", weights_only=True)
    b = images.shape[0] // D.world_size()
    mine = images[D.rank() * b : (D.rank() + 1) * b]
    loss, grads = step(build(name, out_dir), mine, captions(images.shape[0])[D.rank() * b : (D.rank() + 1) * b])
    torch.save({"loss": loss, "grads": grads}, f"{out_dir}/rank{D.rank()}.pt")
