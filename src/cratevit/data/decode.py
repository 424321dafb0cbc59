"""Decoding image files safely: any mode to 8-bit RGB, and a pixel limit checked before decoding.

Used by the training data (:mod:`cratevit.data.folder`) and by the analysis commands (:mod:`cratevit.analysis.images`),
so a 16-bit PNG is scaled the same way everywhere, and a 140 KB PNG that claims 12000x12000 pixels is refused before
it takes gigabytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError

__all__ = ["MAX_PIXELS", "ImageTooLarge", "check_size", "to_rgb"]

MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
"""PIL's decompression-bomb limit (~89.5 Mpx): images with more pixels are refused (``--max-pixels``)."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.round().astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class ImageTooLarge(UserError):
    """An image whose header claims more pixels than the limit: it is refused before it is decoded."""


def check_size(img: Image.Image, path: str | Path, max_pixels: int | None) -> None:
    """Refuse (before decoding) an image larger than ``max_pixels`` (``None``: no limit)."""
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise ImageTooLarge(
            f"{path} is {img.width}x{img.height} ({img.width * img.height / 1e6:.1f} Mpx), more than "
            f"--max-pixels {max_pixels} ({max_pixels / 1e6:.1f} Mpx); downscale it, or raise "
            f"--max-pixels if you have the memory and time"
        )
