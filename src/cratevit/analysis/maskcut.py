"""MaskCut (Wang et al., CutLER, CVPR 2023) on the key features of a CRATE or a timm ViT, as the emergence paper
used it for object detection (its App. B.4, Table 1: without the CRF).

For one image, with ``F`` the patch tokens' features of a layer (the ``key`` facet by default), up to ``N = 3``
rounds of normalised cut:

1. affinity ``A_ij = 1`` where the cosine of tokens i and j exceeds ``tau = 0.15``, else ``1e-5``; ``D`` the
   diagonal of its row sums;
2. the second smallest generalised eigenvector ``v`` of ``(D - A) v = lambda D v``; the bipartition is
   ``v > mean(v)``;
3. the foreground side: a side holding 3 or 4 corners of the grid is the background; otherwise the foreground
   is the side holding the token of largest ``|v|``. The seed is then the foreground side's extreme token, and
   the mask is the seed's connected component (4-neighbour). This rule does not depend on the eigenvector's
   sign, which the solvers do not fix; CutLER looks at the corners of ``v > mean(v)`` only, and where that
   departs is stated in :func:`foreground_side`;
4. from the second round on, a mask whose IoU with the previous round's mask exceeds 0.5, or that covers at
   most 1% of the grid, is dropped; the tokens of every earlier mask get zero features for the next rounds, and
   each mask loses the tokens of the earlier masks.

The optional CRF post-processing of CutLER is not provided (no maintained package ships it with wheels; the
paper's table does not use it). Masks reach the image's size as in CutLER: nearest to the square model input,
then bicubic (:func:`upsample_mask`). Masks are scored ``(N - round) / N`` for COCO AP (MaskCut itself has no
scores; the first cut is the most salient object).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..errors import UserError
from ..presets import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "MaskCutMask",
    "display_factor",
    "foreground_side",
    "maskcut",
    "maskcut_image",
    "ncut_bipartition",
    "overlay_masks",
    "results_for_image",
    "second_eigenvector",
    "set_input_size",
    "upsample_mask",
]

EPS = 1e-5


@dataclass
class MaskCutMask:
    """One object mask found by MaskCut: its round, its boolean mask and its score ``(n - round) / n``."""

    round: int  # 0-based round that found it
    mask: np.ndarray  # bool: (rows, cols) from :func:`maskcut`, (H, W) from :func:`maskcut_image`
    score: float


def second_eigenvector(a: np.ndarray, solver: str = "auto") -> np.ndarray:
    """The second smallest generalised eigenvector of ``(D - A) v = lambda D v`` (D: row sums of A).

    ``"dense"``: scipy's ``eigh(D - A, D)``, CutLER's call (O(n^3): ~20-50 s for the 3600 tokens of a /8 model at
    480 px on 2 cores). ``"lanczos"``: the same vector as ``D^{-1/2} u`` with ``u`` the eigenvector of the second
    largest eigenvalue ``1 - lambda`` of ``D^{-1/2} A D^{-1/2}`` (ARPACK; well under a second there).
    ``"auto"``: dense up to 256 tokens, else Lanczos.
    """
    n = len(a)
    d = a.sum(1)
    if solver == "auto":
        solver = "dense" if n <= 256 else "lanczos"
    if solver == "dense":
        from scipy.linalg import eigh

        _, vecs = eigh(np.diag(d) - a, np.diag(d), subset_by_index=[1, 2])
        return vecs[:, 0]
    if solver != "lanczos":
        raise UserError(f"unknown eigen solver {solver!r}; use auto, dense or lanczos")
    from scipy.sparse.linalg import eigsh

    s = 1.0 / np.sqrt(d)
    v0 = np.random.default_rng(0).random(n)  # a fixed start: the same masks on every run
    w, u = eigsh(a * s[:, None] * s[None, :], k=2, which="LA", v0=v0)
    return u[:, int(np.argmin(w))] * s


def foreground_side(v: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, int]:
    """The foreground side of the bipartition ``v > mean(v)`` and its seed, the same for ``v`` and ``-v``.

    An eigenvector's sign is arbitrary: LAPACK's dense ``eigh`` and ARPACK's Lanczos may return opposite signs
    of the same vector. The two sides are ``P = {v > mean(v)}`` and its complement. The rule, sign-invariant:

    1. if one side holds 3 or 4 of the grid's corners, it is the background and the other side the foreground;
    2. otherwise the foreground is the side holding the token of largest ``|v|``;
    3. the seed is the foreground side's most extreme token (``argmax(s v)``, ``s = +1`` if the foreground is
       ``P``, else ``-1``).

    ``v`` is first scaled to a largest entry of 1 and rounded to 9 decimals: the binary affinity gives many
    tokens identical rows, hence equal entries of ``v`` that the solvers return different in the last bits;
    rounded, they tie exactly and a tie goes to the first token (row-major), whatever the solver.

    CutLER checks the corners of ``P`` only. Where ``P``'s complement holds 3 or more corners and the token of
    largest ``|v|`` lies in that complement, CutLER keeps the corner side (the background, typically when a
    large object leaves a small frame) and the opposite sign keeps the object; here both signs keep the
    object. Everywhere else the rule is CutLER's and gives CutLER's bipartition for either sign.
    """
    v = np.asarray(v, dtype=np.float64)
    v = np.round(v / max(float(np.abs(v).max()), 1e-300), 9)  # equal up to round-off -> equal: ties are exact
    part = v > v.mean()
    p2 = part.reshape(grid)
    corners = int(p2[0, 0]) + int(p2[0, -1]) + int(p2[-1, 0]) + int(p2[-1, -1])
    # a side holding 3 or 4 corners is the background (the complement holds 4 - corners); else the seed decides
    keep = corners <= 1 if corners != 2 else bool(part[int(np.argmax(np.abs(v)))])
    sign = 1.0 if keep else -1.0
    return (part if keep else ~part).reshape(grid), int(np.argmax(sign * v))


def ncut_bipartition(
    features: np.ndarray, grid: tuple[int, int], tau: float = 0.15, solver: str = "auto"
) -> tuple[np.ndarray, int]:
    """One normalised cut of the token graph: (foreground bool (rows, cols) before the connected component, seed
    index). ``features`` is (rows * cols, dim), rows of zeros allowed (masked-out tokens). The foreground side
    does not depend on the eigenvector's sign (:func:`foreground_side`)."""
    f = F.normalize(torch.as_tensor(features, dtype=torch.float64), dim=1).numpy()
    a = (f @ f.T > tau).astype(np.float64)
    a[a == 0] = EPS
    return foreground_side(second_eigenvector(a, solver), grid)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 0.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def maskcut(features: Tensor | np.ndarray, tau: float = 0.15, n: int = 3, solver: str = "auto") -> list[MaskCutMask]:
    """MaskCut on one image's patch features (rows, cols, dim): the kept masks at the token grid, in round order."""
    from scipy import ndimage

    if n < 1:
        raise UserError(f"MaskCut needs at least one round, got N={n}")
    feats = torch.as_tensor(features).detach().double().cpu().numpy()
    rows, cols, dim = feats.shape
    flat = feats.reshape(rows * cols, dim).copy()
    painted = np.zeros((rows, cols), bool)  # tokens of every earlier mask (features zeroed)
    previous = np.zeros((rows, cols), bool)
    taken = np.zeros((rows, cols), bool)  # union of the kept masks
    out: list[MaskCutMask] = []
    for i in range(n):
        flat[painted.reshape(-1)] = 0.0
        part, seed = ncut_bipartition(flat, (rows, cols), tau, solver)
        labels, _ = ndimage.label(part)
        component = labels.reshape(-1)[seed]
        mask = (labels == component) if component > 0 else np.zeros_like(part)
        if i >= 1 and (_iou(previous, mask) > 0.5 or mask.mean() <= 0.01):
            mask = np.zeros_like(mask)
        previous = mask
        painted |= mask
        kept = mask & ~taken
        taken |= kept
        if kept.any():
            out.append(MaskCutMask(i, kept, (n - i) / n))
    return out


