"""Linear probe and low-shot probes on frozen features (scikit-learn logistic regression).

Protocol (as in CLIP's linear-probe evaluation, Radford et al. 2021 §3.2 and appendix A.3): an
L-BFGS multinomial logistic regression on frozen, L2-normalised features; the inverse regularisation
strength C is chosen on a held-out part of the *training* split (never on the test split), then the
model is refitted on the whole training split and scored once on the test split.

Low-shot: the same probe trained on 1% / 10% of the training labels (a class-balanced, seeded subset),
the semi-supervised protocol of SimCLR (Chen et al. 2020 §4.3) without fine-tuning. A fraction must keep
at least two labels of every class (one to fit, one to hold out), else it is refused with a message
saying which fraction would do (``check_low_shot``).
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from sslhub.errors import InputError

log = logging.getLogger("sslhub.eval")
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
MIN_PER_CLASS = 2  # labels of each class a low-shot subset keeps: one to fit, one held out to choose C


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def balanced_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of ``fraction`` of each class (at least one per class), seeded."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    idx = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
           for c, k in zip(classes, _kept_per_class(counts, fraction))]
    return np.sort(np.concatenate(idx))


def _kept_per_class(counts: np.ndarray, fraction: float) -> np.ndarray:
    """How many labels of each class (``counts`` of them) ``balanced_subset`` keeps: at least one."""
    return np.maximum(1, np.rint(fraction * counts).astype(int))


def check_low_shot(labels: np.ndarray, fractions, option: str = "low-shot fraction", classes=None) -> None:
    """An ``InputError`` naming ``option`` (e.g. ``"--low-shot"``) unless every fraction is in (0, 1] and keeps
    ``MIN_PER_CLASS`` labels of each class of ``labels``; ``classes`` names them in the message (index → name)."""
    if len(fractions) == 0 or len(labels) == 0:
        return
    values, counts = np.unique(labels, return_counts=True)
    rarest = int(counts.argmin())  # the class a fraction keeps fewest of
    n = int(counts[rarest])
    name = repr(classes[values[rarest]]) if classes is not None else str(values[rarest])
    need = f"the probe needs {MIN_PER_CLASS} labels of each class (one to fit it, one held out to choose C)"
    for f in fractions:
        if not 0 < f <= 1:
            raise InputError(f"{option} {f:g}: a fraction of the training labels must be in (0, 1], e.g. 0.01 or 0.1")
        kept = int(_kept_per_class(counts, f)[rarest])
        if kept >= MIN_PER_CLASS:
            continue
        if n < MIN_PER_CLASS:
            raise InputError(f"{option} {f:g}: class {name} has {n} training label(s) in all and {need}; add labelled "
                             "images of it or leave it out of the training data")
        raise InputError(f"{option} {f:g} keeps {kept} label(s) of class {name} ({n} in the training data) and {need}: "
                         f"use {option} {MIN_PER_CLASS / n:.3g} or more")


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 c_grid=C_GRID, val_fraction: float = 0.2, max_iter: int = 1000, seed: int = 0) -> dict:
    """Top-1 (%) of a logistic-regression probe; C chosen on a held-out ``val_fraction`` of the train split."""
    xtr, ytr = train_x.float().numpy(), train_y.numpy()
    xte, yte = test_x.float().numpy(), test_y.numpy()
    if len(np.unique(ytr)) < 2:
        raise InputError("linear probe needs at least two classes in the training split")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(ytr))
    n_val = max(len(np.unique(ytr)), int(val_fraction * len(ytr)))
    val, fit = perm[:n_val], perm[n_val:]
    if len(np.unique(ytr[fit])) < 2:
        raise InputError(f"linear probe: {len(ytr)} training labels are too few to hold out {n_val} for choosing C and "
                         "fit on the rest with two classes or more; use more labelled training data")
    scores = {}
    for c in c_grid:
        clf = _fit(xtr[fit], ytr[fit], c, max_iter)
        scores[c] = float((clf.predict(xtr[val]) == ytr[val]).mean())
        log.info("linear probe: C=%g held-out top-1 %.2f%%", c, 100 * scores[c])
    best = max(scores, key=scores.get)
    clf = _fit(xtr, ytr, best, max_iter)
    top1 = float((clf.predict(xte) == yte).mean())
    return {"top1": round(100 * top1, 2), "C": best, "heldout_top1": {str(c): round(100 * s, 2) for c, s in scores.items()},
            "train_size": len(ytr), "test_size": len(yte)}


def low_shot(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             fractions=(0.01, 0.1), seed: int = 0, **kw) -> dict:
    """The linear probe on class-balanced ``fractions`` of the training labels (see ``check_low_shot``)."""
    check_low_shot(train_y.numpy(), fractions)
    out = {}
    for f in fractions:
        idx = torch.from_numpy(balanced_subset(train_y.numpy(), f, seed))
        res = linear_probe(train_x[idx], train_y[idx], test_x, test_y, seed=seed, **kw)
        out[f"{f:.0%}"] = {"top1": res["top1"], "C": res["C"], "labels": int(idx.numel())}
    return out
