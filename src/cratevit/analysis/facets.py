"""Patch features by facet, and PCA of them as the emergence paper computes it (its Figure 5).

Facets of layer ``l`` (CRATE names; a timm ViT's counterpart in brackets):

* ``key``: the concatenated per-head projections ``U_k^T LN(Z^l)`` that MSSA compares (the keys of the
  layer's attention, ``k`` of ``qkv(norm1(x))``); what the paper's PCA and MaskCut use;
* ``attn``: ``Z^{l+1/2} = Z^l + MSSA(LN(Z^l))``, the tokens after the attention step (``x + ls1(attn(..))``);
* ``token``: the layer's output ``Z^{l+1}`` (the block's output);
* ``code``: the sparse code of the ISTA step; in CRATE this is the layer output, so ``code`` and ``token`` are
  the same features; CRATE-alpha's is its overcomplete code ``A`` (before the decoder); a ViT has none (an error).

:func:`paper_pca`: one principal component fitted jointly over all images' patches, min-max scaled per image
and thresholded (0.4, holes filled) to remove the background; then three components fitted jointly on the
foreground patches only, shown as RGB (per image min-max, background black).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UserError
from .layers import read_layer

__all__ = ["FACETS", "PaperPCA", "facet_features", "paper_pca"]

FACETS = ("key", "attn", "token", "code")
"""The facets :func:`facet_features` reads: ``key``, ``attn``, ``token`` and ``code`` (see the module text)."""


def _check_facet(facet: str) -> None:
    if facet not in FACETS:
        raise UserError(f"unknown facet {facet!r}; choose one of {', '.join(FACETS)}")


@torch.no_grad()
def facet_features(model: nn.Module, x: Tensor, layer: int = -1, facet: str = "key", decoder: bool = False) -> Tensor:
    """Patch features (b, rows, cols, dim) of ``facet`` at ``layer`` for a CRATE or a timm ViT; ``decoder``: a
    CRATE-MAE's decoder layer (``key``: its MSSA input ``U_k^T LN(Z^{l+1/2})``, ``attn``: ``Z^{l+1/2} = LN(Z^l) D^T``,
    ``token``: its output). Read by :func:`cratevit.analysis.layers.read_layer`."""
    from ..registry import code_kind, is_family_model

    _check_facet(facet)
    if facet == "code" and is_family_model(model) and not decoder and code_kind(model) is None:
        raise UserError(
            f"this {model.config.variant} model has no sparse code (its layers have no ISTA step); "
            "use the key, attn or token facet"
        )
    if facet == "code" and not is_family_model(model):
        raise UserError("the 'code' facet (ISTA's sparse code) exists in CRATE only; use key, attn or token")
    record, read = read_layer(model, x, layer, decoder)
    return record.patches(facet, read.grid, read.prefix)


@dataclass
class PaperPCA:
    """Per image: the scaled first component, the foreground mask and the RGB map of the foreground PCA."""

    first: list[np.ndarray]  # (rows, cols) in [0, 1]
    foreground: list[np.ndarray]  # bool (rows, cols)
    rgb: list[np.ndarray]  # (rows, cols, 3) in [0, 1], background 0
    explained_variance_ratio: np.ndarray  # of the foreground PCA


def _minmax(a: np.ndarray, axis: int | tuple[int, ...] | None = None) -> np.ndarray:
    lo, hi = a.min(axis=axis, keepdims=True), a.max(axis=axis, keepdims=True)
    return (a - lo) / np.where(hi > lo, hi - lo, 1.0)


def paper_pca(features: Sequence[Tensor], threshold: float = 0.4, n_components: int = 3) -> PaperPCA:
    """The paper's two-stage PCA over a set of images; ``features`` holds one (rows, cols, dim) tensor each.

    The sign of the first component is arbitrary: it is chosen so that most border patches (over all images)
    fall below ``threshold``, i.e. are background.
    """
    from scipy import ndimage
    from sklearn.decomposition import PCA

    if not features:
        raise UserError("PCA needs at least one image")
    if not 0.0 < threshold < 1.0:
        raise UserError(f"the foreground threshold must be in (0, 1), got {threshold}")
    shapes = [tuple(f.shape[:2]) for f in features]
    flat = [f.reshape(-1, f.shape[-1]).double().cpu().numpy() for f in features]
    stacked = np.concatenate(flat)
    first = PCA(n_components=1, svd_solver="full").fit_transform(stacked)[:, 0]
    splits = np.cumsum([r * c for r, c in shapes])[:-1]
    per_image = [_minmax(p.reshape(s)) for p, s in zip(np.split(first, splits), shapes, strict=True)]
    border_fg = np.concatenate([np.concatenate([p[0], p[-1], p[:, 0], p[:, -1]]) > threshold for p in per_image])
    if border_fg.mean() > 0.5:
        per_image = [1.0 - p for p in per_image]
    fg = [ndimage.binary_fill_holes(p > threshold) for p in per_image]
    fg_rows = np.concatenate([f.reshape(-1, f.shape[-1])[m.reshape(-1)] for f, m in zip(flat, fg, strict=True)])
    k = min(n_components, *fg_rows.shape) if len(fg_rows) else 0
    rgb, ratio = [np.zeros((*s, 3)) for s in shapes], np.zeros(0)
    if k > 0:
        pca = PCA(n_components=k, svd_solver="full").fit(fg_rows)
        ratio = pca.explained_variance_ratio_
        for i, (f, m) in enumerate(zip(flat, fg, strict=True)):
            if m.any():
                scores = pca.transform(f.reshape(-1, f.shape[-1])[m.reshape(-1)])[:, :3]
                scores = np.concatenate([scores, np.zeros((len(scores), 3 - scores.shape[1]))], axis=1)
                rgb[i][m] = _minmax(scores, axis=0)
    return PaperPCA(per_image, fg, rgb, ratio)
