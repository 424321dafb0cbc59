r"""Attention maps, PCA maps and figures (Figures 3-5 of the CRATE papers). Functions of tensors and arrays.

* :func:`cls_attention`: the class token's attention to every patch, per head, as a (heads, rows, cols) map;
* :func:`mass_mask`: DINO's mask keeping the patches that carry the top ``keep`` fraction of a map's mass;
* :func:`pca_maps`: PCA of patch features across images, the first three components as RGB;
  :func:`first_component_foreground`: a foreground mask from the first component;
* writers for heat maps, masks, overlays, head grids and the layer-wise curves.

Figures follow one house style, meant for a paper: labels in mathtext (:func:`math_label` turns ``Z^{l+1/2}``
into :math:`Z^{\ell+1/2}`), layers numbered by block index from 0 on integer ticks, legends outside the data,
one colour bar (a scale shared by all heads) beside attention maps, a legend on every mask panel, and
"random weights" in the title of a model without trained weights.
"""

from __future__ import annotations

import re
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
    "math_label",
    "overlay",
    "pca_figure",
    "pca_maps",
    "random_title",
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


LAYER_AXIS = "layer (block index, 0-based)"
RANDOM_WEIGHTS = "random weights"
_TEX = re.compile(r"(?<![A-Za-z0-9\\])[A-Za-z](?:[_^](?:\{[^{}$]*\}|[A-Za-z0-9]))+(?![A-Za-z0-9])")


def _tex_token(match: re.Match[str]) -> str:
    token = re.sub(r"([_^])([A-Za-z0-9])", r"\1{\2}", match.group(0))  # Z^l -> Z^{l}
    return "$" + re.sub(r"(?<![A-Za-z\\])l(?![A-Za-z])", r"\\ell", token) + "$"  # the layer index l -> \ell


def math_label(text: str) -> str:
    r"""Plain-text formulas of a label as matplotlib mathtext: ``"R^c of Z^{l+1/2}"`` -> ``"$R^{c}$ of
    $Z^{\ell+1/2}$"`` (a letter with ``^``/``_`` scripts becomes math; the layer index ``l`` becomes
    :math:`\ell`). Text already holding ``$...$`` is returned as it is."""
    return text if "$" in text else _TEX.sub(_tex_token, text)


def random_title(title: str, random_weights: bool) -> str:
    """``title``, followed by "(random weights)" when the model has no trained weights."""
    if not random_weights:
        return title
    return f"{title} ({RANDOM_WEIGHTS})" if title else RANDOM_WEIGHTS


def _image_panels(axes: np.ndarray) -> None:
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)


def _photo_interpolation(image: Image.Image | np.ndarray) -> str:
    """Small images and maps (the 32-48 px built-in data) are enlarged on screen as crisp pixel blocks
    (``nearest``); photographs, shrunk to a panel, are filtered (matplotlib's ``antialiased``) against aliasing."""
    size = image.size if isinstance(image, Image.Image) else np.asarray(image).shape[:2]
    return "nearest" if min(size) <= 256 else "antialiased"


def _legend_handles(entries: Sequence[tuple[str, object]]) -> list[object]:
    from matplotlib.patches import Patch

    return [Patch(facecolor=colour, edgecolor="0.4", label=label) for label, colour in entries]


