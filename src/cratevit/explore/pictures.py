"""Pictures for the explore page: PNG data URIs (the page shows nothing else) and histograms as plain numbers."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["DISPLAY", "histogram_json", "png_uri"]

DISPLAY = 256
"""Longer side of the pictures in the page, pixels."""


def png_uri(img: Image.Image | np.ndarray, display: int | None = DISPLAY, smooth: bool = False) -> str:
    """A PNG data URI, scaled so the longer side is ``display`` pixels (nearest neighbour unless ``smooth``)."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    if display:
        scale = display / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC if smooth else Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast: the page is local
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def histogram_json(values: torch.Tensor, bins: int = 20) -> dict[str, Any]:
    """The histogram of the non-zero entries of ``values`` (counts, edges) and the number of zeros, for the page."""
    values = values.flatten()
    active = values[values > 0]
    hist = (
        np.histogram(active.numpy(), bins=bins) if len(active) else (np.zeros(bins, int), np.linspace(0, 1, bins + 1))
    )
    return {"counts": [int(c) for c in hist[0]], "edges": [round(float(e), 6) for e in hist[1]],
            "zeros": int((values <= 0).sum())}  # fmt: skip
