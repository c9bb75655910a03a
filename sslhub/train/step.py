"""One optimiser step, as the trainer (and the tests) run it: every micro-batch's forward and backward, then
the averaged update; plus the per-step seeds and caption draws that make a step a function of its number."""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn

import sslhub.distributed as D
from sslhub.methods.base import Batch, Method
from sslhub.train.guard import NonFiniteLoss


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def accumulate_gradients(method: Method, groups: dict[str, list[nn.Parameter]], batches: list[Batch],
                         autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                         ) -> dict[str, float]:
    """Forward and backward every micro-batch of one step; ``.grad`` ends as the mean of their gradients.

    Returns the mean over micro-batches of every value the method logs.  A non-finite loss raises
    :class:`NonFiniteLoss` before its backward.  With several processes its backward still runs (its collectives
    must meet the other processes') and the gradients are made NaN, so ``apply_update`` stops every process.
    """
    n, logged, poisoned = len(batches), {}, False
    for batch in batches:
        with autocast():
            out = method.loss(batch)
        loss = float(out["loss"].detach())
        if not math.isfinite(loss):
            if not D.is_dist():
                raise NonFiniteLoss(f"loss is {loss} at step {batch.step}")
            poisoned = True
        keys = list(groups)
        for i, k in enumerate(keys):  # each loss only into its own optimiser's parameters
            inputs = None if len(keys) == 1 else groups[k]
            (out[k] / n).backward(inputs=inputs, retain_graph=i < len(keys) - 1)
        for k, v in out.items():
            logged[k] = logged.get(k, 0.0) + float(v.detach()) / n
    if poisoned:
        first = next(p for ps in groups.values() for p in ps)
        first.grad = torch.full_like(first, float("nan"))
    return logged


def apply_update(method: Method, optimizers: dict[str, torch.optim.Optimizer], params: list[nn.Parameter],
                 step: int, max_steps: int, clip_grad: float | None = None) -> None:
    """Average gradients over processes, clip, step every optimiser, then the method's ``on_step_end``.

    Non-finite gradients (from a finite loss) raise :class:`NonFiniteLoss` before any weight changes."""
    D.average_gradients(params)
    grads = [p.grad for p in params if p.grad is not None]
    norm = float(nn.utils.get_total_norm(grads)) if grads else 0.0
    if not math.isfinite(norm):
        raise NonFiniteLoss(f"the gradients are not finite at step {step} (norm {norm})")
    if clip_grad:
        nn.utils.clip_grads_with_norm_(params, clip_grad, torch.tensor(norm))
    for opt in optimizers.values():
        opt.step()
        opt.zero_grad(set_to_none=True)
    method.on_step_end(step, max_steps)


def pick_captions(texts: list[list[str]], idx: torch.Tensor, rng: torch.Generator) -> list[str]:
    """One of each image's captions, drawn with the step's generator (deterministic on resume)."""
    draws = torch.randint(0, 2**31 - 1, (len(idx),), generator=rng).tolist()
    return [texts[i][d % len(texts[i])] for i, d in zip(idx.tolist(), draws)]