def head_grid_figure(
    image: Image.Image,
    heat: np.ndarray,
    masks: np.ndarray | None = None,
    title: str = "",
    random_weights: bool = False,
    keep: float | None = None,
) -> Figure:
    """The image, then one column per head: the heat map, and below it the image outside the mask darkened.

    ``heat`` (heads, H, W) is drawn on ONE colour scale for all heads (0 to the largest value of any head), with
    one colour bar; ``masks`` (heads, H, W) bool, ``keep`` the mass fraction they keep (for the legend)."""
    heads = heat.shape[0]
    rows = 1 if masks is None else 2
    fig = Figure(figsize=(2.0 * (heads + 1) + 1.2, 2.2 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, heads + 1, squeeze=False)
    axes[0, 0].imshow(image, interpolation=_photo_interpolation(image))
    axes[0, 0].set_title("image", fontsize=9)
    vmax = float(np.max(heat)) if np.max(heat) > 0 else 1.0
    shown = None
    for k in range(heads):
        shown = axes[0, k + 1].imshow(
            heat[k], cmap="inferno", vmin=0.0, vmax=vmax, interpolation=_photo_interpolation(heat[k])
        )
        axes[0, k + 1].set_title(f"head {k}", fontsize=9)
    bar = fig.colorbar(shown, ax=axes[0, :].tolist(), shrink=0.9, pad=0.02)
    bar.set_label("[CLS] attention\n(one scale, all heads)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if masks is not None:
        kept = "in the mask" if keep is None else f"in the mask (top {keep:.0%} of mass)"
        for k in range(heads):
            dimmed = np.asarray(image.convert("RGB")).copy()
            dimmed[~masks[k]] = (dimmed[~masks[k]] * 0.25).astype(np.uint8)
            axes[1, k + 1].imshow(dimmed, interpolation=_photo_interpolation(dimmed))
        axes[1, 0].imshow(masks.any(0), cmap="gray", vmin=0, vmax=1, interpolation=_photo_interpolation(masks[0]))
        axes[1, 0].set_title("union of masks", fontsize=9)
        handles = _legend_handles([(kept, "white"), ("outside (darkened / black)", "0.2")])
        axes[1, 0].legend(
            handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.04), fontsize=7, frameon=False, ncol=1
        )
    _image_panels(axes)
    if title or random_weights:
        fig.suptitle(random_title(math_label(title), random_weights), fontsize=10)
    return fig


def pca_figure(
    rows: Sequence[tuple[str, Image.Image, np.ndarray, np.ndarray]], title: str = "", random_weights: bool = False
) -> Figure:
    """One row per image: the image, its PCA colour map and the first-component foreground (with a legend).

    ``rows`` holds (name, image, RGB map in [0, 1] of the image's size, bool mask of the image's size).
    """
    fig = Figure(figsize=(7.6, 2.3 * len(rows) + 0.7), layout="constrained")
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for (name, image, rgb, fg), ax in zip(rows, axes, strict=True):
        ax[0].imshow(image, interpolation=_photo_interpolation(image))
        ax[0].set_title(name, fontsize=9)
        ax[1].imshow(rgb, interpolation=_photo_interpolation(rgb))
        ax[1].set_title("PCA components 1-3 (RGB)", fontsize=9)
        ax[2].imshow(fg, cmap="gray", vmin=0, vmax=1, interpolation=_photo_interpolation(fg))
        ax[2].set_title("foreground (component 1)", fontsize=9)
        ax[2].legend(
            handles=_legend_handles([("foreground", "white"), ("background", "black")]),
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            fontsize=7,
            frameon=False,
        )
    _image_panels(axes)
    if title or random_weights:
        fig.suptitle(random_title(math_label(title), random_weights), fontsize=10)
    return fig


def layerwise_figure(
    series: Mapping[str, Sequence[Mapping[str, float]]],
    key: str,
    ylabel: str,
    title: str = "",
    random_weights: bool = False,
) -> Figure:
    """Value against layer (block index, 0-based, integer ticks) with error bars, one line per series.

    ``series`` maps a label (``"trained"``, ``"random init"``) to rows with ``layer``, ``{key}_mean`` and
    ``{key}_std`` (as :meth:`cratevit.analysis.LayerwiseStats.rows` returns). Labels go through
    :func:`math_label`; the legend sits outside the axes, so it never hides a point.
    """
    fig = Figure(figsize=(6.2, 3.6), layout="constrained")
    ax = fig.subplots()
    layers: set[int] = set()
    for label, rows in series.items():
        xs = [int(r["layer"]) for r in rows]
        layers.update(xs)
        ax.errorbar(
            xs,
            [r[f"{key}_mean"] for r in rows],
            yerr=[r[f"{key}_std"] for r in rows],
            marker="o",
            ms=4,
            capsize=3,
            label=math_label(label),
        )
    lo, hi = min(layers, default=0), max(layers, default=0)
    step = next(s for s in (1, 2, 4, 5, 10, 20, 50, 100, hi - lo + 1) if (hi - lo) // s < 16)  # <= 16 ticks
    ax.set_xticks(range(lo, hi + 1, step))  # integers only: a layer is a block index
    ax.set_xlim(lo - 0.5, hi + 0.5)
    ax.set_xlabel(LAYER_AXIS)
    ax.set_ylabel(math_label(ylabel))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, frameon=False)
    if title or random_weights:
        ax.set_title(random_title(math_label(title), random_weights), fontsize=10)
    return fig


def save_figure(fig: Figure, stem: str | Path, formats: Sequence[str] = ("png", "pdf"), dpi: int = 120) -> list[Path]:
    """Write ``fig`` as ``{stem}.png``, ``{stem}.pdf``, ...; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(f"{stem.name}.{fmt}") for fmt in formats]
    for p in paths:
        fig.savefig(p, dpi=dpi)
    return paths
