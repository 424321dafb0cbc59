"""Sparse autoencoders (SAEs): the field's after-the-fact sparse codes, to set beside CRATE's built-in ISTA code.

An SAE with ``F = expansion * d`` features reads a token ``x`` (a row of shape ``(d,)``) of some layer and writes a
sparse code ``f`` (shape ``(F,)``) and a reconstruction ``x_hat``::

    x' = s * x                               input scaled so that E||x'|| = sqrt(d) over the first batch (s fixed)
    a  = (x' - b_dec) E^T + b_enc            pre-activations, (F,); E = ``encoder`` (F, d)
    f  = relu(a)                  ("relu")   or  f = relu(TopK_k(a)) (the k largest kept, "topk")
    x_hat = (f D^T + b_dec) / s              D = ``dictionary`` (d, F): its COLUMNS are the features' directions

As in CRATE's ISTA step (whose reconstruction is ``code @ D^T`` with ``D`` of shape (dim, dim)), atoms are the
columns of a ``(d, F)`` dictionary, so the two codes are compared with the same functions
(:mod:`cratevit.analysis.codes`). The standard choices, named as the libraries name them:

* **pre-encoder bias** (SAELens ``apply_b_dec_to_input``; Bricken et al. 2023, "Towards Monosemanticity"):
  ``b_dec`` is subtracted before encoding and added after decoding; initialised to the mean of the first batch
  (Anthropic and SAELens use the geometric median; the mean is its cheap stand-in);
* **tied initialisation** (Gao et al. 2024; SAELens ``init_encoder_as_decoder_transpose``): ``E = D^T`` at start,
  ``D`` with random unit columns, ``b_enc = 0``;
* **unit-norm decoder columns**: each column of ``D`` is renormalised to length 1 after every optimiser step, and
  the gradient's component parallel to each column is removed before the step (SAELens
  ``remove_gradient_parallel_to_decoder_directions``; Bricken et al.);
* **input scaling** (SAELens ``normalize_activations="expected_average_only_in"``): one fixed scalar ``s`` so that
  ``E||s x|| = sqrt(d)``, making the L1 coefficient comparable across layers and models;
* **ReLU + L1** (:data:`ARCHS` ``"relu"``): loss ``||x' - x_hat'||^2 + lambda * sum_i f_i ||D_:,i||`` (the L1 of
  each feature weighted by its decoder column's norm, Anthropic's April 2024 update and SAELens
  ``scale_sparsity_penalty_by_decoder_norm``; with unit-norm columns the weights are 1), ``lambda`` warmed up
  linearly from 0 (SAELens ``l1_warm_up_steps``); dead features are **resampled** (Bricken et al.,
  :meth:`SparseAutoencoder.resample`);
* **TopK** (``"topk"``, Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): no sparsity penalty, exactly
  ``k`` pre-activations kept per token; dead features get the **AuxK** loss: the residual ``e = x' - x_hat'`` is
  reconstructed by the top ``k_aux`` pre-activations of the dead features alone, ``e_hat = f_aux D^T``, and
  ``alpha * ||e - e_hat||^2`` is added (``alpha = 1/32``, ``k_aux = d / 2``, as in the paper).

A feature is *dead* during training when it has not fired on the last ``dead_after`` tokens
(:attr:`SparseAutoencoder.tokens_since_fired`, a buffer, so it travels with checkpoints). Training lives in
:mod:`cratevit.analysis.sae_train`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError

__all__ = ["ARCHS", "SAEConfig", "SAELoss", "SparseAutoencoder"]

ARCHS = ("relu", "topk")
"""The SAE architectures: ReLU with an L1 penalty, and TopK (with AuxK)."""
Arch = Literal["relu", "topk"]


@dataclass
class SAEConfig:
    """Shape and sparsity mechanism of an SAE. ``d_in``: width of the activations; ``F = expansion * d_in``."""

    d_in: int
    expansion: int = 8
    arch: Arch = "relu"
    l1_coeff: float = 1.0  # lambda of "relu", on inputs scaled to E||x|| = sqrt(d) (digits layer 3: L0 ~18 at 1)
    k: int = 16  # features kept per token by "topk"
    aux_k: int | None = None  # AuxK's k_aux ("topk"); None: d_in // 2 (Gao et al.: 512 for d = 768 ... )
    aux_coeff: float = 1.0 / 32.0  # AuxK's alpha
    dead_after: int = 100_000  # tokens without firing after which a feature counts as dead (Gao et al.: 10M)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UserError(f"unknown SAE architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.d_in < 1 or self.expansion < 1:
            raise UserError(f"an SAE needs d_in >= 1 and expansion >= 1, got {self.d_in} and {self.expansion}")
        if self.arch == "topk" and not 0 < self.k <= self.d_sae:
            raise UserError(f"TopK needs 0 < k <= {self.d_sae} features, got k={self.k}")
        if self.l1_coeff < 0 or self.aux_coeff < 0 or self.dead_after < 1:
            raise UserError("l1_coeff and aux_coeff must be >= 0 and dead_after >= 1 token")

    @property
    def d_sae(self) -> int:
        return self.d_in * self.expansion

    @property
    def k_aux(self) -> int:
        return min(self.aux_k if self.aux_k is not None else max(self.d_in // 2, 1), self.d_sae)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown SAE configuration fields {unknown}; this file was written by a newer cratevit")
        return cls(**d)


@dataclass
class SAELoss:
    """One batch's loss and its parts (all scalars; ``l0`` and ``fve`` are detached diagnostics)."""

    loss: Tensor
    mse: Tensor  # mean over tokens of ||x' - x_hat'||^2 (scaled inputs)
    sparsity: Tensor  # "relu": sum_i f_i ||D_:,i|| (mean over tokens, before lambda); "topk": 0
    aux: Tensor  # "topk": AuxK's ||e - e_hat||^2 (before alpha); "relu": 0
    l0: float  # mean number of non-zero features per token
    fve: float  # 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the batch


