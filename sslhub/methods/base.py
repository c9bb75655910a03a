"""The method interface every SSL method implements; the trainer knows nothing else about methods.

A method is an ``nn.Module`` holding ``self.backbone`` (the encoder that gets exported) and whatever
heads, teachers, queues or discriminators it needs.  The trainer calls, per optimiser step:

    for micro_batch in step:              # train.accumulate micro-batches (1 by default)
        out = method.loss(micro_batch)    # dict of scalars; out["loss"] is minimised; NO state change
        ... backward ...
    ... optimiser step ...
    method.on_step_end(step, max_steps)   # ALL state that changes with a step: EMA teachers, queues,
                                          # centres, schedules — from everything the step's losses saw

``loss()`` may stash what it saw (keys for a queue, teacher outputs for a centre) for ``on_step_end``;
it never changes state the next micro-batch reads, so every micro-batch of a step sees the same state.

Before the first step the trainer calls ``method.configure(steps_per_epoch, max_steps)`` (schedules in
epochs; checks that need the number of processes) and, with several processes,
``method.convert_batchnorm()``; with ``train.channels_last`` it calls ``use_channels_last()``.  What gets
exported and evaluated is ``exported_backbone()`` (the online network by default; DINO exports its teacher).

State that must survive ``--resume`` (queues, centres, EMA targets, pointers) lives in parameters or
buffers, so it is in ``state_dict()``; anything else is recomputed from the step number.

Methods with a second optimiser (e.g. an adversarial discriminator) return more loss keys from
``optim_groups()``: each key names a loss in the dict and the parameters its optimiser updates.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import nn

import sslhub.distributed as D
from sslhub.data.augment import BatchAugment, ViewConfig
from sslhub.models.backbone import Backbone, EncoderConfig
from sslhub.publish.export import Evaluate, Files, export_encoder


@dataclass
class Batch:
    """What a method gets each step.  ``images`` stay uint8: the method makes its own views."""

    images: torch.Tensor  # (B, 3, S, S) uint8
    labels: Optional[torch.Tensor] = None  # (B,) int64, -1 where unknown
    texts: Optional[list[str]] = None  # captions for image–text methods
    rng: torch.Generator = field(default_factory=torch.Generator)  # the step's seeded generator (this process's)
    step: int = 0
    # Per-sample randomness that must not depend on how a step is split across processes and micro-batches
    # (masked modeling's masks) is drawn for the step's whole global batch from ``seed`` — the same on every
    # process — and indexed by ``offset``, the position of this batch's first image in that global batch.
    # Defaults: a seed drawn from ``rng`` and offset = rank × len(images) (one micro-batch a step).
    seed: Optional[int] = None
    offset: Optional[int] = None

    def sample_seed(self) -> int:
        if self.seed is None:
            self.seed = int(torch.randint(0, 2**62, (1,), generator=self.rng))
        return self.seed

    def sample_offset(self) -> int:
        return D.rank() * self.images.shape[0] if self.offset is None else self.offset


@dataclass
class MethodConfig:
    """Base of every method's ``Config``; the recipe's ``method_args`` block is typed by it."""


class Method(nn.Module):
    name: ClassVar[str] = ""
    Config: ClassVar[type] = MethodConfig
    paper: ClassVar[str] = ""  # "Author et al. YEAR, https://arxiv.org/abs/…", shown by `sslhub methods`
    needs_text: ClassVar[bool] = False  # image–text methods: every training image needs a caption
    needs_vit: ClassVar[bool] = False  # methods built on a ViT's patch tokens (masked modeling): encoder.arch vit_*
    # True when one sample's loss depends on the other samples of the batch beyond batch norm (in-batch
    # negatives, statistics or assignments computed over the batch): with train.accumulate > 1 those see one
    # micro-batch, not the whole step (the trainer says so)
    batch_coupled: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, cfg: MethodConfig):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.steps_per_epoch: int | None = None  # set by configure(); None when used outside the trainer
        self.max_steps: int | None = None

    def configure(self, steps_per_epoch: int, max_steps: int) -> None:
        """Told by the trainer before the first step (and again on resume)."""
        self.steps_per_epoch, self.max_steps = steps_per_epoch, max_steps

    def convert_batchnorm(self) -> None:
        """Several processes: BN over the global batch (``GlobalBatchNorm``), so 2 processes = 1.
        Methods that need per-group statistics (MoCo's shuffled BN) override this."""
        D.convert_batchnorm(self)

    def use_channels_last(self) -> None:
        """Channels-last weights, and channels-last inputs for every :class:`Backbone` the method holds
        (online, momentum and teacher copies alike)."""
        self.to(memory_format=torch.channels_last)
        for m in self.modules():
            if isinstance(m, Backbone):
                m.channels_last = True

    def exported_backbone(self) -> Backbone:
        """The network that is exported and k-NN-evaluated (default: ``self.backbone``)."""
        return self.backbone

    @classmethod
    def create(cls, encoder: EncoderConfig, cfg: MethodConfig) -> "Method":
        """Build the method for the recipe's ``encoder`` block (default: a timm :class:`Backbone`)."""
        return cls(Backbone(encoder), cfg)

    def export(self, folder: str | Path, info: dict[str, Any], evaluate: Evaluate | None = None,
               files: Files | None = None) -> Path:
        """Write the trained encoder as a loadable folder (default: timm layout, ``export_encoder``).

        ``evaluate(folder)`` runs on the folder as written, before it is swapped in; its figures go into the
        config and the card (one write of the weights, one swap of the folder).  ``files``: extra files
        (name → (bytes, caption)); those with a caption are pictures the card shows."""
        return export_encoder(self.exported_backbone(), folder, info, evaluate=evaluate, files=files)

    @torch.no_grad()
    def pictures(self, images: torch.Tensor, what: str = "held-out images") -> dict[str, tuple[bytes, str]]:
        """Pictures of what the method does on fixed uint8 images, ``what`` they are (file name → (PNG bytes, caption)),
        written into the run folder and the export; none by default (masked modeling: reconstructions)."""
        return {}

    def view_pipeline(self, views: ViewConfig) -> BatchAugment:
        """Batched augmentation for ``views``, normalised with the encoder's own mean and std."""
        enc = self.backbone.cfg
        return BatchAugment(dataclasses.replace(views, mean=tuple(enc.mean), std=tuple(enc.std)))

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.loss(batch)

    def on_step_end(self, step: int, max_steps: int) -> None:
        """Called after every optimiser step: every state change of the step (EMA, queues, centres, schedules)."""

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        """Loss key → parameters its optimiser updates.  Default: one optimiser for everything."""
        return {"loss": [p for p in self.parameters() if p.requires_grad]}

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Pretext-task metrics on held-out uint8 images (methods with a pretext task override)."""
        return {}
