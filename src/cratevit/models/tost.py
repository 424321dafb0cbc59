"""ToST: the Token Statistics Transformer (Wu et al., "Token Statistics Transformer: Linear-Time Attention via
Variational Rate Reduction", ICLR 2025; official code RobinWu218/ToST, ``tost_vision/tost.py``).

ToST replaces self-attention by **Token Statistics Self-Attention** (TSSA), one gradient step on a variational
form of the coding rate. With ``w = U_k^T x`` the ``(n, p)`` projections of head ``k`` (``p = dim / heads``) and
``tau_k`` a learned temperature, TSSA computes, with no ``n x n`` matrix::

    w_hat[i, j] = w[i, j] / ||w[:, j]||                     (each coordinate normalised over the n tokens)
    Pi[k, i]    = softmax_k( tau_k * sum_j w_hat[i, j]^2 )  (soft membership of token i in head k; over HEADS)
    s_k[j]      = sum_i Pi[k, i] w[i, j]^2 / (sum_i Pi[k, i] + 1e-8)   (Pi-weighted second moment, per coordinate)
    out[i]      = -(Pi[k, i] * w[i]) / (1 + s_k)            (elementwise; heads concatenated, then Linear)

Time and memory are ``O(n p)`` per head: linear in the number of tokens.

The vision network (official ``VisionTransformer`` with ``attn_layer=AttentionTSSA``, the ``tost_cab_*`` models)::

    Z^0       = stem(images) + Fourier positional encoding          (no class token yet)
    Z^{l+1/2} = Z^l + gamma1 * TSSA(LN(Z^l))                         (l = 0 .. depth-1, LayerScale gamma = eta init)
    Z^{l+1}   = Z^{l+1/2} + gamma2 * MLP(LN(Z^{l+1/2}))              (GELU MLP, hidden width mlp_ratio * dim)
    then [cls; Z^L] -> 2 class-attention blocks (CaiT/XCiT) -> LN -> the class token -> Linear

* The **stem** is ``log2(patch)`` stride-2 3x3 convolutions without bias, each followed by BatchNorm (GELU between):
  widths ``dim/8, dim/4, dim/2, dim`` for patch 16, ``dim/4, dim/2, dim`` for patch 8. The official code uses
  ``nn.SyncBatchNorm`` directly; here it is plain ``nn.BatchNorm2d`` (same weights and buffers), which a DDP run
  converts with ``nn.SyncBatchNorm.convert_sync_batchnorm(model)``.
* The **positional encoding** is fixed Fourier features of the normalised (row, column) position (DETR's sine
  encoding, 32 frequencies per axis) mapped by a learned 1x1 convolution: it exists for any grid, so ToST takes
  any image size that is a multiple of the patch size.
* The **class token** enters only after the TSSA stack, in the class-attention blocks, where it alone attends to
  all tokens (``softmax(q_cls k^T / sqrt(p)) v``). Their literal update (XCiT's, kept exactly): the patch tokens
  leave block ``j`` as ``2 * LN2(x + gamma1 * LN1(x))`` (``tokens_norm=True``, every official preset); only the
  class token goes through the MLP.
* Every LayerNorm has ``eps = 1e-6``; Linear weights are truncated-normal (std 0.02), biases 0.

This file holds the fast formulation; :mod:`cratevit.models.reference_tost` keeps the literal one (in the official
module names) that the tests compare with. :class:`CausalTSSA` is the causal operator of the official language
model (``tost_lang/model_TSSA.py``). It imports torch alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .backbone import PatchGrid, to_2tuple
from .blocks import DropPath
from .contract import TimmContract
from .family import Card, Family
from .key_table import KeyTable
from .shapes import ShapeError, ShapeReading, class_count

__all__ = [
    "FAMILY",
    "TOST_PRESETS",
    "TSSA",
    "CausalTSSA",
    "ClassAttention",
    "ClassAttentionBlock",
    "ConvStem",
    "FourierPositionalEncoding",
    "ToST",
    "ToSTBlock",
    "ToSTConfig",
    "ToSTLayerTrace",
    "ToSTTrace",
    "TracedLayer",
    "TracedLayers",
    "causal_token_statistics_attention",
    "fourier_features",
    "from_official_keys",
    "to_official_keys",
    "token_statistics_attention",
    "tost_preset",
    "tssa_output",
]

NORM_EPS = 1e-6  # every LayerNorm of the official vision models
PI_EPS = 1e-8  # the official guard on the membership mass sum_i Pi[k, i]


@dataclass
class ToSTConfig(PatchGrid):
    """Everything that defines a ToST vision network (official ``VisionTransformer`` arguments in brackets)."""

    label = "ToST"  # the family's name in messages (a class attribute, not a field)

    image_size: tuple[int, int] = (224, 224)  # the training size; any multiple of patch_size runs
    patch_size: tuple[int, int] = (16, 16)  # square, a power of two: the stem's stride-2 convolutions
    num_classes: int = 1000
    dim: int = 384  # [embed_dim]
    depth: int = 12  # TSSA blocks
    heads: int = 8  # [num_heads]; head width p = dim / heads
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # bias of the TSSA projection U and of the class attention's q, k, v
    class_blocks: int = 2  # [cls_attn_layers]
    eta: float = 1.0  # LayerScale initial value (1.0 for the 12-layer presets, 1e-5 for the 24-layer ones)
    tokens_norm: bool = True  # class-attention blocks normalise every token (all official presets), not only cls
    use_pos: bool = True  # add the Fourier positional encoding
    pos_dim: int = 32  # Fourier frequencies per axis [PositionalEncodingFourier.hidden_dim]
    pool: Literal["cls", "mean"] = "cls"  # official: the class token
    channels: int = 3  # the official stem is fixed to 3 channels
    dropout: float = 0.0  # [drop_rate]: positional dropout, MLP and projection outputs
    attn_dropout: float = 0.0  # [attn_drop_rate]: on 1 / (1 + s) in TSSA and the class attention weights
    drop_path_rate: float = 0.0  # stochastic depth of the TSSA blocks: the SAME rate in every block (official)
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.image_size = to_2tuple(self.image_size)
        self.patch_size = to_2tuple(self.patch_size)
        p = self.patch_size[0]
        if self.patch_size[1] != p or p < 2 or p & (p - 1):
            raise UserError(
                f"ToST's convolutional stem needs a square power-of-two patch (8 or 16 officially), got "
                f"{self.patch_size}; choose patch_size=8 or 16"
            )
        for name in ("dim", "depth", "heads", "channels", "pos_dim"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.dim % self.heads:
            raise UserError(f"dim {self.dim} is not divisible by heads {self.heads}; choose heads dividing dim")
        if self.dim % (p // 2):
            raise UserError(f"dim {self.dim} must be divisible by patch/2 = {p // 2} (the stem's first width)")
        if self.pos_dim % 2:
            raise UserError(f"pos_dim must be even (sine/cosine pairs), got {self.pos_dim}")
        for what, size in zip(("height", "width"), self.image_size, strict=True):
            if size <= 0 or size % p:
                raise UserError(
                    f"image {what} {size} is not a multiple of the patch size {p}, which ToST's stride-2 stem "
                    f"requires; choose an image_size that is a multiple of {p}"
                )
        if self.pool not in ("cls", "mean"):
            raise UserError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if not 0.0 <= float(self.drop_path_rate) < 1.0:
            raise UserError(f"drop_path_rate must lie in [0, 1), got {self.drop_path_rate!r}")
        if self.class_blocks < 0:
            raise UserError(f"class_blocks must be >= 0, got {self.class_blocks}")

    @property
    def dim_head(self) -> int:
        return self.dim // self.heads

    @property
    def stem_widths(self) -> list[int]:
        """Output widths of the stem's stride-2 convolutions: ``dim / 2^(k-1), ..., dim / 2, dim`` for patch ``2^k``."""
        k = int(math.log2(self.patch_size[0]))
        return [self.dim // 2 ** (k - 1 - i) for i in range(k)]


# ----------------------------------------------------------------------------------------------- operators
def token_statistics_attention(w: Tensor, temperature: Tensor, dropout_p: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """TSSA on projections ``w`` laid out (b, n, h, p) (the Linear's output viewed per head, no transpose).

    Returns ``(out, pi, s)``: ``out`` (b, n, h, p) = ``-(Pi w) / (1 + s)``, the memberships ``pi`` (b, n, h)
    (softmax over heads) and the Pi-weighted second moments ``s`` (b, h, p). ``temperature`` is (h, 1).
    ``dropout_p`` drops entries of ``1 / (1 + s)`` (the official ``attn_drop``).
    """
    w2 = w * w  # b n h p, shared by the normalisation and the second moments
    # ||w[:, j]||^2 over the tokens; F.normalize clamps the norm at 1e-12, i.e. the square at 1e-24
    col = w2.sum(dim=1, keepdim=True).clamp_min(1e-24)  # b 1 h p
    logits = (w2 / col).sum(dim=-1) * temperature.view(1, 1, -1)  # b n h
    pi = torch.softmax(logits, dim=2)  # over heads
    mass = pi.sum(dim=1).unsqueeze(-1) + 1e-8  # b h 1 (PI_EPS; TorchScript reads no float globals)
    s = torch.einsum("bnh,bnhp->bhp", pi, w2) / mass  # b h p
    gain = 1.0 / (1.0 + s)
    if dropout_p > 0.0:
        gain = F.dropout(gain, p=dropout_p, training=True)
    out = -(w * pi.unsqueeze(-1)) * gain.unsqueeze(1)  # b n h p
    return out, pi, s


class _TSSAFunction(torch.autograd.Function):
    """:func:`token_statistics_attention`'s output with a hand-written backward that keeps only ``w``, ``Pi``, the
    energies and the ``(h, p)`` statistics: the autograd graph of the plain formulation stores about three more
    ``(n, dim)`` tensors per block. Gradients (derived from the equations, tested against autograd)::

        dPi_i  = -sum_j G_ij w_ij g_j + sum_j dA_j w_ij^2 + dm           (g = 1 / (1 + s), A = s m, m = sum Pi + eps)
        dg_j   = -sum_i G_ij w_ij Pi_i;   ds = -g^2 dg;   dA = ds / m;   dm = -sum_j ds_j s_j / m
        dlogit = Pi (dPi - sum_k Pi_k dPi_k)   (softmax over heads);   de = tau dlogit;   dtau = sum e dlogit
        dq_ij  = Pi_i dA_j + de_i / c_j - sum_u de_u q_uj / c_j^2      (q = w^2, c_j = sum_i q_ij, e_i = sum_j q_ij / c_j)
        dw     = -G Pi g + 2 w dq
    """

    @staticmethod
    def forward(ctx: Any, w: Tensor, temperature: Tensor) -> Tensor:
        tau = temperature.to(w.dtype).view(1, 1, -1)
        q = w * w  # b n h p
        c = q.sum(dim=1, keepdim=True).clamp_min(1e-24)  # b 1 h p
        e = (q / c).sum(dim=-1)  # b n h
        pi = torch.softmax(e * tau, dim=2)
        m = pi.sum(dim=1) + PI_EPS  # b h
        s = torch.einsum("bnh,bnhp->bhp", pi, q) / m.unsqueeze(-1)  # b h p
        out = -(w * pi.unsqueeze(-1)) * (1.0 / (1.0 + s)).unsqueeze(1)
        ctx.save_for_backward(w, temperature, pi, e, s, c)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        w, temperature, pi, e, s, c = ctx.saved_tensors
        tau = temperature.to(w.dtype).view(1, 1, -1)
        g = 1.0 / (1.0 + s)  # b h p
        m = pi.sum(dim=1) + PI_EPS  # b h
        q = w * w
        gw = grad * w
        dpi = -torch.einsum("bnhp,bhp->bnh", gw, g)
        ds = torch.einsum("bnhp,bnh->bhp", gw, pi) * g * g  # -g^2 * dg, dg = -sum_i G w Pi
        da = ds / m.unsqueeze(-1)
        dm = -(ds * s).sum(dim=-1) / m  # b h
        dpi = dpi + torch.einsum("bhp,bnhp->bnh", da, q) + dm.unsqueeze(1)
        dlogit = pi * (dpi - (pi * dpi).sum(dim=2, keepdim=True))
        dtau = (dlogit * e).sum(dim=(0, 1)).view_as(temperature).to(temperature.dtype)
        de = dlogit * tau  # b n h
        dc = -torch.einsum("bnh,bnhp->bhp", de, q).unsqueeze(1) / (c * c)  # b 1 h p
        dc = dc.masked_fill(c <= 1e-24, 0.0)  # the clamp passes no gradient
        dq = pi.unsqueeze(-1) * da.unsqueeze(1) + de.unsqueeze(-1) / c + dc
        dw = -(grad * pi.unsqueeze(-1)) * g.unsqueeze(1) + 2.0 * w * dq
        return dw, dtau


def tssa_output(w: Tensor, temperature: Tensor) -> Tensor:
    """``-(Pi w) / (1 + s)`` for ``w`` (b, n, h, p), with the memory-lean backward of :class:`_TSSAFunction`
    (TorchScript, which has no custom autograd functions, compiles the plain formulation instead)."""
    if torch.jit.is_scripting():
        return token_statistics_attention(w, temperature)[0]
    return _lean_tssa(w, temperature)


@torch.jit.ignore
def _lean_tssa(w: Tensor, temperature: Tensor) -> Tensor:
    return _TSSAFunction.apply(w, temperature)


def causal_token_statistics_attention(w: Tensor, temperature: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Causal TSSA (official ``CausalSelfAttention_TSSA``) on ``w`` (b, h, T, p): statistics of the prefix only.

    For position ``t``: ``a[t, j] = w[t, j]^2 / sum_{u<=t} w[u, j]^2 + bias[k, t]``, ``Pi[k, t] = softmax_k(tau_k
    sum_j a[t, j])``, ``s_t = sum_{u<=t} Pi[k, u] w[u]^2 / (sum_{u<=t} Pi[k, u] + 1e-8)`` and
    ``out[t] = -(Pi[k, t] w[t]) / (1 + s_t)``: cumulative sums, so ``O(T p)``. ``bias`` is (h, T', 1) with
    ``T' >= T``. Returns ``(out, pi)`` with ``pi`` (b, h, T).
    """
    t = w.shape[2]
    w2 = w * w
    a = w2 / torch.cumsum(w2, dim=2).clamp_min(1e-12) + bias[:, :t]
    pi = torch.softmax(a.sum(dim=-1) * temperature, dim=1)  # b h T, over heads
    s = torch.cumsum(w2 * pi.unsqueeze(-1), dim=2) / (torch.cumsum(pi, dim=-1) + PI_EPS).unsqueeze(-1)
    return -(w * pi.unsqueeze(-1)) / (1.0 + s), pi


class TSSA(nn.Module):
    """Token Statistics Self-Attention (official ``AttentionTSSA``): ``U`` (``subspace_proj``, one Linear for all
    heads, official ``qkv``), temperatures ``tau`` (h, 1) (official ``temp``), the output projection (``to_out.0``)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.heads = heads
        self.subspace_proj = nn.Linear(dim, dim, bias=qkv_bias)  # U = [U_1 ... U_K]^T
        self.temperature = nn.Parameter(torch.ones(heads, 1))  # tau
        self.out_proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def project(self, x: Tensor) -> Tensor:
        """``U_k^T x`` laid out (b, n, h, p)."""
        b, n, _ = x.shape
        return self.subspace_proj(x).view(b, n, self.heads, -1)

    def forward(self, x: Tensor) -> Tensor:
        w = self.project(x)
        # dropout on 1 / (1 + s), and TorchScript (no custom autograd Functions): the plain autograd formulation
        if torch.jit.is_scripting() or (self.training and self.attn_drop > 0.0):
            out = token_statistics_attention(w, self.temperature, self.attn_drop if self.training else 0.0)[0]
        else:
            out = self._lean(w)
        return self.proj_drop(self.out_proj(out.flatten(2)))

    @torch.jit.unused
    def _lean(self, w: Tensor) -> Tensor:
        return tssa_output(w, self.temperature)

    def trace(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(output, w (b, h, n, p), Pi (b, h, n), s (b, h, p))``."""
        w = self.project(x)
        out, pi, s = token_statistics_attention(w, self.temperature, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.out_proj(out.flatten(2))), w.transpose(1, 2), pi.transpose(1, 2), s


class CausalTSSA(nn.Module):
    """Causal TSSA for autoregressive sequences (official ``tost_lang/model_TSSA.py``), (b, T, dim) -> (b, T, dim).

    Official limitation, kept: the learned per-position bias of the normalised squares (``denom_bias``, official
    name, (heads, context, 1)) is sized to the training context, so sequences longer than ``context`` cannot run
    (the official code would fail on the slice); here they get one clear error.
    """

    def __init__(self, dim: int, heads: int, context: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise UserError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.context = heads, context
        self.subspace_proj = nn.Linear(dim, dim, bias=bias)  # official c_attn
        self.out_proj = nn.Linear(dim, dim, bias=bias)  # official c_proj
        self.temperature = nn.Parameter(torch.ones(heads, 1))  # official temp
        self.denom_bias = nn.Parameter(torch.zeros(heads, context, 1))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        if t > self.context:
            raise UserError(
                f"sequence of {t} tokens is longer than the {self.context}-token context this causal TSSA was built "
                f"for (its learned bias has one entry per position); split the sequence or rebuild with context>={t}"
            )
        w = self.subspace_proj(x).view(b, t, self.heads, -1).transpose(1, 2)  # b h T p
        out, _ = causal_token_statistics_attention(w, self.temperature, self.denom_bias)
        return self.drop(self.out_proj(out.transpose(1, 2).reshape(b, t, c)))


# ----------------------------------------------------------------------------------------------- layers
class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` with dropout after each (timm's ``Mlp``, the official MLP)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class ConvStem(nn.Module):
    """``log2(patch)`` stages of stride-2 3x3 convolution (no bias) + BatchNorm, GELU between: (b, c, H, W) ->
    (b, n, dim) and the grid. Stage ``i`` is ``stages.i.conv`` / ``stages.i.norm`` (official ``proj.{2i}.0/1``)."""

    def __init__(self, channels: int, widths: list[int]) -> None:
        super().__init__()
        stages, c_in = [], channels
        for c_out in widths:
            stage = nn.Module()
            stage.conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False)
            stage.norm = nn.BatchNorm2d(c_out)
            stages.append(stage)
            c_in = c_out
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        for i, stage in enumerate(self.stages):
            if i:
                x = F.gelu(x)
            x = stage.norm(stage.conv(x))
        gh, gw = x.shape[2], x.shape[3]
        return x.flatten(2).transpose(1, 2), (gh, gw)


class FourierPositionalEncoding(nn.Module):
    """DETR's sine encoding of the normalised position, projected by a learned 1x1 convolution (``proj``).

    For row ``r`` of ``gh`` (1-based) ``y = 2 pi r / (gh + 1e-6)``, frequencies ``f_k = T^(2 floor(k/2) / F)``
    (``T = 10000``, ``F`` = ``pos_dim``); features ``[sin(y/f_0), cos(y/f_1), sin(y/f_2), ...]`` for the rows,
    then the same for the columns, ``2F`` channels -> Linear to ``dim``. Returns (1, gh * gw, dim).
    """

    def __init__(self, pos_dim: int, dim: int, temperature: float = 10000.0) -> None:
        super().__init__()
        self.pos_dim, self.temperature = pos_dim, temperature
        self.proj = nn.Conv2d(2 * pos_dim, dim, kernel_size=1)

    def forward(self, gh: int, gw: int) -> Tensor:
        feats = fourier_features(gh, gw, self.pos_dim, self.temperature, self.proj.weight)
        return F.linear(feats, self.proj.weight.flatten(1), self.proj.bias).unsqueeze(0)


def _sin_cos(v: Tensor, freq: Tensor) -> Tensor:
    """(m,) positions -> (m, F): ``sin`` of the even, ``cos`` of the odd frequencies, interleaved."""
    a = v[:, None] / freq
    return torch.stack((a[:, 0::2].sin(), a[:, 1::2].cos()), dim=2).flatten(1)


def fourier_features(gh: int, gw: int, pos_dim: int, temperature: float, like: Tensor) -> Tensor:
    """The fixed sine/cosine features of a ``gh x gw`` grid, (gh * gw, 2 * pos_dim), rows first, computed in
    float32 (as the official code) and returned in ``like``'s dtype and device."""
    scale, eps = 2 * math.pi, 1e-6
    y = torch.arange(1, gh + 1, dtype=torch.float32, device=like.device) / (gh + eps) * scale
    x = torch.arange(1, gw + 1, dtype=torch.float32, device=like.device) / (gw + eps) * scale
    k = torch.arange(pos_dim, dtype=torch.float32, device=like.device)
    freq = torch.pow(temperature, 2 * torch.div(k, 2, rounding_mode="floor") / pos_dim)
    fy = _sin_cos(y, freq)[:, None, :].expand(gh, gw, pos_dim)
    fx = _sin_cos(x, freq)[None, :, :].expand(gh, gw, pos_dim)
    return torch.cat((fy, fx), dim=2).reshape(gh * gw, 2 * pos_dim).to(like.dtype)


class ToSTBlock(nn.Module):
    """``z_half = z + gamma_attn * TSSA(LN1(z))``; ``z_next = z_half + gamma_mlp * MLP(LN2(z_half))``."""

    def __init__(self, cfg: ToSTConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=NORM_EPS)
        self.tssa = TSSA(cfg.dim, cfg.heads, cfg.qkv_bias, cfg.attn_dropout, cfg.dropout)
        self.gamma_attn = nn.Parameter(torch.full((cfg.dim,), float(cfg.eta)))  # LayerScale, official gamma1
        self.norm2 = nn.LayerNorm(cfg.dim, eps=NORM_EPS)
        self.mlp = Mlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.dropout)
        self.gamma_mlp = nn.Parameter(torch.full((cfg.dim,), float(cfg.eta)))  # official gamma2
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, z: Tensor) -> Tensor:
        z = z + self.drop_path(self.gamma_attn * self.tssa(self.norm1(z)))
        return z + self.drop_path(self.gamma_mlp * self.mlp(self.norm2(z)))

    def project(self, z: Tensor) -> Tensor:
        """``U_k^T LN1(z)``: (b, n, dim) -> (b, heads, n, p) (the analysis' subspace coordinates)."""
        return self.tssa.project(self.norm1(z)).transpose(1, 2)

    def trace(self, z: Tensor) -> tuple[Tensor, ToSTLayerTrace]:
        out, w, pi, s = self.tssa.trace(self.norm1(z))
        z_half = z + self.drop_path(self.gamma_attn * out)
        z_next = z_half + self.drop_path(self.gamma_mlp * self.mlp(self.norm2(z_half)))
        return z_next, ToSTLayerTrace(z_in=z, proj=w, membership=pi, second_moment=s, z_half=z_half, z_out=z_next)


class ClassAttention(nn.Module):
    """CaiT's class attention: the class token alone queries every token, ``softmax(q_cls k^T / sqrt(p)) v``.

    Returns ``[proj(attended class token); x[:, 1:]]``: the patch tokens pass through unchanged (the official
    layer's output, which the block then adds to its input).
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.out_proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(attended class token (b, 1, dim) before the output projection, weights (b, h, n))."""
        b, n, c = x.shape
        weight, bias = self.qkv.weight, self.qkv.bias
        if bias is None:
            q, kv = F.linear(x[:, :1], weight[:c]), F.linear(x, weight[c:])
        else:
            q, kv = F.linear(x[:, :1], weight[:c], bias[:c]), F.linear(x, weight[c:], bias[c:])
        q = q.view(b, 1, self.heads, -1).transpose(1, 2)  # b h 1 p: the class token's query only
        k, v = kv.view(b, n, 2, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # b h n p each
        attn = torch.softmax((q @ k.transpose(-1, -2)) * self.scale, dim=-1)  # b h 1 n
        weights = F.dropout(attn, self.attn_drop, training=True) if self.training and self.attn_drop > 0 else attn
        return (weights @ v).transpose(1, 2).reshape(b, 1, c), attn.squeeze(2)

    def forward(self, x: Tensor) -> Tensor:
        cls, _ = self.attend(x)
        return torch.cat([self.proj_drop(self.out_proj(cls)), x[:, 1:]], dim=1)


class ClassAttentionBlock(nn.Module):
    """One class-attention block (official ``ClassAttentionBlock``, XCiT's), for ``x = [cls; patches]``::

    x1 = x + gamma_attn * [CA(LN1(x))_cls; LN1(x)_patches]
    x2 = LN2(x1)                       (tokens_norm; else only the class token is normalised)
    out = x2 + [gamma_mlp * MLP(x2_cls); x2_patches]     (so the patch tokens leave as 2 * x2_patches)
    """

    def __init__(self, cfg: ToSTConfig) -> None:
        super().__init__()
        self.tokens_norm = cfg.tokens_norm
        self.norm1 = nn.LayerNorm(cfg.dim, eps=NORM_EPS)
        self.attn = ClassAttention(cfg.dim, cfg.heads, cfg.qkv_bias, cfg.attn_dropout, cfg.dropout)
        self.gamma_attn = nn.Parameter(torch.full((cfg.dim,), float(cfg.eta)))
        self.norm2 = nn.LayerNorm(cfg.dim, eps=NORM_EPS)
        self.mlp = Mlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.dropout)
        self.gamma_mlp = nn.Parameter(torch.full((cfg.dim,), float(cfg.eta)))

    def _update(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = self.norm1(x)
        cls, attn = self.attn.attend(a)
        half = x + self.gamma_attn * torch.cat([self.attn.proj_drop(self.attn.out_proj(cls)), a[:, 1:]], dim=1)
        x = self.norm2(half) if self.tokens_norm else torch.cat([self.norm2(half[:, :1]), half[:, 1:]], dim=1)
        return x + torch.cat([self.gamma_mlp * self.mlp(x[:, :1]), x[:, 1:]], dim=1), attn, half

    def forward(self, x: Tensor) -> Tensor:
        return self._update(x)[0]

    def trace(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output, the class token's attention weights (b, h, n) over [cls; patches])."""
        out, attn, _ = self._update(x)
        return out, attn

    def project(self, x: Tensor) -> Tensor:
        """The keys of ``LN1(x)``: (b, n, dim) -> (b, heads, n, p) (the analysis' subspace coordinates)."""
        b, n, c = x.shape
        a = self.norm1(x)
        bias = None if self.attn.qkv.bias is None else self.attn.qkv.bias[c : 2 * c]
        return F.linear(a, self.attn.qkv.weight[c : 2 * c], bias).view(b, n, self.attn.heads, -1).transpose(1, 2)

    def trace_layer(self, x: Tensor) -> tuple[Tensor, TracedLayer]:
        """(output, the layer as the analysis reads it: :class:`TracedLayer` with the class token's row)."""
        out, attn, half = self._update(x)
        return out, TracedLayer(
            kind="class-attention",
            z_in=x,
            proj=self.project(x),
            attn=_row_as_matrix(attn),
            z_half=half,
            z_out=out,
        )


@dataclass
class ToSTLayerTrace:
    """What one TSSA block computed. b images, n patch tokens (no class token in the TSSA stack), h heads."""

    z_in: Tensor  # Z^l, (b, n, dim)
    proj: Tensor  # w = U_k^T LN(Z^l), (b, h, n, p)
    membership: Tensor  # Pi, (b, h, n): softmax over heads of each token's normalised energy
    second_moment: Tensor  # s_k, (b, h, p): the Pi-weighted second moments of w
    z_half: Tensor  # Z^{l+1/2}, (b, n, dim)
    z_out: Tensor  # Z^{l+1}, (b, n, dim)


@dataclass
class ToSTTrace:
    """Result of :meth:`ToST.forward_trace`."""

    embedding: Tensor  # Z^0 = stem + positional encoding, (b, n, dim)
    layers: list[ToSTLayerTrace]
    class_attention: list[Tensor]  # per class-attention block: the class token's weights (b, h, 1 + n)
    features: Tensor  # forward_features: LN of [cls; patches] after the class blocks, (b, 1 + n, dim)
    grid_size: tuple[int, int]


@dataclass
class TracedLayer:
    """One layer as the analysis reads every white-box family's (``z_in``, ``proj``, ``attn``, ``z_half``,
    ``z_out``, the class token first), for ToST's TSSA blocks and class-attention blocks alike.

    TSSA has no ``n x n`` attention. Its ``attn`` is the matrix of what it does: the class token's row holds each
    head's membership ``Pi[k, :]`` over the patch tokens, normalised to sum 1 (the class token is not in the TSSA
    stack: it waits, unchanged, and enters at the class blocks), and each patch token's row is the identity (its
    output reads only itself and the heads' global statistics ``s_k``). A class-attention block's ``attn`` has the
    class token's softmax attention as row 0 and the identity below (the patch tokens are only normalised)."""

    kind: str  # "tssa" or "class-attention"
    z_in: Tensor  # (b, 1 + n, dim): the class token first (for TSSA layers: the learned one, waiting)
    proj: Tensor  # (b, h, 1 + n, p): U_k^T LN1(z) (TSSA) or the keys of LN1(z) (class attention)
    attn: Tensor  # (b, h, 1 + n, 1 + n): see the class docstring
    z_half: Tensor  # (b, 1 + n, dim): after the attention step
    z_out: Tensor  # (b, 1 + n, dim): the block's output
    membership: Tensor | None = None  # TSSA: Pi (b, h, n), softmax over heads
    second_moment: Tensor | None = None  # TSSA: s_k (b, h, p)


@dataclass
class TracedLayers:
    """Result of :meth:`ToST.trace_layers`: the TSSA blocks, then the class-attention blocks (layer indices
    ``0 .. depth-1`` are ``blocks.*``, ``depth ..`` are ``class_blocks.*``)."""

    layers: list[TracedLayer]
    features: Tensor  # forward_features, (b, 1 + n, dim)
    grid_size: tuple[int, int]


def _row_as_matrix(row: Tensor) -> Tensor:
    """The class token's weights (b, h, 1 + n) -> (b, h, 1 + n, 1 + n): that row first, the identity below."""
    b, h, n = row.shape
    out = torch.eye(n, dtype=row.dtype, device=row.device).expand(b, h, n, n).clone()
    out[:, :, 0] = row
    return out


def _check_images(x: Tensor, channels: int, patch: int) -> tuple[int, int]:
    if x.dim() != 4:
        raise UserError(f"expected a batch of images of shape (batch, {channels}, H, W), got {list(x.shape)}")
    if x.shape[1] != channels:
        raise UserError(
            f"expected {channels}-channel images, got {x.shape[1]} channels (input shape {list(x.shape)}); "
            f"convert the images or build the model with channels={x.shape[1]}"
        )
    h, w = int(x.shape[2]), int(x.shape[3])
    if h % patch or w % patch:
        raise UserError(
            f"image size {h}x{w} is not a multiple of {patch}, which ToST's stride-2 convolutional stem requires "
            f"(patch {patch}); resize or crop the input to a multiple of {patch}"
        )
    return h // patch, w // patch


# Shape-dependent Python stays out of torch.fx graphs (timm's feature extraction): each is one opaque call.
torch.fx.wrap("_check_images")
torch.fx.wrap("fourier_features")
torch.fx.wrap("tssa_output")


class ToST(TimmContract, nn.Module):
    """The ToST vision classifier with timm's model contract (``forward_features`` / ``forward_head`` /
    ``forward_intermediates`` / ``reset_classifier`` ...). ``ToST(config=tost_preset("tost_cab_small_12_p16"))``,
    or keyword arguments of :class:`ToSTConfig`. ``forward_features`` returns every token after the class blocks
    and the final LayerNorm, (b, 1 + n, dim); ``forward_head`` pools the class token (or the mean patch token).
    """

    def __init__(self, *, config: ToSTConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = ToSTConfig(**kwargs)
        elif kwargs:
            raise TypeError(f"pass either config= or keyword arguments, not both (got {sorted(kwargs)})")
        cfg = self.config = config
        self.num_classes = cfg.num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = cfg.dim
        self._copy_config_attributes()
        self.grad_checkpointing = False
        self.pretrained_cfg = self.default_cfg = {
            "input_size": (cfg.channels, *cfg.image_size),
            "fixed_input_size": False,  # the Fourier encoding exists for every grid
            "num_classes": cfg.num_classes,
            "pool_size": None,
            "first_conv": "patch_embed.stages.0.conv",
            "classifier": "head",
        }
        self.feature_info = [
            {"module": f"blocks.{i}", "num_chs": cfg.dim, "reduction": self.patch} for i in range(cfg.depth)
        ]
        self.patch_embed = ConvStem(cfg.channels, cfg.stem_widths)
        self.pos_embed = FourierPositionalEncoding(cfg.pos_dim, cfg.dim)
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(ToSTBlock(cfg, cfg.drop_path_rate) for _ in range(cfg.depth))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.class_blocks = nn.ModuleList(ClassAttentionBlock(cfg) for _ in range(cfg.class_blocks))
        self.norm = nn.LayerNorm(cfg.dim, eps=NORM_EPS)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """The official initialisation: Linear weights truncated normal (std 0.02), biases 0, LayerNorm 1/0, the
        class token truncated normal; convolutions, BatchNorm, temperatures (1) and LayerScale (eta) as built."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------------- forward
    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images (b, c, H, W) -> tokens Z^0 (b, n, dim) (no class token) and the patch grid."""
        _check_images(x, self.in_chans, self.patch)
        z, grid = self.patch_embed(x)
        if self.use_pos:
            z = z + self.pos_embed(grid[0], grid[1])
        return self.pos_drop(z), grid

    def _classify_tokens(self, z: Tensor) -> Tensor:
        """TSSA output (b, n, dim) -> [cls; patches] through the class blocks and the final norm."""
        x = torch.cat([self.cls_token.expand(z.shape[0], -1, -1).to(z.dtype), z], dim=1)
        for block in self.class_blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, x: Tensor) -> Tensor:
        z, _ = self.embed(x)
        return self._classify_tokens(self.forward_blocks(z))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, 1:].mean(dim=1) if self.global_pool == "mean" else x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_trace(self, x: Tensor, layers: list[int] | None = None) -> ToSTTrace:
        """Every TSSA block's intermediates (``Z^l``, ``w``, the memberships ``Pi``, the second moments, ``Z^{l+1/2}``,
        ``Z^{l+1}``) and each class-attention block's weights. ``layers`` (0-based block indices, negative from the
        end) selects which TSSA blocks to record; the class-attention maps are always recorded."""
        depth = len(self.blocks)
        keep = set(range(depth)) if layers is None else {i % depth for i in layers}
        z0, grid = self.embed(x)
        z, traces = z0, []
        for i, block in enumerate(self.blocks):
            if i in keep:
                z, t = block.trace(z)
                traces.append(t)
            else:
                z = block(z)
        h = torch.cat([self.cls_token.expand(z.shape[0], -1, -1).to(z.dtype), z], dim=1)
        maps = []
        for block in self.class_blocks:
            h, attn = block.trace(h)
            maps.append(attn)
        return ToSTTrace(embedding=z0, layers=traces, class_attention=maps, features=self.norm(h), grid_size=grid)

    def trace_layers(self, x: Tensor, layers: list[int] | None = None) -> TracedLayers:
        """Every layer as the analysis reads it (:class:`TracedLayer`): the TSSA blocks (indices ``0 ..
        depth-1``), then the class-attention blocks (``depth .. depth + class_blocks - 1``). ``layers`` selects
        indices over that sequence (negative from the end: ``-1`` is the last class-attention block)."""
        total = len(self.blocks) + len(self.class_blocks)
        if layers is not None and any(not -total <= i < total for i in layers):
            raise UserError(f"layer indices {list(layers)} must lie in -{total}..{total - 1} ({total} layers)")
        keep = set(range(total)) if layers is None else {i % total for i in layers}
        z, grid = self.embed(x)
        cls = self.cls_token.expand(z.shape[0], -1, -1).to(z.dtype)
        out: list[TracedLayer] = []
        for i, block in enumerate(self.blocks):
            if i not in keep:
                z = block(z)
                continue
            z_next, t = block.trace(z)
            pi = t.membership / t.membership.sum(dim=-1, keepdim=True).clamp_min(1e-12)  # b h n, sums to 1
            row = torch.cat([pi.new_zeros(*pi.shape[:2], 1), pi], dim=-1)
            proj = torch.cat([block.project(cls), t.proj], dim=2)
            out.append(
                TracedLayer(
                    kind="tssa",
                    z_in=torch.cat([cls, z], dim=1),
                    proj=proj,
                    attn=_row_as_matrix(row),
                    z_half=torch.cat([cls, t.z_half], dim=1),
                    z_out=torch.cat([cls, z_next], dim=1),
                    membership=t.membership,
                    second_moment=t.second_moment,
                )
            )
            z = z_next
        h = torch.cat([cls, z], dim=1)
        for j, block in enumerate(self.class_blocks):
            if len(self.blocks) + j in keep:
                h, t = block.trace_layer(h)
                out.append(t)
            else:
                h = block(h)
        return TracedLayers(layers=out, features=self.norm(h), grid_size=grid)

    # ----------------------------------------------------------------------------------------------- timm contract
    def _copy_config_attributes(self) -> None:
        """Plain attributes that ``forward`` reads (TorchScript cannot read the dataclass), from ``self.config``."""
        cfg = self.config
        self.global_pool: str = cfg.pool
        self.patch: int = cfg.patch_size[0]
        self.in_chans: int = cfg.channels
        self.use_pos: bool = cfg.use_pos

    def _patch_tokens(self, z: Tensor, norm: bool) -> Tensor:
        """A TSSA block's output (b, n, dim): the patch tokens (the class token joins in the class blocks)."""
        return self.norm(z) if norm else z

    def _final_tokens(self, z: Tensor) -> Tensor:
        return self._classify_tokens(z)

    def _prune_head(self) -> None:
        self.class_blocks = nn.ModuleList()
        self.config = self.config.replace(class_blocks=0)

    def _prune_norm(self) -> None:
        self.norm = nn.Identity()

    def no_weight_decay(self) -> set[str]:
        """The class token. The official top-level set names only tensors ToST lacks besides it (``pos_embed``,
        ``dist_token``), and timm's optimizer factory reads only the top level, so the official recipe decays the
        (h, 1) temperatures; the 1-d LayerScale, norm and bias tensors are exempt by timm's ``ndim <= 1`` rule."""
        return {"cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups: the stem, one group per TSSA block, then the class blocks and the norm."""
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed",
            "blocks": r"^blocks\.(\d+)",
            "class_blocks": [(r"^class_blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"image_size={c.image_size}, patch_size={c.patch_size}, dim={c.dim}, depth={c.depth}+{c.class_blocks} "
            f"class blocks, heads={c.heads}x{c.dim_head}, num_classes={c.num_classes}"
        )


# ----------------------------------------------------------------------------------------------- presets
def _official(dim: int, depth: int, heads: int, patch: int) -> dict[str, Any]:
    return {"dim": dim, "depth": depth, "heads": heads, "patch_size": patch, "eta": 1.0 if depth == 12 else 1e-5}


# The official registered constructors (tost_vision/tost.py): 224 px, 1000 classes, MLP ratio 4, qkv bias,
# 2 class-attention blocks with tokens_norm; LayerScale 1.0 at depth 12, 1e-5 at depth 24. The official README's
# ToST-M command names ``tost_cab_medium_12_p16``, which its code does not register.
TOST_PRESETS: dict[str, dict[str, Any]] = {
    **{
        f"tost_cab_{size}_{depth}_p{patch}": _official(dim, depth, heads, patch)
        for size, (dim, heads) in {"tiny": (192, 4), "small": (384, 8)}.items()
        for depth in (12, 24)
        for patch in (16, 8)
    },
    **{
        f"tost_cab_{size}_24_p{patch}": _official(dim, 24, heads, patch)
        for size, (dim, heads) in {"medium": (512, 8), "large": (768, 16)}.items()
        for patch in (16, 8)
    },
    # The built-in data: digits (32 px, patch 8, 16 tokens, like crate_digits) and shapes (32 px, patch 4, 64
    # tokens, like crate_nano, the shapes recipe's CRATE).
    "tost_digits": {"image_size": 32, "patch_size": 8, "dim": 96, "depth": 6, "heads": 3, "num_classes": 10},
    "tost_shapes": {"image_size": 32, "patch_size": 4, "dim": 96, "depth": 6, "heads": 3, "num_classes": 10},
    "tost_debug": {"image_size": 32, "patch_size": 8, "dim": 32, "depth": 2, "heads": 2, "num_classes": 10},
}
"""The official ToST constructors by name (``tost_cab_{tiny,small}_{12,24}_p{16,8}``, ``tost_cab_{medium,large}_24_p{16,8}``) and the digits/shapes-scale configurations: :class:`ToSTConfig` fields."""


def tost_preset(name: str, **changes: Any) -> ToSTConfig:
    """The :class:`ToSTConfig` of a preset of :data:`TOST_PRESETS`, with optional changes."""
    if name not in TOST_PRESETS:
        raise UserError(f"unknown ToST preset {name!r}; known: {', '.join(TOST_PRESETS)}")
    return ToSTConfig(**{**TOST_PRESETS[name], **changes, "name": name})


# ----------------------------------------------------------------------------------------------- official keys
def from_official_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An official ``tost_cab_*`` state_dict (keys optionally prefixed ``module.``) -> our key layout (by
    :data:`TOST_KEYS`; a key the table does not name is kept as it is)."""
    rename = TOST_KEYS.renamer(to_ours=True, two_stage=False)
    return {(rename(k := key.removeprefix("module.")) or k): v for key, v in state.items()}


def to_official_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state_dict -> the official key layout (the inverse of :func:`from_official_keys`)."""
    rename = TOST_KEYS.renamer(to_ours=False, two_stage=False)
    return {(rename(k) or k): v for k, v in state.items()}


# torch.fx writes a traced graph's signature from the annotations, which this file's ``from __future__ import
# annotations`` leaves as strings ("Tensor") that TorchScript cannot resolve: give the traced entry points the types.
for _method in (ToST.forward, ToST.forward_features):
    _method.__annotations__ = {"x": Tensor, "return": Tensor}


# ---------------------------------------------------------------------------------------------- the family record
def read_shapes(state: Mapping[str, Tensor], heads: int | None = None) -> ShapeReading:
    """The :class:`ToSTConfig` of a state dict in our key layout, read off its tensor shapes (``heads`` is not
    needed: the temperatures are (heads, 1)). The image size is the official 224 (any multiple of the patch runs;
    a file's recorded ``input_size`` replaces it: the record's ``file_args``)."""
    del heads
    required = ("cls_token", "blocks.0.tssa.temperature", "blocks.0.mlp.fc1.weight", "pos_embed.proj.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise ShapeError(
            "tensor {0} is missing, so the ToST architecture cannot be read from the shapes; the file is truncated "
            "or not a ToST checkpoint",
            missing[0],
        )
    dim = state["cls_token"].shape[-1]
    config = ToSTConfig(
        dim=dim,
        depth=1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))),
        heads=state["blocks.0.tssa.temperature"].shape[0],
        patch_size=2 ** len({m.group(1) for k in state if (m := re.match(r"patch_embed\.stages\.(\d+)\.conv", k))}),
        class_blocks=len({m.group(1) for k in state if (m := re.match(r"class_blocks\.(\d+)\.", k))}),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        qkv_bias="blocks.0.tssa.subspace_proj.bias" in state,
        pos_dim=state["pos_embed.proj.weight"].shape[1] // 2,
        channels=state["patch_embed.stages.0.conv.weight"].shape[1],
        num_classes=class_count(state),
    )
    return ShapeReading(config)


def tost_forward_flops(cfg: ToSTConfig) -> int:
    """Analytic forward FLOPs per image (2 per multiply-add of every matrix product and convolution; TSSA's own
    statistics are ``O(n dim)`` elementwise work and not counted). With ``n`` patch tokens and width ``d``: the
    stem's 3x3 convolutions, the positional projection ``2 n (2 pos_dim) d``, per TSSA block ``4 n d^2`` (U and
    the output projection) plus the MLP ``4 n d (r d)``, per class block the keys and values of all ``1 + n``
    tokens ``4 (1 + n) d^2``, the class token's query, attention, projection and MLP, and the head."""
    h, w = cfg.image_size
    flops, c_in = 0, cfg.channels
    for c_out in cfg.stem_widths:
        h, w = (h + 1) // 2, (w + 1) // 2
        flops += 2 * 9 * c_in * c_out * h * w
        c_in = c_out
    n, d, hidden = h * w, cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    flops += 2 * n * 2 * cfg.pos_dim * d
    flops += cfg.depth * (4 * n * d * d + 4 * n * d * hidden)
    per_class_block = 4 * (1 + n) * d * d + 2 * d * d + 4 * (1 + n) * d + 2 * d * d + 4 * d * hidden
    return flops + cfg.class_blocks * per_class_block + 2 * d * max(cfg.num_classes, 0)


def _sync_batchnorm(model: nn.Module, device_type: str) -> nn.Module:
    """The stem's BatchNorm as SyncBatchNorm (the official code's), before DistributedDataParallel wraps it. PyTorch
    synchronises BatchNorm only on accelerators: CPU processes (gloo) keep per-process statistics."""
    if device_type == "cpu":
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def tost_geometry(cfg: ToSTConfig) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` geometry: any multiple of the patch runs (the Fourier encoding has no table)."""
    return {
        "input_size": (int(cfg.channels), *cfg.image_size),
        "fixed_input_size": False,
        "num_classes": int(cfg.num_classes),
        "pool_size": None,
        "first_conv": "patch_embed.stages.0.conv",
        "classifier": "head" if cfg.num_classes > 0 else None,
    }


# ToST as its official code names it (tost_vision/tost.py; DeiT/XCiT-style main.py saves ``model``): the stem is a
# Sequential of (conv, BatchNorm) pairs with GELUs between, so stage s is ``proj.{2s}`` (up to patch 64 here); the
# TSSA layer is ``attn`` (``qkv`` = U, ``temp`` = tau, ``to_out.0``), LayerScale ``gamma1``/``gamma2``; the
# class-attention blocks are ``cls_attn_blocks`` with ``attn.proj`` as their output projection.
TOST_KEYS = KeyTable(
    body=(
        ("cls_token", "cls_token"),
        *(
            pair
            for s in range(6)
            for pair in (
                (f"patch_embed.proj.{2 * s}.0.weight", f"patch_embed.stages.{s}.conv.weight"),
                (f"patch_embed.proj.{2 * s}.1.{{b}}", f"patch_embed.stages.{s}.norm.{{b}}"),
            )
        ),
        ("pos_embeder.token_projection.{p}", "pos_embed.proj.{p}"),
        ("blocks.{i}.norm1.{p}", "blocks.{i}.norm1.{p}"),
        ("blocks.{i}.attn.qkv.{p}", "blocks.{i}.tssa.subspace_proj.{p}"),
        ("blocks.{i}.attn.temp", "blocks.{i}.tssa.temperature"),
        ("blocks.{i}.attn.to_out.0.{p}", "blocks.{i}.tssa.out_proj.{p}"),
        ("blocks.{i}.gamma1", "blocks.{i}.gamma_attn"),
        ("blocks.{i}.norm2.{p}", "blocks.{i}.norm2.{p}"),
        ("blocks.{i}.mlp.fc1.{p}", "blocks.{i}.mlp.fc1.{p}"),
        ("blocks.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.fc2.{p}"),
        ("blocks.{i}.gamma2", "blocks.{i}.gamma_mlp"),
        ("cls_attn_blocks.{i}.norm1.{p}", "class_blocks.{i}.norm1.{p}"),
        ("cls_attn_blocks.{i}.attn.qkv.{p}", "class_blocks.{i}.attn.qkv.{p}"),
        ("cls_attn_blocks.{i}.attn.proj.{p}", "class_blocks.{i}.attn.out_proj.{p}"),
        ("cls_attn_blocks.{i}.gamma1", "class_blocks.{i}.gamma_attn"),
        ("cls_attn_blocks.{i}.norm2.{p}", "class_blocks.{i}.norm2.{p}"),
        ("cls_attn_blocks.{i}.mlp.fc1.{p}", "class_blocks.{i}.mlp.fc1.{p}"),
        ("cls_attn_blocks.{i}.mlp.fc2.{p}", "class_blocks.{i}.mlp.fc2.{p}"),
        ("cls_attn_blocks.{i}.gamma2", "class_blocks.{i}.gamma_mlp"),
        ("norm.{p}", "norm.{p}"),
        ("head.{p}", "head.{p}"),
    ),
    reference_markers=("cls_attn_blocks.", "pos_embeder."),
)
"""ToST's key table: the official code's names (``cls_attn_blocks``, ``attn.temp``, ``pos_embeder``)."""


FAMILY = Family(
    name="tost",
    model_cls=ToST,
    config_cls=ToSTConfig,
    description="ToST: linear-time Token Statistics Self-Attention via variational rate reduction (Wu et al., "
    "ICLR 2025)",
    trace="trace_layers",
    paper={
        "license": "mit",  # the repository's LICENSE; tost_vision/ also ships XCiT's Apache-2.0 LICENSE.txt
        "paper_name": "Token Statistics Transformer: Linear-Time Attention via Variational Rate Reduction",
        "paper_ids": "arXiv:2412.17810",
        "origin_url": "https://github.com/RobinWu218/ToST",
    },
    card=Card(
        title="a ToST white-box vision transformer",
        paper_url="https://arxiv.org/abs/2412.17810",
        blurb="ToST, the Token Statistics Transformer: its attention (TSSA) is one gradient step on a variational "
        "form of the coding rate, rescaling each projected token by its head's second-moment statistics, so time "
        "and memory grow linearly with the number of tokens; class-attention blocks read out the class token.",
        license="mit",
        tags=("image-classification", "vision", "white-box", "tost"),
        loader="ToST",
    ),
    code_kind=lambda cfg: None,  # TSSA + a GELU MLP: no ISTA step, so no sparse code (no atoms or interventions)
    pretrained_cfg=tost_geometry,
    timm_kwargs={
        "in_chans": "channels",
        "img_size": "image_size",
        "drop_rate": "dropout",
        "proj_drop_rate": "dropout",
        "attn_drop_rate": "attn_dropout",
        "global_pool": "pool",
    },
    shape_reader=read_shapes,
    file_args={"input_size": "image_size"},  # DeiT/XCiT's main.py records the training size
    key_table=TOST_KEYS,
    forward_flops=tost_forward_flops,
    ddp_prepare=_sync_batchnorm,
    trace_blocks=lambda model: [*model.blocks, *model.class_blocks],
    layer_label=lambda model, i: (
        f"blocks.{i}, TSSA: each head's membership Pi over the tokens"
        if i < len(model.blocks)
        else f"class_blocks.{i - len(model.blocks)}, the class token's attention"
    ),
)
"""ToST's family record (registered by :mod:`cratevit.registry`)."""
