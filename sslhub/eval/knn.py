"""Weighted k-NN on frozen features (Wu et al. 2018 InstDisc; the protocol DINO reports).

Each query votes with its k most cosine-similar bank features, each vote weighted by
``exp(sim / T)`` (T = 0.07); the class with the largest summed weight wins.
- [0] Wu et al. Unsupervised Feature Learning via Non-Parametric Instance Discrimination. CVPR 2018,
  https://arxiv.org/abs/1805.01978
- [1] Caron et al. Emerging Properties in Self-Supervised Vision Transformers. ICCV 2021,
  https://arxiv.org/abs/2104.14294 (eval_knn.py: k = 20, T = 0.07)
"""
from __future__ import annotations

import torch

from sslhub.errors import InputError


def weighted_knn(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int,
                 temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """Class scores ``(Q, C)`` for L2-normalised ``queries (Q, D)`` against ``bank (N, D)``."""
    num_classes = num_classes or int(bank_labels.max()) + 1
    k = min(k, bank.shape[0])
    scores = []
    for i in range(0, queries.shape[0], chunk):
        sim = queries[i : i + chunk] @ bank.T  # (q, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (q, k)
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, bank_labels[top_idx], (top_sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_eval(bank_feats: torch.Tensor, bank_labels: torch.Tensor, test_feats: torch.Tensor,
             test_labels: torch.Tensor, ks=(20, 200), temperature: float = 0.07) -> dict:
    """Top-1 / top-5 accuracy (%) of weighted k-NN for each k, on L2-normalised features."""
    for name, labels in (("bank", bank_labels), ("test", test_labels)):
        if (labels < 0).any():
            raise InputError(f"k-NN {name} data has unlabelled images: use shards with .cls files or an ImageFolder tree")
    num_classes = int(max(bank_labels.max(), test_labels.max())) + 1
    out: dict = {"temperature": temperature, "bank_size": len(bank_labels), "test_size": len(test_labels)}
    for k in ks:
        scores = weighted_knn(bank_feats, bank_labels, test_feats, k, temperature, num_classes)
        top = scores.topk(min(5, num_classes), dim=1).indices
        out[f"top1@k={k}"] = round(100.0 * (top[:, 0] == test_labels).float().mean().item(), 2)
        out[f"top5@k={k}"] = round(100.0 * (top == test_labels[:, None]).any(1).float().mean().item(), 2)
    return out
