"""Heat maps with a stated colour scale: every picture the page shows comes with the numbers its colour bar reads.

A map ``m`` (rows, cols) is drawn on the scale ``[lo, hi]`` as ``cmap(clip((m - lo) / (hi - lo), 0, 1))``: with one
scale shared by several maps (the heads of a layer, an intervention's before and after), the same colour means the
same number in each. Attention and activations use ``inferno`` from ``lo = 0``; differences use the diverging
``RdBu_r`` on ``[-a, a]`` with ``a = max |after - before|``, so white is "no change".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["DIVERGING", "SEQUENTIAL", "Scale", "heat_overlay", "paint", "stops"]

SEQUENTIAL = "inferno"
"""Matplotlib colour map of non-negative values (attention, activations)."""
DIVERGING = "RdBu_r"
"""Matplotlib colour map of signed values (differences), symmetric about 0 (white)."""


@dataclass(frozen=True)
class Scale:
    """The numbers at the two ends of a colour bar, and its colour map."""

    lo: float
    hi: float
    cmap: str = SEQUENTIAL

    @classmethod
    def from_zero(cls, maps: Iterable[torch.Tensor]) -> Scale:
        """``[min(0, min), max]`` over ``maps`` (non-negative maps such as attention start at 0)."""
        maps = list(maps)
        lo = min(0.0, min(float(m.min()) for m in maps))
        return cls(lo, max(float(m.max()) for m in maps))

    @classmethod
    def symmetric(cls, maps: Iterable[torch.Tensor]) -> Scale:
        """``[-a, a]`` with ``a`` the largest magnitude over ``maps``, diverging colours (for differences)."""
        a = max(float(m.abs().max()) for m in maps)
        return cls(-a, a, DIVERGING)

    def to_json(self) -> dict[str, object]:
        return {"lo": self.lo, "hi": self.hi, "cmap": self.cmap}


def paint(values: np.ndarray | torch.Tensor, scale: Scale) -> np.ndarray:
    """(H, W) numbers -> (H, W, 3) uint8 colours on ``scale`` (a constant scale paints its low colour)."""
    from matplotlib import colormaps

    a = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    span = scale.hi - scale.lo
    t = np.clip((a.astype(np.float64) - scale.lo) / span, 0.0, 1.0) if span > 0 else np.zeros(a.shape)
    if scale.cmap == DIVERGING and span <= 0:
        t = np.full(a.shape, 0.5)  # no change at all: white
    return (colormaps[scale.cmap](t)[..., :3] * 255).round().astype(np.uint8)


def heat_overlay(
    image: Image.Image,
    values: torch.Tensor,
    scale: Scale,
    alpha: float = 0.55,
    mark: tuple[int, int, tuple[int, int]] | None = None,
) -> Image.Image:
    """A (rows, cols) map upsampled to ``image`` (nearest: one block per patch), coloured on ``scale`` and blended
    over it; ``mark = (row, col, (patch_h, patch_w))`` outlines one patch (the query of an attention row)."""
    colours = Image.fromarray(paint(values.float(), scale)).resize(image.size, Image.Resampling.NEAREST)
    shown = Image.blend(image.convert("RGB"), colours, alpha)
    if mark is not None:
        r, c, (ph, pw) = mark
        ImageDraw.Draw(shown).rectangle((c * pw, r * ph, (c + 1) * pw - 1, (r + 1) * ph - 1), outline=(0, 229, 255))
    return shown


def stops(cmap: str, n: int = 11) -> list[str]:
    """``n`` evenly spaced colours of ``cmap`` as ``#rrggbb`` (the page draws its colour bars from them)."""
    from matplotlib import colormaps

    rgb = (colormaps[cmap](np.linspace(0, 1, n))[:, :3] * 255).round().astype(int)
    return ["#{:02x}{:02x}{:02x}".format(*c) for c in rgb]