def set_input_size(model: nn.Module, size: tuple[int, int]) -> None:
    """Let a CRATE or a timm ViT take ``size`` inputs (positional embedding interpolated)."""
    from ..registry import is_family_model

    if is_family_model(model):
        model.dynamic_img_size = True
    elif hasattr(model, "set_input_size"):
        model.set_input_size(img_size=size)
    else:
        raise UserError(f"cannot change the input size of {type(model).__name__}")


def image_tensor(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """CutLER's input: the image resized to size x size (Lanczos), scaled to [0, 1] and normalised: (3, S, S)."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@torch.no_grad()
def maskcut_image(
    model: nn.Module,
    image: Image.Image,
    size: int = 480,
    layer: int = -1,
    facet: str = "key",
    tau: float = 0.15,
    n: int = 3,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    solver: str = "auto",
) -> list[MaskCutMask]:
    """MaskCut on one image: masks at the image's own resolution (:func:`upsample_mask`, CutLER's two steps).

    The model must accept ``size`` inputs (:func:`set_input_size`)."""
    from .facets import facet_features

    x = image_tensor(image, size, mean, std)[None]
    feats = facet_features(model, x, layer, facet)[0]
    masks = maskcut(feats, tau, n, solver)
    for m in masks:
        m.mask = upsample_mask(m.mask, size, (image.width, image.height))
    return masks


def upsample_mask(mask: np.ndarray, size: int, image_size: tuple[int, int]) -> np.ndarray:
    """A token-grid mask (rows, cols) -> bool (H, W) at ``image_size = (W, H)``, as CutLER does it: nearest to the
    ``size`` x ``size`` model input (each token a block of pixels), then a bicubic resize of the 0/255 mask to the
    image's size (PIL), kept where it exceeds half of 255 (CutLER's ``create_annotation_info`` threshold)."""
    grid = torch.from_numpy(np.asarray(mask, bool)).float()[None, None]
    square = F.interpolate(grid, size=(size, size), mode="nearest")[0, 0].numpy()
    resized = Image.fromarray((square * 255).astype(np.uint8)).resize(image_size, Image.Resampling.BICUBIC)
    return np.asarray(resized) > 127.5


def results_for_image(masks: list[MaskCutMask], image_id: int) -> list[dict[str, Any]]:
    """COCO results (RLE mask, box, score, the one foreground category) of one image's masks."""
    from ..data.coco import FOREGROUND, mask_annotation

    return [mask_annotation(m.mask, image_id, FOREGROUND["id"], score=m.score) for m in masks]


