"""Attention maps, PCA maps and figures (Figures 3-5 of the CRATE papers). Functions of tensors and arrays.

* :func:`cls_attention`: the class token's attention to every patch, per head, as a (heads, rows, cols) map;
* :func:`mass_mask`: DINO's mask keeping the patches that carry the top ``keep`` fraction of a map's mass;
* :func:`pca_maps`: PCA of patch features across images, the first three components as RGB;
  :func:`first_component_foreground`: a foreground mask from the first component;
* writers for heat maps, masks, overlays, head grids and the layer-wise curves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from ..errors import UserError

__all__ = [
    "PCAMaps",
    "cls_attention",
    "colorize",
    "first_component_foreground",
    "head_grid_figure",
    "layerwise_figure",
    "mass_mask",
    "overlay",
    "pca_figure",
    "pca_maps",
    "save_figure",
    "to_uint8",
    "upsample",
]


def cls_attention(attn: Tensor, grid: tuple[int, int]) -> Tensor:
    """Row of the class token (token 0) over the patch tokens: (b, heads, n, n) -> (b, heads, rows, cols)."""
    b, h, n, _ = attn.shape
    if n != 1 + grid[0] * grid[1]:
        raise ValueError(f"attention over {n} tokens does not match 1 + {grid[0]}x{grid[1]} patches")
    return attn[:, :, 0, 1:].reshape(b, h, *grid)


def upsample(maps: Tensor, size: tuple[int, int], mode: str = "nearest") -> Tensor:
    """(..., rows, cols) -> (..., H, W), nearest by default (each patch becomes a block, as DINO shows it)."""
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    kw = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(x, size=size, mode=mode, **kw).reshape(*lead, *size)


def mass_mask(maps: Tensor, keep: float = 0.6) -> Tensor:
    """Boolean mask per map (last two dims): the largest entries whose sum reaches ``keep`` of the total mass."""
    if not 0.0 < keep <= 1.0:
        raise UserError(f"the attention-mass threshold must be in (0, 1], got {keep}")
    flat = maps.flatten(-2).float().clamp_min(0)
    values, order = flat.sort(dim=-1, descending=True)
    mass = values.cumsum(-1) / values.sum(-1, keepdim=True).clamp_min(1e-12)
    chosen = (mass - values / values.sum(-1, keepdim=True).clamp_min(1e-12)) < keep  # mass before this entry
    mask = torch.zeros_like(chosen).scatter(-1, order, chosen)
    return mask.reshape(maps.shape)


def to_uint8(a: np.ndarray | Tensor) -> np.ndarray:
    """Min-max scale a map to 0..255 (a constant map becomes 0)."""
    a = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    return ((a - lo) / (hi - lo) * 255).round().astype(np.uint8) if hi > lo else np.zeros(a.shape, np.uint8)


def colorize(a: np.ndarray | Tensor, cmap: str = "inferno") -> np.ndarray:
    """A 2-D map -> uint8 RGB with a matplotlib colormap (min-max scaled)."""
    from matplotlib import colormaps

    return (colormaps[cmap](to_uint8(a))[..., :3] * 255).round().astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray | Tensor, alpha: float = 0.55, cmap: str = "inferno") -> Image.Image:
    """Blend a colour-mapped heat map (same size as ``image``) over the image."""
    colour = Image.fromarray(colorize(heat, cmap))
    if colour.size != image.size:
        raise ValueError(f"heat map {colour.size} and image {image.size} differ in size")
    return Image.blend(image.convert("RGB"), colour, alpha)


@dataclass
class PCAMaps:
    """PCA of patch features across images: per image, component scores and an RGB rendering."""

    scores: list[np.ndarray]  # per image (rows, cols, k): raw scores (centred on the mean over all patches)
    rgb: list[np.ndarray]  # per image (rows, cols, 3) in [0, 1]: the first three components min-max scaled jointly
    explained_variance_ratio: np.ndarray  # (k,)


def pca_maps(features: Sequence[Tensor], n_components: int = 3) -> PCAMaps:
    """PCA of patch features across images; ``features`` holds one (rows, cols, dim) tensor per image.

    The scaling to colours is shared by all images, so the same colour means the same direction in every image.
    """
    from sklearn.decomposition import PCA

    if not features:
        raise UserError("PCA needs at least one image")
    shapes = [tuple(f.shape[:2]) for f in features]
    flat = np.concatenate([f.reshape(-1, f.shape[-1]).double().cpu().numpy() for f in features])
    k = min(n_components, *flat.shape)
    pca = PCA(n_components=k, svd_solver="full").fit(flat)
    scores = pca.transform(flat)
    padded = np.concatenate([scores, np.zeros((len(scores), max(0, 3 - k)))], axis=1)[:, :3]
    lo, hi = padded.min(0), padded.max(0)
    scaled = (padded - lo) / np.where(hi > lo, hi - lo, 1.0)
    out_scores, out_rgb, start = [], [], 0
    for r, c in shapes:
        out_scores.append(scores[start : start + r * c].reshape(r, c, k))
        out_rgb.append(scaled[start : start + r * c].reshape(r, c, 3))
        start += r * c
    return PCAMaps(out_scores, out_rgb, pca.explained_variance_ratio_)


def first_component_foreground(component: np.ndarray | Tensor, threshold: float | None = None) -> np.ndarray:
    """Foreground mask from a map of first-component scores (rows, cols): scores above ``threshold`` (default:
    the map's own mean, so a map from a PCA over many images is split within its image).

    The sign of a principal component is arbitrary: if most border patches come out as foreground, the sign is
    flipped (objects rarely fill the border).
    """
    a = component.detach().cpu().numpy() if isinstance(component, Tensor) else np.asarray(component, dtype=np.float64)
    a = a - (a.mean() if threshold is None else threshold)
    border = np.ones(a.shape, dtype=bool)
    if min(a.shape) > 2:
        border[1:-1, 1:-1] = False
    if (a[border] > 0).mean() > 0.5:
        a = -a
    return a > 0


def _image_grid_done(fig: Figure, axes: np.ndarray, title: str) -> Figure:
    """Finish a grid of image panels: no axes, the optional title, a tight layout."""
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def head_grid_figure(image: Image.Image, heat: np.ndarray, masks: np.ndarray | None = None, title: str = "") -> Figure:
    """The image, then one column per head: the heat map, and below it the image outside the mask darkened."""
    heads = heat.shape[0]
    rows = 1 if masks is None else 2
    fig = Figure(figsize=(2.0 * (heads + 1), 2.1 * rows))
    axes = fig.subplots(rows, heads + 1, squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("image", fontsize=9)
    for k in range(heads):
        axes[0, k + 1].imshow(heat[k], cmap="inferno")
        axes[0, k + 1].set_title(f"head {k}", fontsize=9)
        if masks is not None:
            shown = np.asarray(image).copy()
            shown[~masks[k]] = (shown[~masks[k]] * 0.25).astype(np.uint8)
            axes[1, k + 1].imshow(shown)
    if masks is not None:
        axes[1, 0].imshow(masks.any(0), cmap="gray")
        axes[1, 0].set_title("union of masks", fontsize=9)
    return _image_grid_done(fig, axes, title)


def pca_figure(rows: Sequence[tuple[str, Image.Image, np.ndarray, np.ndarray]], title: str = "") -> Figure:
    """One row per image: the image, its PCA colour map and the first-component foreground.

    ``rows`` holds (name, image, RGB map in [0, 1] of the image's size, bool mask of the image's size).
    """
    fig = Figure(figsize=(7.0, 2.3 * len(rows) + 0.3))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for (name, image, rgb, fg), ax in zip(rows, axes, strict=True):
        ax[0].imshow(image)
        ax[0].set_title(name, fontsize=9)
        ax[1].imshow(rgb)
        ax[1].set_title("PCA components 1-3", fontsize=9)
        ax[2].imshow(fg, cmap="gray", vmin=0, vmax=1)
        ax[2].set_title("foreground (component 1)", fontsize=9)
    return _image_grid_done(fig, axes, title)


def layerwise_figure(
    series: Mapping[str, Sequence[Mapping[str, float]]], key: str, ylabel: str, title: str = ""
) -> Figure:
    """Value against layer index with error bars, one line per series.

    ``series`` maps a label (``"trained"``, ``"random init"``) to rows with ``layer``, ``{key}_mean`` and
    ``{key}_std`` (as :meth:`cratevit.analysis.LayerwiseStats.rows` returns).
    """
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for label, rows in series.items():
        ax.errorbar(
            [r["layer"] for r in rows],
            [r[f"{key}_mean"] for r in rows],
            yerr=[r[f"{key}_std"] for r in rows],
            marker="o",
            ms=4,
            capsize=3,
            label=label,
        )
    ax.set_xlabel("layer index")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, stem: str | Path, formats: Sequence[str] = ("png", "pdf"), dpi: int = 120) -> list[Path]:
    """Write ``fig`` as ``{stem}.png``, ``{stem}.pdf``, ...; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(f"{stem.name}.{fmt}") for fmt in formats]
    for p in paths:
        fig.savefig(p, dpi=dpi)
    return paths
