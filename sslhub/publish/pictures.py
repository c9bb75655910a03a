"""Pictures for run folders and model cards: a grid of image panels with column titles, as PNG bytes."""
from __future__ import annotations

import io
from typing import Sequence

import torch


def image_grid(panels: Sequence[torch.Tensor], titles: Sequence[str], min_side: int = 96, pad: int = 4) -> bytes:
    """One row per image, one column per panel: ``panels[j]`` is ``(B, 3, H, W)`` uint8, ``titles[j]`` its
    column's title.  Images smaller than ``min_side`` are enlarged by a whole factor (nearest neighbour, so the
    patch grid stays sharp).  Returns PNG bytes."""
    from PIL import Image, ImageDraw

    if len(panels) != len(titles):
        raise ValueError(f"{len(panels)} panels but {len(titles)} titles")
    b, _, h, w = panels[0].shape
    k = max(1, -(-min_side // max(h, w)))  # whole enlargement factor
    H, W = h * k, w * k
    title_h = 16
    width = len(panels) * (W + pad) + pad
    height = title_h + b * (H + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (panel, title) in enumerate(zip(panels, titles)):
        x0 = pad + j * (W + pad)
        draw.text((x0, 2), title[: max(4, W // 6)], fill="black")
        for i in range(b):
            img = Image.fromarray(panel[i].permute(1, 2, 0).numpy()).resize((W, H), Image.NEAREST)
            canvas.paste(img, (x0, title_h + i * (H + pad)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