def display_factor(size: tuple[int, int], min_side: int = 256) -> int:
    """The integer factor that brings an image's shorter side to at least ``min_side`` pixels (1 if it is)."""
    return max(1, -(-min_side // max(1, min(size))))


def overlay_masks(
    image: Image.Image,
    masks: Sequence[np.ndarray],
    alpha: float = 0.5,
    labels: Sequence[str] | None = None,
    min_side: int = 256,
) -> Image.Image:
    """The image with each mask (bool, H x W) blended in its own colour, its box drawn, and a legend strip
    below naming each colour (``labels``, default "mask 1", "mask 2", ...).

    An image smaller than ``min_side`` pixels (the 48-px built-in scenes) is enlarged by an integer factor with
    nearest-neighbour sampling, masks alike, so that every token stays a crisp block at a readable size."""
    from matplotlib import colormaps
    from PIL import ImageDraw, ImageFont

    k = display_factor(image.size, min_side)
    rgb = image.convert("RGB")
    if k > 1:
        rgb = rgb.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)
        masks = [np.kron(np.asarray(m, bool), np.ones((k, k), bool)) for m in masks]
    base = np.asarray(rgb, dtype=np.float64)
    colours = colormaps["tab10"].colors
    for i, m in enumerate(masks):
        base[m] = (1 - alpha) * base[m] + alpha * 255 * np.asarray(colours[i % 10])
    picture = Image.fromarray(base.round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if len(xs):
            colour = tuple(int(255 * c) for c in colours[i % 10])
            draw.rectangle([int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())], outline=colour, width=2)
    names = list(labels) if labels is not None else [f"mask {i + 1}" for i in range(len(masks))]
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    places, x, y = [], 6, 4  # a legend strip below the picture: entries flow left to right, then wrap
    for name in names:
        step = 19 + int(draw.textlength(name, font=font)) + 14
        if x > 6 and x + step > picture.width:
            x, y = 6, y + 22
        places.append((x, y))
        x += step
    out = Image.new("RGB", (picture.width, picture.height + y + 22), "white")
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    if not names:
        draw.text((6, picture.height + 4), "no mask kept", fill="black", font=font)
    for i, (name, (x, y)) in enumerate(zip(names, places, strict=True)):
        colour = tuple(int(255 * c) for c in colours[i % 10])
        draw.rectangle([x, picture.height + y + 1, x + 13, picture.height + y + 14], fill=colour, outline="black")
        draw.text((x + 19, picture.height + y), name, fill="black", font=font)
    return out
