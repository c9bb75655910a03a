"""Fine-tuning protocol: all layers trained with a small learning rate and a fresh linear head.

As in MAE/BEiT fine-tuning (He et al. 2021, https://arxiv.org/abs/2111.06377, appendix A.3): AdamW,
cosine schedule with warm-up, optional layer-wise learning-rate decay (layer ``i`` of ``L`` gets
``lr · decay^(L - i)``, via timm's ``param_groups_layer_decay``), random-resized-crop + flip views.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn
from tqdm.auto import tqdm

from sslhub.data.augment import BatchAugment, ViewConfig, eval_transform
from sslhub.data.images import DecodedImages
from sslhub.schedules import cosine_schedule


def finetune(backbone: nn.Module, train: DecodedImages, test: DecodedImages, epochs: float = 10, lr: float = 1e-3,
             batch_size: int = 128, weight_decay: float = 0.05, layer_decay: float | None = None,
             warmup_epochs: float = 1.0, seed: int = 0, progress: bool = True) -> dict:
    """Top-1 (%) on ``test`` after fine-tuning a copy of ``backbone`` (the original is not modified)."""
    backbone = copy.deepcopy(backbone).train()
    cfg = backbone.cfg
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    head = nn.Linear(backbone.dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=2e-5)  # MAE: near-zero head init
    nn.init.zeros_(head.bias)
    if layer_decay is not None:
        groups = param_groups_layer_decay(backbone.model, weight_decay=weight_decay, layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(backbone.model, weight_decay=weight_decay)
    groups.append({"params": list(head.parameters()), "weight_decay": 0.0, "lr_scale": 1.0})
    opt = torch.optim.AdamW(groups, lr=lr)
    augment = BatchAugment(ViewConfig(size=cfg.image_size, scale=(0.35, 1.0), hflip_p=0.5, jitter_p=0.0, gray_p=0.0,
                                      mean=tuple(cfg.mean), std=tuple(cfg.std)))
    n = len(train)
    steps_per_epoch = max(1, n // batch_size)
    total = max(1, int(epochs * steps_per_epoch))
    lrs = cosine_schedule(lr, 0.0, total, int(warmup_epochs * steps_per_epoch))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    for step in tqdm(range(total), desc="fine-tuning", disable=not progress, leave=False):
        for group in opt.param_groups:
            group["lr"] = float(lrs[step]) * group.get("lr_scale", 1.0)
        i = (step % steps_per_epoch) * batch_size
        if i == 0 and step:
            perm = torch.randperm(n, generator=g)
        idx = perm[i : i + batch_size]
        logits = head(backbone(augment(train.images[idx], g)))
        loss = F.cross_entropy(logits, train.labels[idx])
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"fine-tuning diverged at step {step} (loss {loss.item()}): lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    backbone.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 256):
            x = eval_transform(test.images[i : i + 256], cfg.image_size, cfg.mean, cfg.std)
            correct += (head(backbone(x)).argmax(1) == test.labels[i : i + 256]).sum().item()
    return {"top1": round(100 * correct / len(test), 2), "steps": total, "epochs": epochs, "lr": lr,
            "layer_decay": layer_decay, "train_size": n, "test_size": len(test)}
