"""Retrieval metrics in pure torch (no FAISS): recall@k of ranked lists, and exact image↔text recall@K.

- [0] Karpathy, Fei-Fei. Deep Visual-Semantic Alignments. CVPR 2015 (the Flickr/COCO recall@K protocol)
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch

from sslhub.errors import InputError


def _as_matrix(x: Any, what: str) -> torch.Tensor:
    """Array or tensor → contiguous float32 ``(N, D)`` tensor with finite, non-empty rows."""
    x = torch.as_tensor(np.asarray(x.detach().float().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float32))
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"{what} must be a non-empty (N, D) array, got shape {tuple(x.shape)}")
    bad = ~torch.isfinite(x).all(1)
    if bad.any():
        raise InputError(f"{what} row {int(bad.float().argmax())} has NaN or inf values: fix or drop those rows")
    return x.contiguous()


def recall_at_k(retrieved_ids: Sequence[Sequence], relevant: Sequence[Any], ks: Iterable[int] = (1, 5, 10)) -> dict:
    """Percent of queries with at least one relevant id among their first k retrieved, for each k.

    ``retrieved_ids``: per query, ids best first; ``relevant``: per query, a set of relevant ids (a
    single id is read as a one-element set).
    """
    if len(retrieved_ids) != len(relevant) or not len(relevant):
        raise InputError(f"need one relevance set per query (≥ 1 query): {len(retrieved_ids)} vs {len(relevant)}")
    sets = [set(r) if isinstance(r, (set, frozenset, list, tuple, np.ndarray)) else {r} for r in relevant]
    if not all(sets):
        raise InputError(f"query {[bool(s) for s in sets].index(False)} has no relevant ids: drop it")
    return {f"R@{k}": round(100.0 * sum(any(i in s for i in list(r)[:k]) for r, s in zip(retrieved_ids, sets))
                            / len(sets), 2) for k in ks}


@torch.no_grad()
def image_text_retrieval(image_emb: Any, text_emb: Any, text_to_image: Any, ks: Iterable[int] = (1, 5, 10),
                         chunk: int = 1024) -> dict[str, dict[str, float]]:
    """Exact image↔text recall@K in percent, the Flickr30k/COCO protocol [0] (L2-normalised embeddings).

    ``image_emb (I, D)``, ``text_emb (T, D)``, ``text_to_image (T,)``: the image each caption describes.
    Image→text: a hit if any of the image's captions is in its top k; text→image: if its image is.
    """
    img, txt = (_as_matrix(e, w) for e, w in ((image_emb, "image_emb"), (text_emb, "text_emb")))
    owner = torch.as_tensor(np.asarray(text_to_image), dtype=torch.long).reshape(-1)  # (T,)
    if img.shape[1] != txt.shape[1]:
        raise InputError(f"image_emb is {img.shape[1]}-d but text_emb is {txt.shape[1]}-d")
    if owner.shape[0] != txt.shape[0] or owner.min() < 0 or owner.max() >= img.shape[0]:
        raise InputError(f"text_to_image must hold one image index in 0..{img.shape[0] - 1} per caption "
                         f"({txt.shape[0]}), got {owner.shape[0]} values in {int(owner.min())}..{int(owner.max())}")
    if (torch.bincount(owner, minlength=img.shape[0]) == 0).any():
        raise InputError("some images have no caption: drop them before evaluating")
    ks = list(ks)

    def first_hit(a: torch.Tensor, b: torch.Tensor, is_hit) -> torch.Tensor:  # (A,) rank of 1st hit, kmax: none
        kmax, ranks = min(max(ks), b.shape[0]), []
        for s in range(0, a.shape[0], chunk):
            top = (a[s : s + chunk] @ b.T).topk(kmax, dim=1).indices  # (c, kmax)
            hit = is_hit(top, torch.arange(s, s + top.shape[0])[:, None])  # (c, kmax) bool
            ranks.append(torch.where(hit.any(1), hit.float().argmax(1), kmax))
        return torch.cat(ranks)

    i2t = first_hit(img, txt, lambda top, i: owner[top] == i)  # any caption of image i
    t2i = first_hit(txt, img, lambda top, t: top == owner[t])  # the image of caption t
    return {name: {f"R@{k}": round(100.0 * (rank < k).float().mean().item(), 2) for k in ks}
            for name, rank in (("image_to_text", i2t), ("text_to_image", t2i))}
