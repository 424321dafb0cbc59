"""Metrics of a sparse code, whoever made it: an SAE's features (:mod:`.sae`) or a CRATE layer's ISTA code against
its dictionary. Everything is a function of tensors. Shapes: ``N`` tokens, ``d`` input width, ``F`` features.

With ``x`` (N, d) the activations the code describes, ``f`` (N, F) the code and ``x_hat`` (N, d) the
reconstruction (an SAE's decoder output; for CRATE's ISTA step, ``x = LN2(Z^{l+1/2})`` and
``x_hat = f D^T`` with ``f = Z^{l+1}`` the code and ``D`` the layer's (d, d) dictionary, :func:`ista_reconstruction`):

* **L0** (:func:`l0`): mean number of non-zero entries of ``f`` per token;
* **fraction of variance explained** (:func:`fraction_variance_explained`, SAELens' "explained variance" over the
  whole set): ``FVE = 1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2``; 1 is perfect, 0 is no better
  than the mean token, negative is worse;
* **feature frequency**: the fraction of tokens on which a feature is non-zero; a feature is **dead** when its
  frequency is at most :data:`DEAD_AT_MOST` (0: it never fires on the evaluation tokens, so the figure depends on
  how many tokens were seen: report ``N``), **dense** when it is above :data:`DENSE_ABOVE` (10% of tokens: the
  log10-frequency > -1 cut of SAELens' and Anthropic's feature-density histograms);
* **downstream loss recovered** (:func:`loss_recovered`): with the model's loss on clean activations ``L_clean``,
  with the layer's activations replaced by zeros ``L_zero`` and by the reconstruction ``L_spliced``:
  ``(L_zero - L_spliced) / (L_zero - L_clean)`` (1: the reconstruction loses nothing; 0: no better than zeros);
* **linear-probe accuracy** (:func:`code_probe`): the image's code (the mean over its patch tokens,
  :func:`pool_codes`) through :func:`cratevit.analysis.probe.linear_probe`;
* **monosemanticity** (:func:`feature_purity`, :func:`monosemanticity`) against ground-truth token attributes
  (:func:`shapes_token_attributes` reads them from the built-in shapes data): for each feature with at least
  ``min_active`` active tokens, its ``top`` most active tokens (fewer if fewer are active) are taken, and its
  **purity** for an attribute is the fraction of those tokens that share the attribute's most common value among
  them. A feature's monosemanticity is its largest purity over the attributes; the summary is the mean over
  features that qualify, per attribute and overall, beside each attribute's *base rate* ``b`` (the frequency of its
  most common value over all tokens: what a feature firing on random tokens scores for large ``top``). The
  *chance-adjusted* purity ``(purity - b) / (1 - b)`` is 0 for a feature no purer than the most common value and 1
  for a pure one; ``score_adjusted`` is the mean over features of their largest adjusted purity.

The shapes attributes of a patch token (:func:`shapes_token_attributes`): ``shape``: the object's class (0..5)
when at least half of the patch's pixels are on the object, else 6 ("background"); ``colour``: the patch's mean
RGB colour in [0, 1] quantised to the 8 octants of the colour cube, ``4 [r >= .5] + 2 [g >= .5] + [b >= .5]``;
``position``: the patch's cell in a 3 x 3 partition of the image, ``3 * (3 row // rows) + (3 col // cols)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from .probe import L2_GRID, LinearProbeResult, linear_probe

__all__ = [
    "DEAD_AT_MOST",
    "DEFINITIONS",
    "DENSE_ABOVE",
    "SHAPES_ATTRIBUTES",
    "CodeMetrics",
    "code_metrics",
    "code_probe",
    "dead_fraction",
    "dense_fraction",
    "feature_frequency",
    "feature_purity",
    "fraction_variance_explained",
    "ista_reconstruction",
    "l0",
    "loss_recovered",
    "monosemanticity",
    "pool_codes",
    "shapes_token_attributes",
]

DEAD_AT_MOST = 0.0
"""Firing frequency at or below which a feature is dead (0: it never fires on the evaluation tokens)."""
DENSE_ABOVE = 0.1
"""Firing frequency above which a feature is dense (non-zero on more than 10% of the tokens)."""
SHAPES_ATTRIBUTES = ("shape", "colour", "position")
"""The ground-truth attributes of a shapes patch token (:func:`shapes_token_attributes`)."""

DEFINITIONS = MappingProxyType(
    {
        "l0": "mean number of non-zero code entries per token",
        "fve": "1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2 over the evaluation tokens",
        "dead_fraction": f"fraction of features whose firing frequency is <= {DEAD_AT_MOST} (never non-zero)",
        "dense_fraction": f"fraction of features non-zero on more than {DENSE_ABOVE:.0%} of tokens",
        "loss_recovered": "(L_zero - L_spliced) / (L_zero - L_clean)",
        "purity": "per feature and attribute: fraction of its top active tokens sharing their most common value",
        "monosemanticity": "per feature: its largest purity over the attributes; mean over qualifying features",
    }
)
"""Each metric's definition in one line (written into ``eval.json``)."""


