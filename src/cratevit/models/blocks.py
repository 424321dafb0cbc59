"""The blocks every white-box family is built from, each one step of an optimiser written as a module.

With ``Z^l`` the ``(n, d)`` tokens entering layer ``l`` (rows are tokens) and ``LN`` a LayerNorm:

* attention (the compression half), chosen by the configuration's ``attention``:

  - :class:`MSSA` (``"mssa"``): multi-head subspace self-attention, CRATE's compression step. One projection
    ``U_k`` per head serves as query, key and value: ``SSA_k(X) = softmax((U_k^T X)^T (U_k^T X) / sqrt(p)) U_k^T X``;
  - :class:`MHSA` (``"mhsa"``): standard multi-head self-attention (separate ``W_q``, ``W_k``, ``W_v``), the
    ViT's (timm's ``Attention``: keys ``qkv`` and ``proj``)::

      Z^{l+1/2} = Z^l + DropPath(attention(LN(Z^l)))

* the second half, chosen by ``feedforward``:

  - :class:`ISTA` (``"ista"``): CRATE's one ISTA step, NO outer residual
    ``Z^{l+1} = relu(x + eta (x D - x D^T D) - eta lambda)``, ``x = LN(Z^{l+1/2})``;
  - :class:`OvercompleteISTA` (``"overcomplete"``): CRATE-alpha's two ISTA steps on an overcomplete ``d x 4d``
    dictionary ``D`` decoded by a separate ``D_hat`` and added back: ``Z^{l+1} = Z^{l+1/2} + A_2 D_hat^T``;
  - :class:`MLP` (``"mlp"``): the ViT's two-layer GELU perceptron with a residual,
    ``Z^{l+1} = Z^{l+1/2} + DropPath(MLP(LN(Z^{l+1/2})))``;
  - ``"none"``: an attention-only layer, ``Z^{l+1} = Z^{l+1/2}``.

:class:`WhiteBoxBlock` composes one attention and one second half; its ``forward`` is the fast path and its
``trace`` (one for every composition) returns every intermediate as a :class:`LayerTrace`. Children are named by
what they compute (``mssa``/``attn``, ``ista``/``mlp``), so a state dict reads ``blocks.3.mssa.subspace_proj``.
This file imports torch alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ISTA",
    "MHSA",
    "MLP",
    "MSSA",
    "AttnImpl",
    "ConvPatchEmbed",
    "DropPath",
    "LayerTrace",
    "OvercompleteISTA",
    "PatchEmbed",
    "WhiteBoxBlock",
    "explicit_attention",
    "ista_step",
    "subspace_attention",
    "use_fused_attention",
]

AttnImpl = Literal["auto", "sdpa", "math"]
Attention = Literal["mssa", "mhsa"]
FeedForward = Literal["ista", "overcomplete", "mlp", "none"]


def explicit_attention(w: Tensor, scale: float, dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """``softmax(w w^T * scale) w`` per head for ``w`` (b, h, n, d); returns (output, attention matrix).

    ``dropout_p`` drops attention weights for the output (0 in evaluation); the returned matrix is undropped.
    """
    b, h, n, d = w.shape
    w3 = w.reshape(b * h, n, d)  # one contiguous copy, shared by both products
    empty = w3.new_empty(1, 1, 1)
    dots = torch.baddbmm(empty, w3, w3.transpose(1, 2), beta=0.0, alpha=scale)  # (w w^T) * scale, fused
    attn = torch.softmax(dots, dim=-1).view(b, h, n, n)
    weights = F.dropout(attn, p=dropout_p, training=True) if dropout_p > 0.0 else attn
    out = torch.bmm(weights.view(b * h, n, n), w3).view(b, h, n, d)
    return out, attn


def use_fused_attention(w: Tensor, impl: str) -> bool:
    """Whether ``attn_impl=impl`` runs the fused kernel on ``w``. ``"auto"``: measured with benchmarks/cratebench.py, on CPU
    the fused kernel wins in float32 but loses to the explicit softmax in bfloat16/float16; on GPUs the fused
    (flash / memory-efficient) kernels win."""
    if impl != "auto":
        return impl == "sdpa"
    return w.device.type != "cpu" or w.dtype == torch.float32


def subspace_attention(w: Tensor, scale: float, dropout_p: float, impl: str) -> Tensor:
    """The MSSA attention output for ``w = U_k^T x`` (b, h, n, d): fused kernel or explicit softmax."""
    if use_fused_attention(w, impl):
        return F.scaled_dot_product_attention(w, w, w, dropout_p=dropout_p, scale=scale)
    out, _ = explicit_attention(w, scale, dropout_p)
    return out


def ista_step(x: Tensor, d: Tensor, eta: float, lambd: float) -> Tensor:
    """``relu(x + eta * (x - x D^T) D - eta * lambda)`` over the last axis of ``x`` (see :class:`ISTA`)."""
    x2 = x.reshape(-1, x.shape[-1])  # (b n) dim, a view of the contiguous LayerNorm output
    # The sums ride in the products (addmm); the signs and eta scale the small dim x dim matrix, not the
    # activations, so the backward pass has no extra elementwise products either.
    residual = torch.addmm(x2, x2, -d.t())  # x - x D^T
    if residual.dtype == x2.dtype:  # noqa: SIM108 (the two branches explain themselves)
        out = torch.addmm(x2, residual, eta * d)  # x + eta (x - x D^T) D
    else:  # autocast: products in low precision, the sum kept in x's precision (float32 residual stream)
        out = torch.add(x2, residual @ d, alpha=eta)
    return F.relu(out.sub_(eta * lambd), inplace=True).view(x.shape)


# Shape checks and shape-dependent branches stay out of torch.fx graphs (timm's create_feature_extractor,
# torch.fx.symbolic_trace): each is recorded as one opaque call, evaluated when the graph runs.

torch.fx.wrap("subspace_attention")
torch.fx.wrap("ista_step")  # branches on the dtype (autocast)


class DropPath(nn.Module):
    """Stochastic depth for a residual branch of token tensors (b, n, dim): in training, each sample's branch is
    zeroed with probability ``p`` and the kept ones scaled by ``1 / (1 - p)``; the identity in evaluation."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ConvPatchEmbed(nn.Module):
    """Patches by a strided convolution with bias (= a linear map of each flattened patch), (b, c, H, W) -> (b, n, dim).
    CRATE-alpha's and CRATE-MAE's patch embedding (``patch_embed="conv"``: a CRATE classifier from an MAE encoder)."""

    def __init__(self, patch_size: tuple[int, int], channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # b (rows cols) dim


class PatchEmbed(nn.Module):
    """Non-overlapping patches flattened in (p1, p2, c) order -> LayerNorm -> Linear -> LayerNorm."""

    def __init__(self, patch_size: tuple[int, int], channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        patch_dim = channels * patch_size[0] * patch_size[1]
        self.norm_in = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        p1, p2 = self.patch_size
        x = x.reshape(b, c, h // p1, p1, w // p2, p2)  # b c gh p1 gw p2
        x = x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p1) * (w // p2), p1 * p2 * c)  # b n (p1 p2 c)
        return self.norm_out(self.proj(self.norm_in(x)))


class MSSA(nn.Module):
    """Multi-head subspace self-attention: ``U_k^T x`` serves as query, key and value of head k."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        dropout: float = 0.0,
        attn_impl: AttnImpl = "auto",
        out_bias: bool = True,  # CRATE-alpha's output projection has no bias
    ) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.attn_impl = attn_impl
        self.subspace_proj = nn.Linear(dim, heads * dim_head, bias=False)  # U = [U_1 ... U_K]^T
        project_out = not (heads == 1 and dim_head == dim)
        self.out_proj = nn.Linear(heads * dim_head, dim, bias=out_bias) if project_out else nn.Identity()
        self.attn_drop = nn.Dropout(dropout)
        self.proj_drop = nn.Dropout(dropout)

    def project(self, x: Tensor) -> Tensor:
        """Per-head subspace coordinates ``U_k^T x``: (b, n, dim) -> (b, heads, n, dim_head)."""
        b, n, _ = x.shape
        return self.subspace_proj(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def _use_sdpa(self, w: Tensor) -> bool:
        return use_fused_attention(w, self.attn_impl)

    def attend(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Explicit attention: returns (output, attention matrix), both per head."""
        return explicit_attention(w, self.scale, self.attn_drop.p if self.training else 0.0)

    def trace(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The same step with explicit attention: (output (b, n, dim), ``U_k^T x`` (b, h, n, d), attention
        (b, h, n, n))."""
        w = self.project(x)
        out, attn = self.attend(w)
        return self.proj_drop(self.out_proj(out.transpose(1, 2).flatten(2))), w, attn

    def forward(self, x: Tensor) -> Tensor:
        w = self.project(x)  # b h n d
        out = subspace_attention(w, self.scale, self.attn_drop.p if self.training else 0.0, self.attn_impl)
        out = out.transpose(1, 2).flatten(2)  # b n (h d)
        return self.proj_drop(self.out_proj(out))


class ISTA(nn.Module):
    """One ISTA step ``relu(x + eta * (x D - x D^T D) - eta * lambda)`` with two matrix products:
    ``x D - x D^T D = (x - x D^T) D``."""

    def __init__(self, dim: int, step_size: float = 0.1, lambd: float = 0.1) -> None:
        super().__init__()
        self.dictionary = nn.Parameter(torch.empty(dim, dim))  # D
        self.step_size = step_size  # eta
        self.lambd = lambd  # lambda
        nn.init.kaiming_uniform_(self.dictionary)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """One ISTA step on the normalised tokens ``x``. ``residual`` (the stream ``Z^{l+1/2}``) is accepted so
        that every sparse-coding step has one signature, and unused: CRATE's step has no outer residual."""
        return ista_step(x, self.dictionary, self.step_size, self.lambd)

    def sparse_code(self, x: Tensor) -> Tensor:
        """The sparse code of ``x``: the step's output itself (non-negative, in the ``dim x dim`` dictionary)."""
        return ista_step(x, self.dictionary, self.step_size, self.lambd)

    def decode(self, code: Tensor, residual: Tensor) -> Tensor:
        """The layer output from its code: the code itself (no decoder, no outer residual)."""
        return code


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


class MHSA(nn.Module):
    """Standard multi-head self-attention (the ViT's): ``softmax(Q_k K_k^T / sqrt(p)) V_k`` per head with
    ``[Q; K; V] = W_qkv x``, then the output projection. Keys as timm's ``Attention`` (``qkv``, ``proj``)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0, attn_impl: AttnImpl = "auto") -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, 3 * heads * dim_head)
        self.proj = nn.Linear(heads * dim_head, dim)
        self.attn_drop = nn.Dropout(dropout)
        self.proj_drop = nn.Dropout(dropout)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values per head, each (b, heads, n, dim_head)."""
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)  # 3 b h n d
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv_heads(x)
        out = qkv_attention(q, k, v, self.scale, self.attn_drop.p if self.training else 0.0, self.attn_impl)
        return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))

    def trace(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(output (b, n, dim), the keys per head (b, h, n, d), attention (b, h, n, n)): the same protocol as
        :meth:`MSSA.trace`; the keys play the part of MSSA's ``U_k^T x`` (timm ViTs' ``key`` facet)."""
        q, k, v = self.qkv_heads(x)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        p = self.attn_drop.p if self.training else 0.0
        out = (F.dropout(attn, p=p, training=True) if p > 0.0 else attn) @ v
        return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2))), k, attn


def qkv_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float, impl: str) -> Tensor:
    """``softmax(q k^T * scale) v`` per head, (b, h, n, d): the fused kernel or the explicit softmax
    (:func:`use_fused_attention`); torch.fx records it as one call (it branches on the device and dtype)."""
    if use_fused_attention(q, impl):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    attn = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
    return (F.dropout(attn, p=dropout_p, training=True) if dropout_p > 0.0 else attn) @ v


torch.fx.wrap("qkv_attention")


class MLP(nn.Module):
    """The ViT's feed-forward half: ``fc2(GELU(fc1(x)))`` with a hidden width ``hidden`` (keys as timm's ``Mlp``)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


