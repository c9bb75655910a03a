"""Pieces several methods share: MLP heads, momentum (EMA) targets and their schedule, multi-crop.

- ``projection_mlp``: Linear → BN → ReLU blocks and a last Linear (optionally followed by BN), the
  projector / predictor shape of SimCLR, MoCo v2/v3, BYOL, SimSiam, VICReg and Barlow Twins.
- ``momentum_copy`` / ``ema_update_``: a frozen copy of a module and the in-place update
  ``θ_target ← m·θ_target + (1 − m)·θ_online`` (parameters only; the copy's BN buffers follow its own
  batches, as in BYOL's and MoCo's reference code).
- ``cosine_momentum``: BYOL's schedule τ_k = 1 − (1 − τ_base)·(cos(πk/K) + 1)/2, also used by DINO and
  MoCo v3 (Grill et al. 2020 §3.2).
- ``off_diagonal``: the off-diagonal entries of a square matrix (VICReg, Barlow Twins).
- ``normalized_std``: the collapse diagnostic ``z_std`` (SimSiam §4.1).
- ``forward_multicrop``: views of different resolutions through one network, one forward per
  resolution (Caron et al. 2020/2021: global and local crops cannot share a batch tensor).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import sslhub.distributed as D


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, last_bn: bool = False,
                   last_bn_affine: bool = True, bias: bool = True) -> nn.Sequential:
    """``layers - 1`` blocks of Linear (no bias) → BN → ReLU, then Linear (+ BN when ``last_bn``).

    ``last_bn_affine=False`` gives SimSiam's / MoCo v3's projector output BN without γ, β.
    ``layers=1`` is a single Linear.
    """
    if layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got layers={layers}")
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        d = hidden_dim
    mods.append(nn.Linear(d, out_dim, bias=bias and not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*mods)


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that the optimiser never sees (``requires_grad=False``)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``θ_target ← m·θ_target + (1 − m)·θ_online`` for every parameter (same structure required)."""
    t = [p for p in target.parameters()]
    o = [p.detach() for p in online.parameters()]
    if len(t) != len(o):
        raise ValueError(f"EMA target has {len(t)} parameters, the online network {len(o)}")
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, o, alpha=1.0 - momentum)


def cosine_momentum(base: float, step: int, max_steps: int, final: float = 1.0) -> float:
    """BYOL's schedule: ``base`` at step 0 rising to ``final`` at ``max_steps`` along a half cosine."""
    if max_steps <= 0:
        return base
    k = min(max(step, 0), max_steps)
    return final - (final - base) * (math.cos(math.pi * k / max_steps) + 1) / 2


def forward_multicrop(net: Callable[[torch.Tensor], torch.Tensor], crops: Sequence[torch.Tensor]) -> torch.Tensor:
    """``net`` over every crop, consecutive crops of one resolution in one call; rows in crop order.

    ``crops``: V tensors ``(B, 3, S_v, S_v)`` → ``(V·B, D)``.
    """
    out: list[torch.Tensor] = []
    i = 0
    while i < len(crops):
        j = i
        while j < len(crops) and crops[j].shape[-2:] == crops[i].shape[-2:]:
            j += 1
        out.append(net(torch.cat(list(crops[i:j]))))
        i = j
    return torch.cat(out)


@torch.no_grad()
def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse diagnostic (SimSiam §4.1, Fig. 2): mean over dimensions of the std over the global
    batch of ``z / ‖z‖``.  About 1/√d for well-spread outputs, 0 when every output is the same."""
    z = F.normalize(D.gather_nograd(z.detach().float()), dim=-1)  # (N, d)
    return z.std(dim=0).mean()


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The ``d² − d`` off-diagonal entries of a square ``(d, d)`` matrix, flattened (the shared trick of the
    VICReg and Barlow Twins reference code: drop the last entry, view as ``(d − 1, d + 1)``, drop column 0)."""
    d = m.shape[0]
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()