def _flat(codes: Tensor) -> Tensor:
    return codes.detach().reshape(-1, codes.shape[-1])


def l0(codes: Tensor) -> float:
    """Mean number of non-zero entries per token of ``codes`` (..., F)."""
    return float((_flat(codes) != 0).sum(-1).double().mean())


def feature_frequency(codes: Tensor) -> Tensor:
    """Fraction of tokens on which each feature is non-zero: (..., F) -> (F,) float64."""
    return (_flat(codes) != 0).double().mean(0)


def dead_fraction(codes: Tensor, at_most: float = DEAD_AT_MOST) -> float:
    """Fraction of features whose firing frequency over the tokens of ``codes`` (..., F) is at most ``at_most``."""
    return float((feature_frequency(codes) <= at_most).double().mean())


def dense_fraction(codes: Tensor, above: float = DENSE_ABOVE) -> float:
    """Fraction of features non-zero on more than ``above`` of the tokens of ``codes`` (..., F)."""
    return float((feature_frequency(codes) > above).double().mean())


def fraction_variance_explained(x: Tensor, x_hat: Tensor) -> float:
    """``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over all tokens of ``x``, ``x_hat`` (..., d), in float64."""
    if x.shape != x_hat.shape:
        raise UserError(f"activations {tuple(x.shape)} and reconstruction {tuple(x_hat.shape)} differ in shape")
    x, x_hat = _flat(x).double(), _flat(x_hat).double()
    total = (x - x.mean(0)).pow(2).sum()
    if total == 0:
        raise UserError("the activations do not vary (all tokens equal); the fraction of variance is undefined")
    return float(1 - (x - x_hat).pow(2).sum() / total)


def ista_reconstruction(code: Tensor, dictionary: Tensor) -> Tensor:
    """CRATE's reconstruction of the ISTA input from its code: ``code @ D^T`` ((..., F) with D (d, F) -> (..., d))."""
    if code.shape[-1] != dictionary.shape[1]:
        raise UserError(
            f"a code of width {code.shape[-1]} does not fit a dictionary of shape {tuple(dictionary.shape)}"
        )
    return code @ dictionary.t()


def loss_recovered(clean: float, zero: float, spliced: float) -> float:
    """``(L_zero - L_spliced) / (L_zero - L_clean)``: 1 when splicing the reconstruction in costs nothing."""
    if zero == clean:
        raise UserError(
            f"zero-ablating the layer does not change the loss ({zero}); the recovered fraction is undefined"
        )
    return (zero - spliced) / (zero - clean)


@dataclass
class CodeMetrics:
    """The metrics of one code on one set of tokens (see the module docstring)."""

    l0: float
    fve: float
    dead_fraction: float
    dense_fraction: float
    tokens: int
    features: int
    dead_at_most: float = DEAD_AT_MOST
    dense_above: float = DENSE_ABOVE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def code_metrics(
    x: Tensor, codes: Tensor, x_hat: Tensor, dead_at_most: float = DEAD_AT_MOST, dense_above: float = DENSE_ABOVE
) -> CodeMetrics:
    """L0, FVE, dead and dense fractions of ``codes`` (..., F) describing ``x`` by ``x_hat`` (..., d)."""
    flat = _flat(codes)
    freq = feature_frequency(flat)
    return CodeMetrics(
        l0=l0(flat),
        fve=fraction_variance_explained(x, x_hat),
        dead_fraction=float((freq <= dead_at_most).double().mean()),
        dense_fraction=float((freq > dense_above).double().mean()),
        tokens=int(flat.shape[0]),
        features=int(flat.shape[1]),
        dead_at_most=dead_at_most,
        dense_above=dense_above,
    )


def pool_codes(codes: Tensor, prefix: int = 0) -> Tensor:
    """One vector per image: the mean code over its patch tokens, (b, n, F) -> (b, F) (the first ``prefix``
    tokens, e.g. the class token, left out)."""
    if codes.ndim != 3:
        raise UserError(f"expected codes of shape (images, tokens, features), got {tuple(codes.shape)}")
    return codes[:, prefix:].float().mean(1)


def code_probe(
    train_codes: Tensor,
    train_labels: Tensor,
    test_codes: Tensor,
    test_labels: Tensor,
    prefix: int = 0,
    l2_grid: Sequence[float] = L2_GRID,
) -> LinearProbeResult:
    """Linear-probe accuracy of pooled codes (images, tokens, F) (:func:`pool_codes`, then
    :func:`cratevit.analysis.probe.linear_probe`)."""
    return linear_probe(
        pool_codes(train_codes, prefix), train_labels, pool_codes(test_codes, prefix), test_labels, l2_grid
    )


