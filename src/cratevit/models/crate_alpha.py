"""CRATE-alpha: the scaled white-box transformer (Yang et al., "Scaling White-Box Transformers for Vision", 2024).

CRATE-alpha keeps CRATE's compression step and replaces its sparsification step by two steps of ISTA on an
overcomplete dictionary, decoded by a second, separate dictionary and added back to the residual stream. With
``Z^l`` the ``(n, d)`` tokens entering layer ``l`` (rows are tokens), ``LN`` a LayerNorm of eps 1e-6 and
``D``, ``D_hat`` two ``d x 4d`` dictionaries:

* Compression (MSSA as in CRATE, but its output projection has no bias)::

      Z^{l+1/2} = Z^l + MSSA(LN(Z^l))

* Sparse coding (two ISTA steps on ``min_A  1/2 ||X - A D^T||^2 + lambda ||A||_1,  A >= 0``, from ``A_0 = 0``)::

      X       = LN(Z^{l+1/2})
      A_1     = relu(eta * X D - eta * lambda)
      A_2     = relu(A_1 - eta * (A_1 D^T - X) D - eta * lambda)
      Z^{l+1} = Z^{l+1/2} + A_2 D_hat^T                       (decoupled decoder, residual)

  with ``eta = lambda = 0.1``.

The patch embedding is a strided convolution with bias (no LayerNorm), then a learned class token and a learned
positional embedding; the head is LayerNorm (eps 1e-5) -> Linear on the class token.

The fast path of :class:`OvercompleteISTA` uses the four matrix products the math needs and nothing more
(``X D``, ``A_1 D^T``, ``(A_1 D^T) D``, ``A_2 D_hat^T``; each ``n x d x 4d``); it expands the second step as
``A_2 = relu(A_1 + (eta X D - eta lambda) - eta (A_1 D^T) D)``, so the first product, already shifted, serves both
steps, ``X`` is not read again, and the scalings ride in the products (``alpha`` of ``addmm``). Over the wide
``(n, 4d)`` activations it makes three elementwise passes (``relu``, one add, ``relu``) where the literal
formulation makes seven. ``cratevit.models.reference_alpha`` holds the literal formulation the tests compare with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .crate import CRATE, MSSA, ConvPatchEmbed, CRATEConfig, CRATETrace, LayerTrace, forward_flops, geometry_cfg

__all__ = [
    "AlphaLayerTrace",
    "CRATEAlpha",
    "CRATEAlphaBlock",
    "CRATEAlphaConfig",
    "ConvPatchEmbed",
    "OvercompleteISTA",
    "alpha_forward_flops",
]


@dataclass
class CRATEAlphaConfig(CRATEConfig):
    """A CRATE-alpha network. ``ista`` is the step size eta; the defaults are CRATE-alpha-B/16."""

    dim: int = 768
    heads: int = 12
    overcomplete: int = 4  # dictionary width / dim
    norm_eps: float = 1e-6  # the block LayerNorms (the head's LayerNorm keeps torch's 1e-5)

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.overcomplete) <= 0:
            raise UserError(f"overcomplete must be a positive integer, got {self.overcomplete!r}")

    @property
    def first_conv(self) -> str:
        """The convolutional stem (timm's ``pretrained_cfg["first_conv"]``)."""
        return "patch_embed.proj"

    @property
    def code_dim(self) -> int:
        """Width of the sparse code (number of dictionary atoms)."""
        return self.overcomplete * self.dim

    def sparse_code_flops(self, n: int, ista_matmuls: int = 2) -> int:
        """X D, A_1 D^T, (A_1 D^T) D and A_2 D_hat^T, each (n, d) x (d, 4d): the fast path and the literal
        formulation make the same four products, so ``ista_matmuls`` (a CRATE notion) does not change them."""
        return 4 * 2 * n * self.dim * self.code_dim


class OvercompleteISTA(nn.Module):
    """Two ISTA steps on the overcomplete dictionary ``D`` and the decoding ``Z + A_2 D_hat^T`` (module docstring).

    Both dictionaries are stored ``(dim, code_dim)``, as the official release stores them.
    """

    def __init__(self, dim: int, overcomplete: int = 4, step_size: float = 0.1, lambd: float = 0.1) -> None:
        super().__init__()
        self.dictionary = nn.Parameter(torch.empty(dim, overcomplete * dim))  # D
        self.decoder = nn.Parameter(torch.empty(dim, overcomplete * dim))  # D_hat
        self.step_size = step_size  # eta
        self.lambd = lambd  # lambda
        nn.init.kaiming_uniform_(self.dictionary)
        nn.init.kaiming_uniform_(self.decoder)

    def sparse_code(self, x: Tensor) -> Tensor:
        """``A_2`` for the normalised tokens ``x`` (b, n, dim) -> (b, n, code_dim), non-negative."""
        d, eta = self.dictionary, self.step_size
        x2 = x.reshape(-1, x.shape[-1])  # (b n) dim
        shift = torch.full((), -eta * self.lambd, dtype=x2.dtype, device=x2.device)
        y = torch.addmm(shift, x2, d, alpha=eta)  # eta X D - eta lambda                 product 1
        a1 = F.relu(y)  # A_1
        y = y.add_(a1)  # A_1 + eta X D - eta lambda  (relu saved its output, not y)
        e = a1 @ d.t().to(a1.dtype)  # A_1 D^T                                            product 2
        y = y.addmm_(e, d.to(e.dtype), alpha=-eta)  # - eta (A_1 D^T) D                 product 3
        return F.relu(y, inplace=True).view(x.shape[0], x.shape[1], -1)  # A_2, (b, n, code_dim)

    def decode(self, code: Tensor, residual: Tensor) -> Tensor:
        """``residual + code D_hat^T`` (product 4); under autocast the sum stays in the residual's precision."""
        return decode_code(code, residual, self.decoder)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.decode(self.sparse_code(x), residual)


def decode_code(code: Tensor, residual: Tensor, decoder: Tensor) -> Tensor:
    """``residual + code D_hat^T`` over the last axis; branches on the dtype (autocast), so torch.fx records it as
    one call (:func:`torch.fx.wrap` below)."""
    c2, r2 = code.reshape(-1, code.shape[-1]), residual.reshape(-1, residual.shape[-1])
    if c2.dtype == r2.dtype:
        return torch.addmm(r2, c2, decoder.t()).view(residual.shape)
    return (r2 + c2 @ decoder.t()).view(residual.shape)


torch.fx.wrap("decode_code")


class CRATEAlphaBlock(nn.Module):
    """``z_half = z + MSSA(LN1(z))``; ``z_next = z_half + A_2(LN2(z_half)) D_hat^T``."""

    def __init__(self, cfg: CRATEAlphaConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mssa = MSSA(cfg.dim, cfg.heads, cfg.dim_head, cfg.dropout, cfg.attn_impl, out_bias=False)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.ista = OvercompleteISTA(cfg.dim, cfg.overcomplete, cfg.ista, cfg.lambd)

    def forward(self, z: Tensor) -> Tensor:
        z_half = z + self.mssa(self.norm1(z))
        return self.ista(self.norm2(z_half), z_half)

    def trace(self, z: Tensor) -> tuple[Tensor, AlphaLayerTrace]:
        """The same step, returning every intermediate (explicit attention, so the matrix exists)."""
        proj = self.mssa.project(self.norm1(z))
        attn_out, attn = self.mssa.attend(proj)
        z_half = z + self.mssa.proj_drop(self.mssa.out_proj(attn_out.transpose(1, 2).flatten(2)))
        code = self.ista.sparse_code(self.norm2(z_half))
        z_next = self.ista.decode(code, z_half)
        return z_next, AlphaLayerTrace(z_in=z, proj=proj, attn=attn, z_half=z_half, z_out=z_next, code=code)


@dataclass
class AlphaLayerTrace(LayerTrace):
    """What one CRATE-alpha layer computed: CRATE's fields plus the sparse code."""

    code: Tensor  # A_2, the sparse code of LN(Z^{l+1/2}) in the dictionary D, (b, n, code_dim), non-negative


class CRATEAlpha(CRATE):
    """The CRATE-alpha vision transformer. ``CRATEAlpha(config=CRATEAlphaConfig(...))`` or keyword arguments::

        CRATEAlpha(image_size=224, patch_size=16, num_classes=1000, dim=768, depth=12, heads=12, dim_head=64)

    It shares CRATE's embedding, pooling, tracing and timm methods (they read only the attributes set here) and
    builds its own modules.
    """

    def __init__(self, *, config: CRATEAlphaConfig | None = None, **kwargs: Any) -> None:
        nn.Module.__init__(self)  # CRATE.__init__ builds CRATE's modules; the methods are what is shared
        if config is None:
            config = CRATEAlphaConfig(**kwargs)
        elif kwargs:
            raise TypeError(f"pass either config= or keyword arguments, not both (got {sorted(kwargs)})")
        if not isinstance(config, CRATEAlphaConfig):
            raise UserError(f"CRATEAlpha needs a CRATEAlphaConfig, got {type(config).__name__}")
        cfg = self.config = config
        self.num_classes = cfg.num_classes
        self.num_features = cfg.dim
        self.head_hidden_size = cfg.head_hidden_dim or cfg.dim
        self.dynamic_img_size = cfg.dynamic_img_size
        self.grad_checkpointing = False
        self._copy_config_attributes()  # the plain attributes CRATE's forward reads (TorchScript, torch.fx)
        self.pretrained_cfg = self.default_cfg = geometry_cfg(cfg)
        self.feature_info = [
            {"module": f"blocks.{i}", "num_chs": cfg.dim, "reduction": cfg.patch_size[0]} for i in range(cfg.depth)
        ]

        self.patch_embed = ConvPatchEmbed(cfg.patch_size, cfg.channels, cfg.dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches + 1, cfg.dim))
        self.pos_drop = nn.Dropout(cfg.emb_dropout)
        self.blocks = nn.ModuleList(CRATEAlphaBlock(cfg) for _ in range(cfg.depth))
        self.fc_norm = nn.LayerNorm(cfg.dim)
        self.pre_logits = nn.Linear(cfg.dim, cfg.head_hidden_dim) if cfg.head_hidden_dim else nn.Identity()
        self.head = nn.Linear(self.head_hidden_size, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()

    def forward_trace(self, x: Tensor, layers: list[int] | None = None) -> CRATETrace:
        """Every layer's intermediates (see :class:`AlphaLayerTrace`): ``Z^l``, ``U_k^T LN(Z^l)``, the attention,
        ``Z^{l+1/2}``, ``Z^{l+1}`` and the sparse code ``A_2``."""
        return super().forward_trace(x, layers)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dictionary={self.config.dim}x{self.config.code_dim}"


def alpha_forward_flops(cfg: CRATEAlphaConfig, image_size: tuple[int, int] | None = None) -> int:
    """Analytic forward FLOPs per image (:func:`forward_flops`, whose ISTA term is this config's four products)."""
    return forward_flops(cfg, image_size=image_size)
