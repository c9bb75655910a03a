"""CPC over a patch grid: predict the embeddings of the patches below from a causal context of the rows above.

- [0] van den Oord, Li, Vinyals. Representation Learning with Contrastive Predictive Coding. 2018,
  https://arxiv.org/abs/1807.03748 (§3.2, the image variant)
- [1] Hénaff, Srinivas, De Fauw, Razavi, Doersch, Eslami, van den Oord. Data-Efficient Image Recognition
  with Contrastive Predictive Coding. ICML 2020, https://arxiv.org/abs/1905.09272

Each augmented view is cut into a ``G × G`` grid of half-overlapping patches ([0] §3.2: 7×7 patches of 64 px
at stride 32 on 256-px images; on 32-px CIFAR views 8-px patches at stride 4; :mod:`sslhub.data.grid`).  The
backbone (the "patch tower", shared weights) embeds every patch, ``z[b, i, j] = backbone(patch) ∈ R^D``; a
masked convolutional context network ([0]: PixelCNN-style) reads the grid top to bottom, so the context
``c[b, i, j]`` depends only on ``z[b, u, v]`` with ``u ≤ i`` (any column ``v``).  For each offset
``k = 1 … K`` a linear map ``W_k`` predicts the patch ``k`` rows below, ``ẑ_k[b, i, j] = W_k c[b, i, j]``,
scored against every patch embedding of the global batch by a plain dot product (the log-bilinear
``f_k = exp(zᵀ W_k c)`` of [0] eq. 3; no normalisation, no temperature, as in both papers)::

    L_k = − 1/|Q_k| Σ_{(b,i,j) ∈ Q_k} log  exp(ẑ_k[b,i,j] · z[b,i+k,j]) / Σ_n exp(ẑ_k[b,i,j] · z_n)
    L   = 1/K Σ_k L_k,     Q_k = {(b, i, j) : i + k < G}  (this process's queries),  n: every patch of the batch

The candidates are the ``N·G²`` patches of the global batch (gathered from every process with gradients, as
SimCLR's negatives): other positions of the same image and every patch of the other images ([1]).  Each
process holds the same number of queries, so the mean of the processes' losses is the one-process loss at
the global batch, and so are the averaged gradients.

Batch norm: the timm ResNet's BN normalises over all patches of the batch, so a patch's embedding carries
statistics of the others, the positives included; [1] replaced BN by layer normalisation for this
reason.  The backbone is kept as it is here (every method of the comparison shares it).

Export: the exported encoder is the backbone applied to WHOLE images (the default :meth:`Method.export`), at
``encoder.image_size`` (32 for the CIFAR recipe), about 4× the side of the 8-px patches it was trained on;
[0] evaluates a linear classifier on the mean-pooled grid of patch embeddings; the k-NN evaluation here (as
every method's) feeds whole images.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import sslhub.distributed as D
from sslhub.config import check
from sslhub.data.augment import ViewConfig, eval_transform
from sslhub.data.grid import RowDraws, overlapping_grid, sample_positions, take_patches
from sslhub.errors import InputError
from sslhub.methods.base import Batch, Method, MethodConfig
from sslhub.methods.registry import register_method

# The masked convolution of the context network: rows i − 2 … i, columns j − 1 … j + 1 (a 3×3 kernel whose
# vertical extent looks only up).  Two blocks see 5 rows up and 5 columns across of the 7×7 grid.
CAUSAL_KERNEL = (3, 3)


def cpc_infonce(preds: list[torch.Tensor], z: torch.Tensor, gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPC loss and the top-1 accuracy of each offset (see the module docstring).

    ``z: (B, G, G, D)`` this process's patch embeddings; ``preds[k - 1]: (B, G − k, G, D)`` the predictions
    ``W_k c`` of the context rows ``0 … G − k − 1`` (the queries whose target row ``i + k`` is in the grid).
    ``gather``: candidates from every process (training); False: this batch's patches only (evaluation, which
    runs on one process).  Returns the loss (a scalar) and the accuracies ``(K,)``, detached.
    """
    b, g, _, d = z.shape
    flat = z.reshape(b * g * g, d).float()
    candidates = D.gather(flat) if gather else flat  # (W·B·G², D), rank order
    offset = D.rank() * flat.shape[0] if gather else 0
    index = offset + torch.arange(b * g * g, device=z.device).view(b, g, g)  # where each patch sits among them
    losses, accs = [], []
    for k, p in enumerate(preds, start=1):
        if p.shape != (b, g - k, g, d):
            raise ValueError(f"cpc_infonce: predictions for offset {k} are {tuple(p.shape)}, want {(b, g - k, g, d)}")
        logits = p.reshape(-1, d).float() @ candidates.T  # (B·(G−k)·G, W·B·G²)
        target = index[:, k:, :].reshape(-1)  # the patch k rows below, same column
        losses.append(F.cross_entropy(logits, target))
        accs.append((logits.argmax(1) == target).float().mean().detach())
    return torch.stack(losses).mean(), torch.stack(accs)