# --------------------------------------------------------------------------------------------- monosemanticity
def feature_purity(
    codes: Tensor, attributes: Mapping[str, Tensor], top: int = 20, min_active: int = 1
) -> dict[str, Tensor]:
    """Per attribute, each feature's purity (F,) float64: the fraction of its ``top`` most active tokens (only
    active ones) that share their most common value; NaN for features with fewer than ``min_active`` active
    tokens. ``codes`` (N, F); ``attributes``: name -> integer values (N,)."""
    flat = _flat(codes).float()
    n, nf = flat.shape
    if top < 1 or min_active < 1:
        raise UserError(f"purity needs top >= 1 and min_active >= 1, got {top} and {min_active}")
    for name, values in attributes.items():
        if values.shape != (n,):
            raise UserError(f"attribute {name!r} has shape {tuple(values.shape)}; expected one value per token ({n},)")
    k = min(top, n)
    values, idx = flat.topk(k, dim=0)  # (k, F): each feature's top tokens
    active = values != 0
    counts = active.sum(0)  # (F,)
    out = {}
    for name, attr in attributes.items():
        attr = attr.long()
        labels = attr[idx]  # (k, F)
        n_values = int(attr.max()) + 1 if n else 1
        hist = torch.zeros(n_values, nf, dtype=torch.float64)
        hist.scatter_add_(0, labels, active.double())  # per feature, how many active top tokens have each value
        purity = hist.max(0).values / counts.clamp_min(1).double()
        out[name] = torch.where(counts >= min_active, purity, torch.full_like(purity, float("nan")))
    return out


def monosemanticity(
    codes: Tensor, attributes: Mapping[str, Tensor], top: int = 20, min_active: int = 5
) -> dict[str, Any]:
    """Summary of :func:`feature_purity` over the features that qualify (``features`` counts them): per attribute
    the mean purity, the base rate ``b`` (frequency of the attribute's most common value over all tokens) and the
    mean chance-adjusted purity ``(purity - b) / (1 - b)`` (0: no purer than the most common value, 1: pure);
    ``score``: mean over features of their largest purity; ``score_adjusted``: of their largest adjusted purity
    (an attribute with a dominant value, e.g. background, cannot make a feature look monosemantic)."""
    purity = feature_purity(codes, attributes, top, min_active)
    bases = {}
    for name in purity:
        attr = attributes[name].long()
        bases[name] = float(torch.bincount(attr).max() / len(attr)) if len(attr) else float("nan")
    stacked = torch.stack(list(purity.values()))  # (attributes, F)
    adjusted = torch.stack([(p - bases[n]) / max(1 - bases[n], 1e-12) for n, p in purity.items()])
    ok = ~stacked.isnan().any(0)
    any_ok = bool(ok.any())
    result: dict[str, Any] = {"top": top, "min_active": min_active, "features": int(ok.sum())}
    result["score"] = float(stacked[:, ok].max(0).values.mean()) if any_ok else float("nan")
    result["score_adjusted"] = float(adjusted[:, ok].max(0).values.mean()) if any_ok else float("nan")
    for i, (name, p) in enumerate(purity.items()):
        result[name] = {
            "purity": float(p[ok].mean()) if any_ok else float("nan"),
            "base_rate": bases[name],
            "adjusted": float(adjusted[i, ok].mean()) if any_ok else float("nan"),
        }
    return result


def shapes_token_attributes(dataset: Any, indices: Sequence[int], grid: tuple[int, int]) -> dict[str, Tensor]:
    """Ground-truth attributes (``shape``, ``colour``, ``position``, see the module docstring) of the patch tokens
    of shapes images ``indices`` of a :class:`cratevit.data.shapes.ShapesDataset`, for a model with a ``grid``
    (rows, cols) of patches; tokens in the order image, row, col (as ``codes[:, prefix:].reshape(-1, F)``)."""
    from ..data.shapes import NUM_CLASSES

    rows, cols = grid
    shape, colour, position = [], [], []
    r_idx = np.repeat(np.arange(rows), cols)
    c_idx = np.tile(np.arange(cols), rows)
    region = 3 * (3 * r_idx // rows) + (3 * c_idx // cols)
    for i in indices:
        image, label, mask = dataset.sample(int(i))
        pixels = np.asarray(image, dtype=np.float64) / 255.0
        h, w = mask.shape
        if h % rows or w % cols:
            raise UserError(f"a {h}x{w} image does not split into a {rows}x{cols} patch grid")
        ph, pw = h // rows, w // cols
        fg = mask.reshape(rows, ph, cols, pw).mean(axis=(1, 3)).reshape(-1)
        mean_rgb = pixels.reshape(rows, ph, cols, pw, 3).mean(axis=(1, 3)).reshape(-1, 3)
        shape.append(np.where(fg >= 0.5, label, NUM_CLASSES))
        colour.append((mean_rgb >= 0.5) @ np.array([4, 2, 1]))
        position.append(region)
    return {
        "shape": torch.from_numpy(np.concatenate(shape)).long(),
        "colour": torch.from_numpy(np.concatenate(colour)).long(),
        "position": torch.from_numpy(np.concatenate(position)).long(),
    }
