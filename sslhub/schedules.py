"""Per-step schedules (learning rates, momenta) as precomputed arrays, as MAE and DINO do.

Shared by the trainer, the fine-tuning probe and any method that schedules a value by step.
"""
from __future__ import annotations

import numpy as np


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Per-step values: linear warm-up from ``warmup_start`` to ``base``, then cosine to ``final``.

    Step ``k < W`` is ``warmup_start + (base − warmup_start)·k/W``; step ``W`` is the first at ``base``; then
    ``final + (base − final)·(1 + cos(π·t/(T − W)))/2`` for ``t = k − W``, as DINO's ``cosine_scheduler``.  The
    cosine reaches ``final`` one step after the last, so the last step is above it by at most
    ``(base − final)·π²/(4·(T − W)²)`` and, with ``final = 0``, still trains.
    """
    warmup_steps = min(warmup_steps, total_steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.array([])
    t = np.arange(total_steps - warmup_steps)
    span = max(total_steps - warmup_steps, 1)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / span))
    return np.concatenate([warm, cos])
