"""Measuring what each CRATE layer does: compression (coding rate ``R^c``) and sparsification (non-zeros).

Figure 3 of the CRATE paper plots, layer by layer, the compression term and the sparsity of the tokens. With
``X_k = U_k^T LN(Z^l)`` the ``(n, p)`` projections of the ``n`` tokens onto head ``k``'s subspace (the MSSA input;
every token's vector normalised to unit length), ``p = dim_head`` and ``eps = 0.01``::

    R^c(Z^l) = 1/2 * sum_k logdet(I_n + p / (n * eps) * X_k X_k^T)

``logdet(I_n + a X X^T) = logdet(I_p + a X^T X)``, so the log-determinant is taken of the smaller Gram matrix, in
float64, through a Cholesky factorisation (``torch.logdet`` returned NaN under some CPU thread settings;
``benchmarks/cratebench.py`` checks the two forms agree under two threads).
The same measure is offered on ``Z^{l+1/2}`` (projected with the same layer's ``U_k`` and LayerNorm), i.e. right
after the compression step. Sparsity is the fraction of non-zero entries of the ISTA output ``Z^{l+1}``. For
CRATE-alpha, whose layer output is a residual sum (not sparse), the sparse code ``A_2`` of the two ISTA steps is
measured too (``code_sparsity``), as is the output.

Everything here is a function of tensors except :func:`layerwise_stats`, which runs a model's
:meth:`~cratevit.models.CRATE.forward_trace` over a batch of images.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor

from ..checkpoint import load_model as _load_model
from ..checkpoint import stored_preprocessing
from ..errors import UserError
from ..presets import IMAGENET, IMAGENET_MEAN, IMAGENET_STD, data_preprocessing, get_config, preprocessing_for
from ..registry import is_autoencoder, trace_blocks, trace_method

__all__ = [
    "MAE_DECODER_DEFINITIONS",
    "LayerwiseStats",
    "coding_rate",
    "compression",
    "input_normalization",
    "layerwise_stats",
    "load_model",
    "logdet_spd",
    "sparsity",
]

GramSide = Literal["auto", "tokens", "features"]
EPS = 0.01


def logdet_spd(m: Tensor) -> Tensor:
    """Log-determinant of symmetric positive-definite matrices ``(..., d, d)`` via Cholesky (float64 inside)."""
    chol, info = torch.linalg.cholesky_ex(m.double())
    if bool((info != 0).any()):
        raise UserError("matrix is not positive definite; the coding rate needs a finite, real input")
    return 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)


def coding_rate(x: Tensor, eps: float = EPS, normalize: bool = True, side: GramSide = "auto") -> Tensor:
    """``1/2 logdet(I_n + p / (n eps) X X^T)`` for ``x`` of shape ``(..., n, p)``; returns shape ``(...)``.

    ``normalize`` scales every row (token) to unit length first, as the reference does. ``side`` picks the Gram
    matrix: ``"tokens"`` (n x n, the direct formula), ``"features"`` (p x p) or ``"auto"`` (the smaller one).
    """
    if x.ndim < 2:
        raise UserError(f"coding_rate expects (..., n, p) token matrices, got shape {tuple(x.shape)}")
    x = x.double()
    if normalize:
        x = torch.nn.functional.normalize(x, dim=-1)
    n, p = x.shape[-2:]
    alpha = p / (n * eps)
    if side == "auto":
        side = "features" if p < n else "tokens"
    if side == "tokens":
        gram = x @ x.transpose(-2, -1)  # ... n n
    elif side == "features":
        gram = x.transpose(-2, -1) @ x  # ... p p
    else:
        raise UserError(f"side must be 'auto', 'tokens' or 'features', got {side!r}")
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return 0.5 * logdet_spd(eye + alpha * gram)


def compression(proj: Tensor, eps: float = EPS) -> Tensor:
    """The compression term ``R^c``: per-head coding rates of ``proj`` (b, heads, n, p) summed over heads -> (b,)."""
    if proj.ndim != 4:
        raise UserError(f"expected per-head projections (batch, heads, n, dim_head), got {tuple(proj.shape)}")
    return coding_rate(proj, eps=eps).sum(dim=1)


def sparsity(z: Tensor) -> Tensor:
    """Fraction of non-zero entries of each item's tokens: (b, n, dim) -> (b,)."""
    return (z != 0).flatten(1).double().mean(dim=1)


