"""The non-finite guard's pieces: what counts as a healthy checkpoint, which state tensors are not finite, and
Ctrl-C deferred to the end of the current step."""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
from typing import Any

import torch
from torch import nn

from sslhub.errors import SslhubError

log = logging.getLogger("sslhub.train")


class NonFiniteLoss(SslhubError, RuntimeError):
    """The loss, a gradient or a weight became NaN or infinite: training stopped before the step was applied
    (or before its checkpoint was written)."""


class TrainingInterrupted(SslhubError):
    """Ctrl-C: training stopped between two steps, after saving a checkpoint to resume from."""


DIVERGED = 100.0  # a checkpoint whose weight norm grew this many times beyond its start is diverging


def weight_norm(params: list[nn.Parameter]) -> float:
    """The global L2 norm of ``params`` (inf when any element is not finite)."""
    return float(torch.linalg.vector_norm(torch.stack([p.detach().float().norm() for p in params])))


def health(info: dict) -> str:
    """Why a checkpoint (its ``read_info``) is not a healthy point to continue from; "" when it is."""
    loss, norm, start = info.get("loss"), info.get("weight_norm"), info.get("weight_norm_start")
    if loss is None or norm is None or not start:  # sslhub < 0.3 recorded neither: nothing to judge by
        return ""
    if not (math.isfinite(loss) and math.isfinite(norm)):
        return f"not finite (loss {loss}, weight norm {norm})"
    if norm > DIVERGED * start:
        return f"diverging (weight norm {norm:.3g}, {norm / start:.3g}× its {start:.3g} at the start)"
    return ""


def non_finite(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a nested state that hold a NaN or an infinity."""
    if isinstance(state, torch.Tensor):
        return [prefix] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, dict):
        return [n for k, v in state.items() for n in non_finite(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(state, (list, tuple)):
        return [n for i, v in enumerate(state) for n in non_finite(v, f"{prefix}.{i}")]
    return []


@contextlib.contextmanager
def deferred_interrupt() -> Any:
    """The first Ctrl-C (SIGINT) sets ``flag["set"]``, which the training loop checks between steps; a second
    one interrupts at once.  A no-op outside the main thread or where SIGINT is ignored."""
    flag = {"set": False}
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is signal.SIG_IGN:
        yield flag
        return

    def on_interrupt(signum: int, frame: Any) -> None:
        flag["set"] = True
        signal.signal(signal.SIGINT, previous)
        log.warning("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again stops at once)")

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