class CausalConv2d(nn.Conv2d):
    """A square-channel convolution whose output at row i sees input rows ``i − kh + 1 … i`` only: padded by
    ``kh − 1`` at the top and none at the bottom, 'same' horizontally."""

    def __init__(self, channels: int, kernel: tuple[int, int] = CAUSAL_KERNEL):
        super().__init__(channels, channels, kernel)
        kh, kw = kernel
        self.pad = (kw // 2, kw // 2, kh - 1, 0)  # (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


class ContextNetwork(nn.Module):
    """``z (B, G, G, D)`` → ``c (B, G, G, dim)``: a 1×1 projection, then ``layers`` residual blocks of
    ReLU → causal conv → ReLU → 1×1 conv ([0] §3.2: a PixelCNN-style autoregressive model; [1]: a masked
    convolutional network over the grid).  ``c[:, i]`` depends on ``z[:, :i + 1]`` only."""

    def __init__(self, in_dim: int, dim: int, layers: int):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), CausalConv2d(dim), nn.ReLU(), nn.Conv2d(dim, dim, 1)) for _ in range(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.proj(z.permute(0, 3, 1, 2))  # (B, dim, G, G)
        for block in self.blocks:
            x = x + block(x)
        return x.permute(0, 2, 3, 1)


@dataclass
class CPCConfig(MethodConfig):
    grid: int = 7  # G: patches per side ([0] §3.2: 7×7)
    overlap: float = 0.5  # share of a patch side neighbours share ([0]: 64-px patches at stride 32 → 0.5)
    pred_steps: int = 3  # K: predict the rows k = 1 … K below.  [0] predicts up to 5 rows; on a 7-row grid that
    #   leaves 2 query rows for k = 5; 3 keeps ≥ 4 query rows per offset (our choice for the small grid)
    context_dim: int = 256  # width of the context network (ours: [0] uses the 1024-d ResNet-101 width; the
    #   CIFAR ResNet-18's features are 512-d)
    context_layers: int = 2  # masked residual blocks (ours, a small stack: the papers' PixelCNNs are deeper)
    # Image-level augmentation before the grid is cut.  [0] §3.2: random 256-px crops of images resized to 300 px;
    # [1] adds colour and per-patch augmentations.  On 32-px CIFAR: crops of 30–100 % of the image (a
    # grid of a small crop is a few upsampled pixels), flips, moderate colour jitter (half SimCLR's CIFAR
    # strength: it varies the images' colours, but jitter of the whole image cannot hide that the patches of
    # one image share theirs, which [1]'s per-patch augmentation does; stronger jitter mostly erases an 8-px
    # patch), grayscale 0.2 (as the other CIFAR recipes), no blur (nothing to blur in an 8-px patch).
    views: ViewConfig = field(default_factory=lambda: ViewConfig(
        size=32, scale=(0.3, 1.0), hflip_p=0.5, jitter_p=0.8, brightness=0.2, contrast=0.2, saturation=0.2,
        hue=0.05, gray_p=0.2, blur_p=0.0))

    def __post_init__(self):
        check(self.grid >= 2, "grid", "the patch grid needs at least 2 rows (the paper: 7)")
        check(0 <= self.overlap < 1, "overlap", "the share of a patch side neighbours share must be in [0, 1) "
              "(the paper: 0.5)")
        check(1 <= self.pred_steps < self.grid, "pred_steps",
              f"the rows predicted below must be from 1 to grid − 1 = {self.grid - 1} (the paper: up to 5)")
        check(self.context_dim >= 1, "context_dim", "the context network's width must be a positive integer")
        check(self.context_layers >= 0, "context_layers", "the number of masked residual blocks must be >= 0")
        try:
            overlapping_grid(self.views.size, self.grid, self.overlap)
        except InputError as e:
            check(False, "grid", f"a {self.grid}×{self.grid} grid at overlap {self.overlap} does not fit the "
                  f"{self.views.size}-px view (views.size): {e}")


@register_method("cpc")
class CPC(Method):
    Config = CPCConfig
    paper = "van den Oord et al. 2018, https://arxiv.org/abs/1807.03748"
    batch_coupled = True  # in-batch negatives

    def __init__(self, backbone, cfg: CPCConfig):
        super().__init__(backbone, cfg)
        self.geom = overlapping_grid(cfg.views.size, cfg.grid, cfg.overlap)  # checked by the config
        d = backbone.dim
        self.context = ContextNetwork(d, cfg.context_dim, cfg.context_layers)
        # W_k: context → patch embedding, one per offset; no bias ([0] eq. 3: f_k = exp(zᵀ W_k c))
        self.heads = nn.ModuleList(nn.Linear(cfg.context_dim, d, bias=False) for _ in range(cfg.pred_steps))
        self.augment = self.view_pipeline(cfg.views)

    def embed(self, x: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor) -> torch.Tensor:
        """Normalised views ``(B, 3, S, S)`` and patch corners ``(B, G²)`` → patch embeddings ``(B, G, G, D)``."""
        b, g = x.shape[0], self.geom.n
        patches = take_patches(x, tops, lefts, self.geom.patch)  # (B, G², 3, p, p)
        return self.backbone(patches.flatten(0, 1)).view(b, g, g, -1)

    def predict(self, z: torch.Tensor) -> list[torch.Tensor]:
        """``z (B, G, G, D)`` → per offset k, ``W_k c`` of the context rows ``0 … G − k − 1``:
        ``(B, G − k, G, D)``."""
        c = self.context(z)
        g = z.shape[1]
        return [head(c[:, : g - k]) for k, head in enumerate(self.heads, start=1)]

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        # first: the default seed is drawn from batch.rng; grid origins by place in the global batch (2 processes = 1)
        draws = RowDraws(batch.sample_seed(), batch.sample_offset(), batch.images.shape[0])
        tops, lefts = sample_positions(self.geom, draws)
        x = self.augment(batch.images, batch.rng)  # (B, 3, S, S)
        z = self.embed(x, tops, lefts)
        loss, accs = cpc_infonce(self.predict(z), z)
        return {"loss": loss, "cpc_acc": accs.mean()}

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128) -> dict[str, float]:
        """Held-out pretext accuracy: the centred grid of each test image (no randomness), candidates = the
        patches of its batch of ``batch_size`` images (chance ≈ 1 / (batch_size · G²)); top-1 per offset and
        their mean, each a mean over the queries."""
        enc = self.backbone.cfg
        device = next(self.parameters()).device
        correct = torch.zeros(self.cfg.pred_steps, dtype=torch.float64)
        total = 0
        for i in range(0, images.shape[0], batch_size):
            x = eval_transform(images[i : i + batch_size].to(device), self.cfg.views.size, enc.mean, enc.std)
            tops, lefts = sample_positions(self.geom, count=x.shape[0])
            z = self.embed(x, tops, lefts)
            _, accs = cpc_infonce(self.predict(z), z, gather=False)
            correct += accs.double().cpu() * x.shape[0]  # each offset's queries are a fixed number per image
            total += x.shape[0]
        accs = (correct / max(total, 1)).tolist()
        return {"cpc_acc": sum(accs) / len(accs), **{f"cpc_acc_k{k}": a for k, a in enumerate(accs, start=1)}}