@dataclass
class LayerwiseStats:
    """Per-image, per-layer measurements; arrays are (images, layers), layer ``l`` is CRATE block ``l``."""

    rc_in: Tensor  # R^c of Z^l (the MSSA input, U_k^T LN1(Z^l))
    rc_half: Tensor  # R^c of Z^{l+1/2} (after compression, same U_k and LN1)
    sparsity: Tensor  # fraction of non-zeros of Z^{l+1} (the ISTA output)
    eps: float = EPS
    code_sparsity: Tensor | None = None  # CRATE-alpha: fraction of non-zeros of the sparse code A_2
    pi_entropy: Tensor | None = None  # ToST: entropy of each token's head membership Pi (NaN: class blocks)
    second_moment: Tensor | None = None  # ToST: mean Pi-weighted second moment s_k (NaN: class blocks)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return int(self.rc_in.shape[0])

    @property
    def depth(self) -> int:
        return int(self.rc_in.shape[1])

    def rows(self) -> list[dict[str, float]]:
        """One row per layer, ``layer`` its block index (0-based, as ``blocks.0`` .. ``blocks.L-1``; Figure 3 of
        the paper counts from 1): means and standard deviations over images."""
        rows = []
        for i in range(self.depth):
            row: dict[str, float] = {"layer": i}
            for name in ("rc_in", "rc_half", "sparsity", "code_sparsity", "pi_entropy", "second_moment"):
                if getattr(self, name) is None:
                    continue
                col = getattr(self, name)[:, i]
                if name in ("pi_entropy", "second_moment") and bool(col.isnan().all()):
                    continue  # a ToST class-attention block: no TSSA statistics
                row[f"{name}_mean"] = float(col.mean())
                row[f"{name}_std"] = float(col.std(correction=STD_CORRECTION[name]) if len(col) > 1 else 0.0)
            rows.append(row)
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "definitions": {**DEFINITIONS, "eps": self.eps},
            "num_images": self.num_images,
            "depth": self.depth,
            "layers": self.rows(),
            **self.meta,
        }

    def save(self, out_dir: str | Path, stem: str = "layerwise") -> list[Path]:
        """Write ``{stem}.csv`` and ``{stem}.json`` into ``out_dir``; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        json_path.write_text(json.dumps(self.to_json(), indent=2))
        return [csv_path, json_path]


DEFINITIONS = MappingProxyType(
    {
        "rc_in": "R^c(Z^l) = 1/2 sum_k logdet(I_n + p/(n eps) X_k X_k^T), X_k = U_k^T LN1(Z^l) with unit-length "
        "token rows, p = dim_head, n tokens (class token included); Z^l is the input of layer l",
        "rc_half": "the same measure on Z^{l+1/2} = Z^l + MSSA(LN1(Z^l)), projected with layer l's LN1 and U_k",
        "sparsity": "fraction of non-zero entries of Z^{l+1} = ISTA(LN2(Z^{l+1/2})), the output of layer l",
        "code_sparsity": "CRATE-alpha only: fraction of non-zero entries of the sparse code A_2 (b, n, 4 dim) of the "
        "two ISTA steps on LN2(Z^{l+1/2}); its layer output Z^{l+1} = Z^{l+1/2} + A_2 D_hat^T is a residual sum",
        "pi_entropy": "ToST only: entropy of each token's head membership Pi[:, i] (a softmax over the heads), divided "
        "by log(heads) and averaged over the patch tokens: 0 = every token in one head, 1 = spread evenly",
        "second_moment": "ToST only: the TSSA statistics s_k[j] = sum_i Pi[k, i] w[i, j]^2 / sum_i Pi[k, i], "
        "averaged over heads k and coordinates j; TSSA scales head k's coordinate j by 1 / (1 + s_k[j])",
        "std": "standard deviation over images, in the reference code's convention for each measure: rc_in and "
        "rc_half unbiased (divide by N - 1: torch.std, as the official CodingRate), sparsity population (divide by "
        "N, as the official sparsity plot; code_sparsity likewise); 0 for one image",
    }
)
"""Measure name -> its definition, as written into ``layerwise.json``."""
# Degrees-of-freedom correction of each measure's standard deviation (see DEFINITIONS["std"]).
STD_CORRECTION = MappingProxyType(
    {"rc_in": 1, "rc_half": 1, "sparsity": 0, "code_sparsity": 0, "pi_entropy": 0, "second_moment": 0}
)


MAE_DECODER_DEFINITIONS = MappingProxyType(
    {
        "rc_in": "R^c of the decoder's MSSA input: U_k^T LN2(Z^{l+1/2}), Z^{l+1/2} = LN1(Z^l) D^T",
        "rc_half": "the same measure on Z^{l+1} = Z^{l+1/2} - MSSA(LN2(Z^{l+1/2})), with layer l's LN2 and U_k",
        "sparsity": "fraction of non-zero entries of Z^{l+1}, the output of decoder layer l",
    }
)
"""Measure name -> its definition for a CRATE-MAE's decoder layers (``part="decoder"``), as in ``layerwise.json``."""


