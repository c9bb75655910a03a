"""Labels matched by class name between two labelled sets (a k-NN bank and its queries, a probe's train and
test sets, zero-shot class names and the test data), never by position.

Each set numbers its classes in its own order (an ImageFolder sorts its folders, a ``dataset.json`` lists
them), so label 3 of one set need not be label 3 of the other: a test folder missing one class shifts every
label after it. Where both sets name their classes, test labels are re-indexed into the reference's classes;
test samples of a class the reference does not have are left out and reported; sets with no class in
common are an error. Where either set has no class names, labels are compared as numbers (said in the log).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from sslhub.errors import InputError

log = logging.getLogger("sslhub.eval")


def match_labels(reference: Sequence[str] | None, test_classes: Sequence[str] | None, test_labels: torch.Tensor,
                 what: str = "test") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(labels, keep, info)``: ``test_labels[keep]`` re-indexed into ``reference``'s class order.

    ``keep (N,) bool`` marks the test samples whose class the reference has; ``info`` names the classes
    left out (``{"unknown_classes": [...], "left_out": n}``) when there are any.
    """
    keep = torch.ones(len(test_labels), dtype=torch.bool)
    if reference is None or test_classes is None:
        if reference is not None or test_classes is not None:
            log.info("%s: only one side names its classes: labels are compared as numbers", what)
        return test_labels, keep, {}
    index = {name: i for i, name in enumerate(reference)}
    to_ref = torch.tensor([index.get(name, -1) for name in test_classes], dtype=torch.long)
    labels = to_ref[test_labels.clamp(min=0)]
    labels[test_labels < 0] = -1  # unlabelled stays unlabelled (the protocols refuse those)
    keep = (labels >= 0) | (test_labels < 0)
    if not (labels >= 0).any():
        raise InputError(f"{what}: no class in common with the reference set (theirs: "
                         f"{', '.join(list(test_classes)[:5])}…; reference: {', '.join(list(reference)[:5])}…): "
                         "labels are matched by class name")
    info = {}
    unknown = sorted({test_classes[i] for i in test_labels[~keep].tolist()})
    if unknown:
        info = {"unknown_classes": unknown, "left_out": int((~keep).sum())}
        log.warning("%s: %d sample(s) of %d class(es) the reference set does not have are left out: %s", what,
                    info["left_out"], len(unknown), ", ".join(unknown[:10]))
    return labels[keep], keep, info
