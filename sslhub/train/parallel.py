"""How several processes average their gradients: ``train.parallel`` (docs/distributed.md).

``ddp``: the method runs under :class:`~torch.nn.parallel.DistributedDataParallel`, whose bucketed all-reduce
starts while the backward pass is still running (on GPUs the communication hides behind the computation).
It wraps :class:`LossModule`, a thin module whose ``forward(batch)`` is ``method.loss(batch)``, so DDP's hooks
see every forward; the method itself stays unwrapped for checkpoints and exports (state-dict keys unchanged).

``manual``: the backward runs as in one process and ``apply_update`` averages ``.grad`` in one flat all-reduce
(``sslhub.distributed.average_gradients``).  Needed by methods with several optimisers: each loss goes into
its own group's parameters with ``backward(inputs=...)``, which DDP's one-reduction-per-backward cannot follow.

``auto`` (the default): ``ddp`` on CUDA with one optimiser, ``manual`` otherwise (on CPU with gloo there is no
computation to overlap, and the hand-written all-reduce is the reference the 2-processes-equal-1 tests hold).
In one process every choice is the plain path: no wrapper, no communication.

DDP's settings, and why:

- no buffer sync before each forward (``broadcast_buffers=False``): buffers are equal on every process by
  construction, not by copying rank 0's: batch norm over several processes is ``GlobalBatchNorm`` (global
  statistics, so equal running statistics), MoCo's key encoder keeps no running statistics, and queues,
  centres and EMA targets change only in ``on_step_end``, from all-reduced or gathered values and from
  parameters that are themselves equal.
- ``find_unused_parameters``: detected.  The first step averages by hand (as ``manual``); a trainable
  parameter without a gradient after it got none on any process (DINO's last layer and SwAV's prototypes are
  frozen for their first epoch), and DDP, built before the second step, gets ``find_unused_parameters=True``;
  otherwise False (it costs a traversal of the autograd graph every step).  Parameters with
  ``requires_grad=False`` (EMA targets, teachers, MAE's fixed position embedding) are never DDP's concern.
- ``gradient_as_bucket_view=True``: ``.grad`` are views into the communication buckets (no copy, less memory).
- With ``train.accumulate > 1`` every micro-batch but the last runs under ``no_sync()``: gradients accumulate
  locally and are reduced once, at the last backward.

FSDP is not offered (yet): see docs/distributed.md.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sslhub.distributed as D
from sslhub.config import ConfigError
from sslhub.methods.base import Batch, Method

log = logging.getLogger("sslhub.train")

CHOICES = ("auto", "ddp", "manual")
# buffers are not copied from rank 0 before each forward (they are equal by construction: see above)
NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                  if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                  else {"broadcast_buffers": False})


class LossModule(nn.Module):
    """What DDP wraps: ``forward(batch)`` is ``method.loss(batch)``, so DDP's forward (and its hooks) run."""

    def __init__(self, method: Method):
        super().__init__()
        self.method = method

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.method.loss(batch)


def choose(requested: str, device: torch.device, world: int, n_groups: int) -> tuple[str, str]:
    """``(choice, why)``: ``"single"`` (one process), ``"ddp"`` or ``"manual"`` for ``train.parallel=requested``."""
    if requested not in CHOICES:
        raise ConfigError(f"train.parallel={requested!r}: expected one of {', '.join(CHOICES)}", "train.parallel")
    if world == 1:
        return "single", "one process: no wrapper and no communication"
    if n_groups > 1:
        if requested == "ddp":
            raise ConfigError(f"train.parallel=ddp: this method has {n_groups} optimisers, each loss updating only "
                              "its own parameters (backward with inputs=...), which DistributedDataParallel's one "
                              "reduction per backward cannot follow; set train.parallel=manual (or auto)",
                              "train.parallel")
        return "manual", f"{n_groups} optimisers (each loss into its own parameters): hand-written averaging"
    if requested == "auto":
        if device.type == "cuda":
            return "ddp", "auto on CUDA with one optimiser: DistributedDataParallel overlaps the all-reduce with backward"
        return "manual", f"auto on {device.type} ({D.backend()}): hand-written averaging after backward"
    return requested, f"train.parallel={requested} asked"


class Parallel:
    """The training path's view of ``train.parallel``: the forward to call, which micro-batches synchronise,
    and whether the gradients are averaged by the time ``apply_update`` runs.

    Under ``ddp`` the first step of a run (or of a resumed run) averages by hand, as ``manual``, and shows which
    trainable parameters get no gradient; DDP is built after it, with ``find_unused_parameters`` only if any."""

    def __init__(self, method: Method, mode: str):
        self.method, self.mode = method, mode
        self.ddp: DistributedDataParallel | None = None
        self.find_unused: bool | None = None  # ddp: decided by the first step, DDP built before the second

    @classmethod
    def create(cls, method: Method, requested: str, device: torch.device) -> "Parallel":
        """Choose (and log why) for ``method`` on ``device`` with this run's processes."""
        mode, why = choose(requested, device, D.world_size(), len(method.optim_groups()))
        if D.is_main():
            log.info("train.parallel=%s → %s (%d processes): %s", requested, mode, D.world_size(), why)
        return cls(method, mode)

    @property
    def averages_in_backward(self) -> bool:
        """True when the gradients are averaged over the processes during backward (DDP)."""
        return self.ddp is not None

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.ddp(batch) if self.ddp is not None else self.method.loss(batch)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: DDP reduces only at the step's last one."""
        if self.ddp is None and self.find_unused is not None:  # between steps: no gradient is held
            self.ddp = DistributedDataParallel(
                LossModule(self.method), device_ids=None,  # batches are on the device: DDP leaves them as they are
                find_unused_parameters=self.find_unused, gradient_as_bucket_view=True, **NO_BUFFER_SYNC)
        with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
            yield

    def after_reduction(self) -> None:
        """After the first step's (hand-written) averaging: whether DDP needs ``find_unused_parameters``.  The same
        on every process: after the averaging a ``.grad`` is None only where no process produced one."""
        if self.mode != "ddp" or self.find_unused is not None:
            return
        unused = [n for n, p in self.method.named_parameters() if p.requires_grad and p.grad is None]
        self.find_unused = bool(unused)
        if D.is_main():
            log.info("DDP from the next step, find_unused_parameters=%s%s", self.find_unused,
                     f": {len(unused)} trainable parameters got no gradient ({', '.join(unused[:3])}"
                     f"{' …' if len(unused) > 3 else ''})" if unused else "")