@torch.no_grad()
def layerwise_stats(
    model: torch.nn.Module,
    images: Tensor | Iterable[Tensor],
    batch_size: int = 32,
    eps: float = EPS,
    part: str = "encoder",
) -> LayerwiseStats:
    """Figure 3's measurements for every layer of ``model`` over ``images`` ((N, C, H, W) or an iterable of
    batches). For a CRATE-MAE (unmasked images), ``part`` picks the encoder (CRATE's measures) or the decoder
    (:data:`MAE_DECODER_DEFINITIONS`: the compression its MSSA step undoes, and the sparsity of its outputs)."""
    if part not in ("encoder", "decoder") or (part == "decoder" and not is_autoencoder(model)):
        raise UserError(f"part must be 'encoder' (any model) or 'decoder' (a CRATE-MAE), got {part!r}")
    was_training = model.training
    model.eval()
    batches = images.split(batch_size) if isinstance(images, Tensor) else images
    rc_in, rc_half, sparse, code, entropy, moment = [], [], [], [], [], []
    try:
        for batch in batches:
            if is_autoencoder(model):
                trace = model.forward_trace(batch)
                layers, blocks = (
                    (trace.encoder, model.blocks) if part == "encoder" else (trace.decoder, model.decoder_blocks)
                )
            else:
                layers, blocks = trace_method(model)(batch).layers, trace_blocks(model)
            rc_in.append(torch.stack([compression(t.proj, eps) for t in layers], dim=1))
            after = [t.z_half if part == "encoder" else t.z_out for t in layers]
            project = _project if part == "encoder" else _project_decoder
            rc_half.append(
                torch.stack(
                    [compression(project(block, z), eps) for block, z in zip(blocks, after, strict=True)], dim=1
                )
            )
            sparse.append(torch.stack([sparsity(t.z_out) for t in layers], dim=1))
            if all(getattr(t, "code", None) is not None for t in layers):
                code.append(torch.stack([sparsity(t.code) for t in layers], dim=1))
            if any(getattr(t, "membership", None) is not None for t in layers):  # ToST's TSSA statistics
                entropy.append(torch.stack([_membership_entropy(t, len(batch)) for t in layers], dim=1))
                moment.append(torch.stack([_mean_second_moment(t, len(batch)) for t in layers], dim=1))
    finally:
        model.train(was_training)
    if not rc_in:
        raise UserError("no images to analyse")
    return LayerwiseStats(
        torch.cat(rc_in),
        torch.cat(rc_half),
        torch.cat(sparse),
        eps=eps,
        code_sparsity=torch.cat(code) if code else None,
        pi_entropy=torch.cat(entropy) if entropy else None,
        second_moment=torch.cat(moment) if moment else None,
    )


def _membership_entropy(t: Any, b: int) -> Tensor:
    """Per image: the mean over tokens of the entropy of Pi[:, i] over the heads, / log(heads); NaN without Pi."""
    pi = getattr(t, "membership", None)  # (b, heads, n), softmax over the heads
    if pi is None:
        return torch.full((b,), float("nan"))
    h = -(pi.double() * pi.double().clamp_min(1e-30).log()).sum(dim=1)  # b n
    return (h / math.log(pi.shape[1]) if pi.shape[1] > 1 else h).mean(dim=1).float()


def _mean_second_moment(t: Any, b: int) -> Tensor:
    """Per image: the mean of the TSSA statistics s_k[j] over heads and coordinates; NaN without them."""
    s = getattr(t, "second_moment", None)  # (b, heads, p)
    return torch.full((b,), float("nan")) if s is None else s.float().mean(dim=(1, 2))


def _project_decoder(block: torch.nn.Module, z: Tensor) -> Tensor:
    """A CRATE-MAE decoder layer's ``U_k^T LN2(z)`` (its MSSA acts after the dictionary step)."""
    return block.mssa.project(block.norm2(z))


def _project(block: torch.nn.Module, z: Tensor) -> Tensor:
    """``U_k^T LN1(z)`` with a block's own LayerNorm and subspaces: (b, n, dim) -> (b, heads, n, dim_head) (an MHSA
    block's keys)."""
    return block.project(z)


def load_model(
    spec: str | Path, arch: str | None = None, heads: int | None = None, **overrides: Any
) -> torch.nn.Module:
    """A checkpoint file (``arch``: its preset, if the file does not record it), a ``save_pretrained`` folder, or
    a preset name (random weights): :func:`cratevit.checkpoint.load_model`. A missing file gets a clear error."""
    return _load_model(spec, arch=arch, heads=heads, **overrides)


def input_normalization(spec: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std a model was trained with: what its file records (``pretrained_cfg``), else the
    normalisation of its training data (the built-in digits and shapes data use 0.5), else its preset's,
    else ImageNet's (:mod:`cratevit.presets` holds every value)."""
    path = Path(spec)
    stored = stored_preprocessing(path) if path.exists() else None
    if stored and "mean" in stored and "std" in stored:
        return tuple(stored["mean"]), tuple(stored["std"])
    if stored and "data" in stored:
        prep = data_preprocessing(str(stored["data"]))
        return prep.mean, prep.std
    if not path.exists():
        try:
            prep = preprocessing_for(get_config(str(spec)))
        except UserError:
            prep = IMAGENET
        return prep.mean, prep.std
    return IMAGENET_MEAN, IMAGENET_STD