@dataclass
class LayerTrace:
    """What one layer computed. Shapes: b images, n tokens (class token first), h heads."""

    z_in: Tensor  # Z^l, (b, n, dim)
    proj: Tensor  # the attention's per-head input: U_k^T LN(Z^l) (MSSA) or the keys (MHSA), (b, h, n, dim_head)
    attn: Tensor  # softmax attention per head, (b, h, n, n)
    z_half: Tensor  # Z^{l+1/2} = Z^l + attention(LN(Z^l)), (b, n, dim)
    z_out: Tensor  # Z^{l+1}, (b, n, dim)
    # The sparse code when it is not the layer's output (CRATE-alpha's A_2, (b, n, code_dim)); None where the
    # output is the code (CRATE's ISTA) or where there is no code (an MLP or no second half).
    code: Tensor | None = None


class WhiteBoxBlock(nn.Module):
    """One layer: an attention step with a residual, then a second half (module docstring)::

        z_half = z + DropPath(attention(LN1(z)))
        z_next = ISTA(LN2(z_half))                          feedforward="ista"   (no outer residual)
               = z_half + A_2(LN2(z_half)) D_hat^T          feedforward="overcomplete"
               = z_half + DropPath(MLP(LN2(z_half)))        feedforward="mlp"
               = z_half                                     feedforward="none"

    The children exist only where used (``mssa`` or ``attn``; ``norm2`` and ``ista`` or ``mlp``); ``forward`` asks
    which with ``hasattr``, which TorchScript and torch.fx resolve when they compile or trace.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        attention: Attention = "mssa",
        feedforward: FeedForward = "ista",
        *,
        dropout: float = 0.0,
        attn_impl: AttnImpl = "auto",
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
        out_bias: bool = True,
        step_size: float = 0.1,
        lambd: float = 0.1,
        overcomplete: int = 4,
        mlp_hidden: int = 0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        if attention == "mssa":
            self.mssa = MSSA(dim, heads, dim_head, dropout, attn_impl, out_bias=out_bias)
        elif attention == "mhsa":
            self.attn = MHSA(dim, heads, dim_head, dropout, attn_impl)
        else:
            raise ValueError(f"attention must be 'mssa' or 'mhsa', got {attention!r}")
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if feedforward != "none":
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        if feedforward == "ista":
            self.ista = ISTA(dim, step_size, lambd)
        elif feedforward == "overcomplete":
            self.ista = OvercompleteISTA(dim, overcomplete, step_size, lambd)
        elif feedforward == "mlp":
            self.mlp = MLP(dim, mlp_hidden, dropout)
        elif feedforward != "none":
            raise ValueError(f"feedforward must be 'ista', 'overcomplete', 'mlp' or 'none', got {feedforward!r}")

    def project(self, z: Tensor) -> Tensor:
        """The attention's per-head coordinates of the tokens ``z``, (b, n, dim) -> (b, heads, n, dim_head): MSSA's
        ``U_k^T LN1(z)``, or MHSA's keys (what :class:`LayerTrace` records as ``proj``)."""
        x = self.norm1(z)
        if hasattr(self, "mssa"):
            return self.mssa.project(x)
        return self.attn.qkv_heads(x)[1]

    def attend(self, x: Tensor) -> Tensor:
        if hasattr(self, "mssa"):
            return self.mssa(x)
        return self.attn(x)

    def forward(self, z: Tensor) -> Tensor:
        z_half = z + self.drop_path(self.attend(self.norm1(z)))
        if hasattr(self, "ista"):
            return self.ista(self.norm2(z_half), z_half)
        if hasattr(self, "mlp"):
            return z_half + self.drop_path(self.mlp(self.norm2(z_half)))
        return z_half

    def trace(self, z: Tensor, code_edit: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, LayerTrace]:
        """The same step, returning every intermediate (explicit attention, so the matrix exists).

        ``code_edit`` (edited sparse code -> code) is applied to the sparse code before it is decoded: the hook
        through which an intervention edits a code inside the layer. A layer without ISTA has no code to edit.
        """
        x = self.norm1(z)
        out, proj, attn = self.mssa.trace(x) if hasattr(self, "mssa") else self.attn.trace(x)
        z_half = z + self.drop_path(out)
        code = None
        if hasattr(self, "ista"):
            code = self.ista.sparse_code(self.norm2(z_half))
            if code_edit is not None:
                code = code_edit(code)
            z_out = self.ista.decode(code, z_half)
            if isinstance(self.ista, ISTA):
                code = None  # CRATE's code is the layer's output itself (z_out)
        else:
            if code_edit is not None:
                raise ValueError("this layer has no sparse code to edit (no ISTA step)")
            z_out = z_half + self.drop_path(self.mlp(self.norm2(z_half))) if hasattr(self, "mlp") else z_half
        return z_out, LayerTrace(z_in=z, proj=proj, attn=attn, z_half=z_half, z_out=z_out, code=code)
