"""Optimisers (AdamW, SGD, LARS), their weight-decay groups and the batch scaling of the learning rate.

The per-step warm-up + cosine schedule is :func:`sslhub.schedules.cosine_schedule`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sslhub.train.recipe import OptimConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017, https://arxiv.org/abs/1708.03888).

    Per tensor, as BYOL's LARS (and SimCLR's, whose trust ratio is the same)::

        d = g + wd·w;  trust = η·‖w‖/‖d‖ (1 when ‖w‖ or ‖d‖ is 0);  buf = m·buf + trust·d;  w ← w − lr·buf

    The trust ratio divides by the norm of the decayed gradient ‖g + wd·w‖ (SimCLR, BYOL), not by
    ‖g‖ + wd·‖w‖ (the paper's eq. 6, lightly).  The lr multiplies the whole buffer (BYOL, PyTorch's SGD);
    SimCLR multiplies it into each new term, the same at a constant lr.  As in SimCLR/BYOL, parameter
    groups with ``lars_exclude=True`` (biases, norm layers) get neither weight decay nor the trust ratio.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "trust_coefficient": trust_coefficient, "eps": eps, "lars_exclude": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():  # the closure runs its own backward
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not group["lars_exclude"]:
                    if group["weight_decay"]:
                        d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0),
                                        group["trust_coefficient"] * w_norm / (d_norm + group["eps"]),
                                        torch.ones_like(w_norm))
                    d = d.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(d).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices/kernels only; biases and norm scales (ndim ≤ 1) are exempt."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The recipe's base lr is for batch 256 (Goyal et al. 2017); scale it to the real batch."""
    if cfg.lr_scaling == "linear":
        return cfg.lr * global_batch / 256
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(global_batch / 256)
    return cfg.lr


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(params, cfg.weight_decay)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    trust_coefficient=cfg.trust_coefficient)
    for g in groups:
        g.pop("lars_exclude", None)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas)
