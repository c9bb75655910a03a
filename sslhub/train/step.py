"""One optimiser step, as the trainer (and the tests) run it: every micro-batch's forward and backward, then
the averaged update; plus the per-step seeds and caption draws that make a step a function of its number."""
from __future__ import annotations

import contextlib
import math
import os
from typing import Callable

import torch
from torch import nn

import sslhub.distributed as D
from sslhub.methods.base import Batch, Method
from sslhub.train.guard import NonFiniteLoss
from sslhub.train.parallel import Parallel


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


def pick_device(name: str) -> torch.device:
    """``train.device``: ``auto`` → cuda when available, else cpu.  Under torchrun a bare ``cuda`` is this
    process's own GPU, ``cuda:LOCAL_RANK``, made the current device (NCCL: one GPU per process)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def check_groups(method: Method, groups: dict[str, list[nn.Parameter]]) -> None:
    """``method.optim_groups()`` must give every trainable parameter to exactly one optimiser: a parameter in two
    would be stepped twice a step, one in none would never train.  A ``ValueError`` naming the parameter (a bug in
    the method, not in the recipe)."""
    names = {id(p): n for n, p in method.named_parameters()}
    owner: dict[int, str] = {}
    for key, params in groups.items():
        if not params:
            raise ValueError(f"{type(method).__name__}.optim_groups(): the optimiser of {key!r} has no parameters")
        for p in params:
            if id(p) in owner:
                raise ValueError(f"{type(method).__name__}.optim_groups(): {names.get(id(p), 'a parameter')} is in "
                                 f"both {owner[id(p)]!r} and {key!r}: it would be stepped twice a step")
            owner[id(p)] = key
    missing = [n for n, p in method.named_parameters() if p.requires_grad and id(p) not in owner]
    if missing:
        raise ValueError(f"{type(method).__name__}.optim_groups(): {len(missing)} trainable parameter(s) in no "
                         f"optimiser ({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}): they would never "
                         "train (set requires_grad=False on what is meant to stay fixed)")


def accumulate_gradients(method: Method, groups: dict[str, list[nn.Parameter]], batches: list[Batch],
                         autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                         parallel: Parallel | None = None) -> dict[str, float]:
    """Forward and backward every micro-batch of one step; ``.grad`` ends as the mean of their gradients.

    ``parallel`` (``train.parallel``): under DDP the forward goes through the wrapper and the gradients are
    averaged over the processes during the last micro-batch's backward (the others run under ``no_sync``).

    Returns the mean over micro-batches of every value the method logs.  A non-finite loss raises
    :class:`NonFiniteLoss` before its backward.  With several processes its backward still runs (its collectives
    must meet the other processes') with a NaN added to a gradient before the averaging, so every process's
    averaged gradients are NaN and ``apply_update`` stops them all at the same step.
    """
    n, logged = len(batches), {}
    keys = list(groups)
    first = groups[keys[0]][0]
    for i, batch in enumerate(batches):
        with parallel.micro_batch(last=i == n - 1) if parallel is not None else contextlib.nullcontext():
            with autocast():
                out = parallel.loss(batch) if parallel is not None else method.loss(batch)
            loss = float(out["loss"].detach())
            bad = not math.isfinite(loss)
            if bad and not D.is_dist():
                raise NonFiniteLoss(f"loss is {loss} at step {batch.step}")
            for j, k in enumerate(keys):  # each loss only into its own optimiser's parameters
                inputs = None if len(keys) == 1 else groups[k]
                total = out[k] / n
                if bad and j == 0:  # NaN into a gradient before it is averaged (DDP: during this backward)
                    total = total + first.reshape(-1)[0] * float("nan")
                total.backward(inputs=inputs, retain_graph=j < len(keys) - 1)
        for k, v in out.items():
            logged[k] = logged.get(k, 0.0) + float(v.detach()) / n
    return logged


def apply_update(method: Method, optimizers: dict[str, torch.optim.Optimizer], params: list[nn.Parameter],
                 step: int, max_steps: int, clip_grad: float | None = None, parallel: Parallel | None = None) -> None:
    """Average gradients over processes (unless DDP did during backward), clip, step every optimiser, then the
    method's ``on_step_end``.

    Non-finite gradients (from a finite loss) raise :class:`NonFiniteLoss` before any weight changes."""
    if parallel is None or not parallel.averages_in_backward:
        D.average_gradients(params)
    if parallel is not None:
        parallel.after_reduction()
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