class SparseAutoencoder(nn.Module):
    """An SAE (see the module docstring for the equations). ``forward(x)`` -> ``x_hat``, same shape as ``x``
    ``(..., d_in)``; :meth:`encode` -> the code ``(..., d_sae)``; :meth:`decode` inverts it."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.config = cfg
        d, n = cfg.d_in, cfg.d_sae
        dictionary = F.normalize(torch.randn(d, n), dim=0)  # unit columns
        self.dictionary = nn.Parameter(dictionary)  # D (d, F)
        self.encoder = nn.Parameter(dictionary.t().clone())  # E (F, d), tied at init
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("input_scale", torch.ones(()))  # s
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long))

    # ------------------------------------------------------------------------------------------- the maps
    def pre_activations(self, x: Tensor) -> Tensor:
        """``a = (s x - b_dec) E^T + b_enc``: (..., d_in) -> (..., d_sae)."""
        return (x * self.input_scale - self.b_dec) @ self.encoder.t() + self.b_enc

    def activate(self, a: Tensor) -> Tensor:
        """The code from pre-activations: ReLU, or ReLU of the ``k`` largest (the rest 0)."""
        if self.config.arch == "relu":
            return F.relu(a)
        values, idx = a.topk(self.config.k, dim=-1)
        return torch.zeros_like(a).scatter(-1, idx, F.relu(values))

    def encode(self, x: Tensor) -> Tensor:
        """The sparse code ``f``, (..., d_sae)."""
        return self.activate(self.pre_activations(x))

    def decode(self, f: Tensor) -> Tensor:
        """``x_hat = (f D^T + b_dec) / s``, in the input's units: (..., d_sae) -> (..., d_in)."""
        return (f @ self.dictionary.t() + self.b_dec) / self.input_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------------------------------- training
    @torch.no_grad()
    def initialize_from(self, x: Tensor) -> None:
        """Data-dependent start from a first batch ``x`` (tokens, d_in): the input scale ``s`` and ``b_dec``."""
        x = x.reshape(-1, self.config.d_in).float()
        norm = x.norm(dim=-1).mean()
        if not torch.isfinite(norm) or norm <= 0:
            raise UserError("the first batch of activations is all zero or not finite; an SAE cannot be fitted")
        self.input_scale.fill_(math.sqrt(self.config.d_in) / float(norm))
        self.b_dec.copy_((x * self.input_scale).mean(0))

    def loss(self, x: Tensor, l1_coeff: float | None = None) -> SAELoss:
        """The training loss on a batch ``x`` (tokens, d_in); ``l1_coeff`` overrides the configured lambda (its
        warm-up). Updates :attr:`tokens_since_fired` when the module is in training mode."""
        cfg = self.config
        x = x.reshape(-1, cfg.d_in)
        xs = x * self.input_scale
        a = self.pre_activations(x)
        f = self.activate(a)
        recon = f @ self.dictionary.t() + self.b_dec  # scaled units
        err = xs - recon
        mse = err.pow(2).sum(-1).mean()
        zero = mse.new_zeros(())
        sparsity, aux = zero, zero
        if cfg.arch == "relu":
            lam = cfg.l1_coeff if l1_coeff is None else l1_coeff
            sparsity = (f * self.dictionary.norm(dim=0)).sum(-1).mean()
            loss = mse + lam * sparsity
        else:
            aux = self._aux_loss(a, err.detach())
            loss = mse + cfg.aux_coeff * aux
        with torch.no_grad():
            fired = (f > 0).any(0)
            if self.training:
                self.tokens_since_fired.add_(x.shape[0]).masked_fill_(fired, 0)
            total = (xs - xs.mean(0)).pow(2).sum()
            fve = float(1 - err.pow(2).sum() / total) if total > 0 else float("nan")
            l0 = float((f > 0).sum(-1).float().mean())
        return SAELoss(loss, mse, sparsity, aux, l0, fve)

    def dead_mask(self) -> Tensor:
        """Features that have not fired on the last ``dead_after`` training tokens, (d_sae,) bool."""
        return self.tokens_since_fired >= self.config.dead_after

    def _aux_loss(self, a: Tensor, residual: Tensor) -> Tensor:
        """AuxK: the residual reconstructed by the top ``k_aux`` dead features alone (0 when none is dead)."""
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return residual.new_zeros(())
        masked = a.masked_fill(~dead, float("-inf"))
        values, idx = masked.topk(min(self.config.k_aux, n_dead), dim=-1)
        f_aux = torch.zeros_like(a).scatter(-1, idx, F.relu(values))
        return (residual - f_aux @ self.dictionary.t()).pow(2).sum(-1).mean()

    @torch.no_grad()
    def normalize_dictionary(self) -> None:
        """Rescale every column of ``D`` to unit length (after each optimiser step)."""
        self.dictionary.div_(self.dictionary.norm(dim=0, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Remove from ``D``'s gradient its component along each (unit) column: ``g_i -= (g_i . d_i) d_i``, so a
        step moves columns along the unit sphere (before each optimiser step)."""
        g = self.dictionary.grad
        if g is not None:
            g.sub_(self.dictionary * (g * self.dictionary).sum(0, keepdim=True))

    @torch.no_grad()
    def resample(self, x: Tensor, dead: Tensor, optimizer: torch.optim.Optimizer | None = None, generator=None) -> int:
        """Bricken et al.'s resampling of the ``dead`` features ((d_sae,) bool) from a batch ``x`` (tokens, d_in):
        inputs are drawn with probability proportional to their squared reconstruction error; each dead feature's
        dictionary column becomes the drawn input (scaled, ``b_dec`` removed) normalised to unit length, its
        encoder row the same direction times 0.2 times the mean encoder-row norm of the live features, its
        encoder bias 0, and the optimizer's moments of those entries are reset. Returns the number resampled.

        (Anthropic draws from 819,200 inputs; here the batch at hand is the sample, so a stream needs no second
        pass.)"""
        idx = dead.nonzero().flatten()
        if len(idx) == 0:
            return 0
        x = x.reshape(-1, self.config.d_in)
        xs = x * self.input_scale - self.b_dec
        err = (x - self(x)).pow(2).sum(-1) * self.input_scale**2
        weights = err.pow(2) if bool((err > 0).any()) else torch.ones_like(err)
        drawn = torch.multinomial(weights, len(idx), replacement=len(idx) > len(weights), generator=generator)
        directions = F.normalize(xs[drawn], dim=-1)  # (n_dead, d)
        alive = ~dead
        scale = self.encoder[alive].norm(dim=-1).mean() if bool(alive.any()) else torch.ones(())
        self.dictionary[:, idx] = directions.t()
        self.encoder[idx] = directions * 0.2 * scale
        self.b_enc[idx] = 0.0
        self.tokens_since_fired[idx] = 0
        if optimizer is not None:
            for param, rows in ((self.dictionary, (slice(None), idx)), (self.encoder, (idx,)), (self.b_enc, (idx,))):
                state = optimizer.state.get(param, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key][rows] = 0.0
        return len(idx)
