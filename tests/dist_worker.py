"""Run by tests/test_distributed.py under torchrun: one step of a method on this rank's slice."""
import sys

import torch

from sslhub import distributed as D
from sslhub.encoder import Backbone
from sslhub.methods.base import Batch
from sslhub.recipe import recipe_from_dict
from sslhub.registry import get_method

DETERMINISTIC_VIEWS = {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip_p": 0.0, "jitter_p": 0.0, "gray_p": 0.0}


def build(name: str):
    r = recipe_from_dict({"method": name, "encoder": {"arch": "resnet18", "cifar_stem": True, "image_size": 16,
                                                      "model_args": {"channels": [8, 16, 16, 16]}},
                          "method_args": {"views": {"size": 16, **DETERMINISTIC_VIEWS}}})
    torch.manual_seed(0)
    method = get_method(name)(Backbone(r.encoder), r.method_args)
    if D.is_dist():
        D.convert_batchnorm(method)
    return method


def step(method, images):
    out = method.loss(Batch(images, rng=torch.Generator().manual_seed(0)))
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
    loss, grads = step(build(name), mine)
    torch.save({"loss": loss, "grads": grads}, f"{out_dir}/rank{D.rank()}.pt")
