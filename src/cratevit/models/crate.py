"""CRATE: the Coding RAte reduction TransformEr (Yu et al., NeurIPS 2023).

Every layer of CRATE is one step of an alternating optimiser of the sparse rate reduction objective. With
``Z^l`` the ``(n, d)`` tokens entering layer ``l``:

* Compression (multi-head subspace self-attention, one shared projection ``U_k`` per head, no separate Q/K/V)::

      Z^{l+1/2} = Z^l + MSSA(LN(Z^l))
      MSSA(X)   = [U_1 ... U_K] . [SSA_1(X); ...; SSA_K(X)] + b
      SSA_k(X)  = softmax((U_k^T X)^T (U_k^T X) / sqrt(p)) applied to U_k^T X

* Sparsification (one proximal-gradient / ISTA step on a non-negative sparse code with dictionary ``D``)::

      Z^{l+1} = ISTA(LN(Z^{l+1/2}))
      ISTA(x) = relu(x + eta * (x D - x D^T D) - eta * lambda)       (x is a row vector, eta = lambda = 0.1)

  The residual lives *inside* the ISTA step: its output is not added back to ``Z^{l+1/2}``.

The patch embedding is LayerNorm(patch) -> Linear -> LayerNorm, a learned class token and a learned positional
embedding; the head is LayerNorm -> Linear on the class token (or the mean token).

This file holds the fast formulation of that exact math; :mod:`cratevit.models.reference` keeps the literal
reference formulation the tests compare it with. It imports torch alone: loading, Hub and timm support live in
:mod:`cratevit.checkpoint` and :mod:`cratevit.interop` (which attaches ``save_pretrained`` / ``from_pretrained`` /
``push_to_hub`` to :class:`CRATE` when :mod:`cratevit` is imported).
"""

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ..errors import UserError

__all__ = [
    "CRATE",
    "ISTA",
    "MSSA",
    "CRATEBlock",
    "CRATEConfig",
    "CRATETrace",
    "ConvPatchEmbed",
    "LayerTrace",
    "PatchEmbed",
    "forward_flops",
    "geometry_cfg",
    "to_2tuple",
]

AttnImpl = Literal["auto", "sdpa", "math"]


def to_2tuple(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An int or a pair as ``(height, width)``; a one-line :class:`~cratevit.errors.UserError` for anything else."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise UserError(f"expected an int or a pair (height, width), got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


class PatchGrid:
    """The patch grid of a configuration with ``image_size``, ``patch_size`` and ``channels`` (every family's)."""

    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    channels: int

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size[0] * self.patch_size[1]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["patch_size"] = list(self.patch_size)
        return d


@dataclass
class CRATEConfig(PatchGrid):
    """Everything that defines a CRATE network; stored in every checkpoint so a file describes itself."""

    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    num_classes: int = 1000
    dim: int = 384
    depth: int = 12
    heads: int = 6
    dim_head: int = 64
    pool: Literal["cls", "mean"] = "cls"
    channels: int = 3
    dropout: float = 0.0
    emb_dropout: float = 0.0
    ista: float = 0.1  # ISTA step size eta
    lambd: float = 0.1  # sparsity penalty lambda
    head_hidden_dim: int | None = None  # two-stage head (LN -> Linear(dim, hidden) -> Linear(hidden, classes))
    dynamic_img_size: bool = False  # interpolate the positional embedding for other input sizes
    attn_impl: AttnImpl = "auto"
    # Stochastic depth on the MSSA residual branch, rising linearly to this rate at the last layer. NOT in the
    # paper (its recipes train without it); offered so that timm recipes (`train.py --drop-path 0.1`) run. The ISTA
    # step has no outer residual, so it is never skipped.
    drop_path_rate: float = 0.0
    patch_embed: Literal["linear", "conv"] = "linear"  # conv: a strided convolution, as CRATE-MAE's encoder
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.image_size = to_2tuple(self.image_size)
        self.patch_size = to_2tuple(self.patch_size)
        for what, size, patch in zip(("height", "width"), self.image_size, self.patch_size, strict=False):
            if patch <= 0 or size <= 0:
                raise UserError(
                    f"image_size and patch_size must be positive, got {self.image_size} / {self.patch_size}"
                )
            if size % patch:
                raise UserError(
                    f"image {what} {size} is not divisible by the patch {what} {patch}; "
                    f"choose an image_size that is a multiple of patch_size {self.patch_size}"
                )
        if self.pool not in ("cls", "mean"):
            raise UserError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if not 0.0 <= float(self.drop_path_rate) < 1.0:
            raise UserError(f"drop_path_rate must lie in [0, 1), got {self.drop_path_rate!r}")
        if self.patch_embed not in ("linear", "conv"):
            raise UserError(f"patch_embed must be 'linear' or 'conv', got {self.patch_embed!r}")
        if self.attn_impl not in ("auto", "sdpa", "math"):
            raise UserError(f"attn_impl must be 'auto', 'sdpa' or 'math', got {self.attn_impl!r}")
        for name in ("dim", "depth", "heads", "dim_head", "channels"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)!r}")

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head

    def sparse_code_flops(self, n: int, ista_matmuls: int = 2) -> int:
        """FLOPs of one layer's ISTA step on ``n`` tokens: 2 products here, 3 in the literal formulation."""
        return ista_matmuls * 2 * n * self.dim * self.dim

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CRATEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown CRATE config keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "CRATEConfig":
        return replace(self, **changes)


def check_images(
    x: Tensor, channels: int, image_size: tuple[int, int], patch_size: tuple[int, int], dynamic_img_size: bool
) -> tuple[int, int]:
    """Check an image batch against the model; returns its patch grid (rows, cols).

    Kept out of the traced path: ``torch.fx`` records it as one call (:func:`torch.fx.wrap` below) and TorchScript
    compiles it, so the checks still run in traced and scripted models.
    """
    if x.dim() != 4:
        raise UserError(
            "expected a batch of images of shape (batch, " + str(channels) + ", H, W), got " + str(list(x.shape))
        )
    if x.shape[1] != channels:
        raise UserError(
            "expected " + str(channels) + "-channel images, got " + str(x.shape[1]) + " channels (input shape "
            + str(list(x.shape)) + "); convert the images or build the model with channels=" + str(x.shape[1])
        )  # fmt: skip
    h, w = x.shape[2], x.shape[3]
    ph, pw = patch_size
    if h % ph != 0 or w % pw != 0:
        raise UserError(
            "image size " + str(h) + "x" + str(w) + " is not divisible by the patch size " + str(ph) + "x"
            + str(pw) + "; resize or crop the input"
        )  # fmt: skip
    if (h != image_size[0] or w != image_size[1]) and not dynamic_img_size:
        raise UserError(
            "expected " + str(image_size[0]) + "x" + str(image_size[1]) + " images, got " + str(h) + "x" + str(w)
            + "; resize the input, or set model.dynamic_img_size = True to interpolate the positional embedding"
        )  # fmt: skip
    return h // ph, w // pw


def resample_pos_embed(pos_embed: Tensor, grid: tuple[int, int], base_grid: tuple[int, int]) -> Tensor:
    """Positional embedding ``(1, 1 + n, dim)`` for another patch grid: bicubic interpolation of the patch part
    (as DINO); the class token's entry is kept. Returns ``pos_embed`` itself when the grid is unchanged."""
    if grid[0] == base_grid[0] and grid[1] == base_grid[1]:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, base_grid[0], base_grid[1], -1).permute(0, 3, 1, 2)  # 1 dim gh gw
    patch_pos = F.interpolate(patch_pos.float(), size=[grid[0], grid[1]], mode="bicubic", align_corners=False)
    patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    return torch.cat([cls_pos, patch_pos], dim=1)


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
torch.fx.wrap("check_images")
torch.fx.wrap("resample_pos_embed")
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

    def forward(self, x: Tensor) -> Tensor:
        return ista_step(x, self.dictionary, self.step_size, self.lambd)


class CRATEBlock(nn.Module):
    """``z_half = z + MSSA(LN1(z))``; ``z_next = ISTA(LN2(z_half))``.

    ``drop_path`` (stochastic depth on the MSSA branch, not in the paper) is the identity unless asked for.
    """

    def __init__(self, cfg: CRATEConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.mssa = MSSA(cfg.dim, cfg.heads, cfg.dim_head, cfg.dropout, cfg.attn_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.ista = ISTA(cfg.dim, cfg.ista, cfg.lambd)

    def forward(self, z: Tensor) -> Tensor:
        z_half = z + self.drop_path(self.mssa(self.norm1(z)))
        return self.ista(self.norm2(z_half))

    def trace(self, z: Tensor) -> tuple[Tensor, "LayerTrace"]:
        """The same step, returning every intermediate (explicit attention, so the matrix exists)."""
        proj = self.mssa.project(self.norm1(z))
        attn_out, attn = self.mssa.attend(proj)
        z_half = z + self.drop_path(self.mssa.proj_drop(self.mssa.out_proj(attn_out.transpose(1, 2).flatten(2))))
        z_next = self.ista(self.norm2(z_half))
        return z_next, LayerTrace(z_in=z, proj=proj, attn=attn, z_half=z_half, z_out=z_next)


@dataclass
class LayerTrace:
    """What one CRATE layer computed. Shapes: b images, n tokens (class token first), h heads."""

    z_in: Tensor  # Z^l, (b, n, dim)
    proj: Tensor  # U_k^T LN(Z^l) per head, (b, h, n, dim_head): the MSSA input in each subspace
    attn: Tensor  # softmax attention per head, (b, h, n, n)
    z_half: Tensor  # Z^{l+1/2} = Z^l + MSSA(LN(Z^l)), (b, n, dim)
    z_out: Tensor  # Z^{l+1} = ISTA(LN(Z^{l+1/2})), (b, n, dim)


@dataclass
class CRATETrace:
    """Result of :meth:`CRATE.forward_trace`."""

    embedding: Tensor  # Z^0: patch embedding + class token + positional embedding, (b, n, dim)
    layers: list[LayerTrace]
    features: Tensor  # output of the last layer (= forward_features), (b, n, dim)
    grid_size: tuple[int, int]  # patch grid (rows, cols) of this input


class CRATE(nn.Module):
    """The CRATE vision transformer. Accepts the original constructor arguments unchanged::

    CRATE(image_size=224, patch_size=16, num_classes=1000, dim=384, depth=12, heads=6, dropout=0.0,
          emb_dropout=0.0, dim_head=64, mlp_dim=384 * 4)

    ``mlp_dim`` is accepted and ignored: CRATE's ISTA block has no hidden width (its dictionary is ``dim x dim``),
    and the original code ignores it too. ``forward`` compiles with TorchScript and traces with ``torch.fx``: it
    reads plain attributes copied from the configuration (``in_chans``, ``img_size``, ``patch_size``,
    ``grid_size``, ``global_pool``), never the dataclass.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        num_classes: int = 1000,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        dim_head: int = 64,
        pool: Literal["cls", "mean"] = "cls",
        channels: int = 3,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        ista: float = 0.1,
        mlp_dim: int | None = None,
        *,
        config: CRATEConfig | None = None,
        **extra: Any,
    ) -> None:
        super().__init__()
        del mlp_dim  # the original constructor's hidden width: the ISTA block has none (see the class docstring)
        if config is None:
            config = CRATEConfig(
                image_size=image_size,
                patch_size=patch_size,
                num_classes=num_classes,
                dim=dim,
                depth=depth,
                heads=heads,
                dim_head=dim_head,
                pool=pool,
                channels=channels,
                dropout=dropout,
                emb_dropout=emb_dropout,
                ista=ista,
                **extra,
            )
        elif extra:
            raise TypeError(f"pass either config= or keyword arguments, not both (got {sorted(extra)})")
        cfg = self.config = config
        self.num_classes = cfg.num_classes
        self.num_features = cfg.dim  # width of the tokens / pooled features (timm contract)
        self.head_hidden_size = cfg.head_hidden_dim or cfg.dim  # width right before the classifier
        self.dynamic_img_size = cfg.dynamic_img_size
        self.grad_checkpointing = False
        self._copy_config_attributes()
        # timm's per-weight metadata: the geometry here; create_model / load_model / timm add the preset's
        # preprocessing (mean/std, crop, interpolation) from cratevit.presets.
        self.pretrained_cfg = self.default_cfg = geometry_cfg(cfg)
        self.feature_info = [
            {"module": f"blocks.{i}", "num_chs": cfg.dim, "reduction": cfg.patch_size[0]} for i in range(cfg.depth)
        ]  # timm's features_only metadata

        embed = PatchEmbed if cfg.patch_embed == "linear" else ConvPatchEmbed
        self.patch_embed = embed(cfg.patch_size, cfg.channels, cfg.dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches + 1, cfg.dim))
        self.pos_drop = nn.Dropout(cfg.emb_dropout)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # timm's linear rule
        self.blocks = nn.ModuleList(CRATEBlock(cfg, drop_path=rate) for rate in rates)
        self.fc_norm = nn.LayerNorm(cfg.dim)
        self.pre_logits = nn.Linear(cfg.dim, cfg.head_hidden_dim) if cfg.head_hidden_dim else nn.Identity()
        self.head = nn.Linear(self.head_hidden_size, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()

    def _copy_config_attributes(self) -> None:
        """Plain attributes that ``forward`` reads (TorchScript cannot read the dataclass); kept in step with
        ``self.config`` by every method that changes it."""
        cfg = self.config
        self.in_chans: int = cfg.channels
        self.img_size: tuple[int, int] = cfg.image_size
        self.patch_size: tuple[int, int] = cfg.patch_size
        self.grid_size: tuple[int, int] = cfg.grid_size
        self.global_pool: str = cfg.pool

    # ----------------------------------------------------------------------------------------------- embedding
    def _check_input(self, x: Tensor) -> tuple[int, int]:
        return check_images(x, self.in_chans, self.img_size, self.patch_size, self.dynamic_img_size)

    def interpolate_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """Positional embedding for another patch grid: bicubic interpolation of the patch part (as DINO)."""
        return resample_pos_embed(self.pos_embed, grid, self.grid_size)

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images (b, c, H, W) -> tokens Z^0 (b, 1 + n_patches, dim) and the patch grid."""
        grid = check_images(x, self.in_chans, self.img_size, self.patch_size, self.dynamic_img_size)
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + resample_pos_embed(self.pos_embed, grid, self.grid_size)
        return self.pos_drop(x), grid

    # ----------------------------------------------------------------------------------------------- forward
    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> tokens after the last layer, (b, 1 + n_patches, dim)."""
        z, _ = self.embed(x)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting() and self.training and torch.is_grad_enabled():
                z = torch.utils.checkpoint.checkpoint(block, z, use_reentrant=False)
            else:
                z = block(z)
        return z

    def pool(self, z: Tensor) -> Tensor:
        if self.global_pool == "mean":
            return z.mean(dim=1)
        return z[:, 0]

    def forward_head(self, z: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens -> logits (or, with ``pre_logits=True``, the normalised pooled features)."""
        x = self.pre_logits(self.fc_norm(self.pool(z)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_trace(self, x: Tensor, layers: list[int] | None = None) -> "CRATETrace":
        """Run the network and return every layer's intermediates: ``Z^l``, the per-head projections
        ``U_k^T LN(Z^l)``, the attention matrices, ``Z^{l+1/2}`` and ``Z^{l+1}`` (see :class:`LayerTrace`).

        ``layers`` selects which layers to record (all by default; negative indices count from the end);
        the forward pass still runs through every layer.
        """
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
        return CRATETrace(embedding=z0, layers=traces, features=z, grid_size=grid)

    def get_last_selfattention(self, x: Tensor, layer: int = -1) -> Tensor:
        """Attention matrices of one layer, (b, heads, n, n) (DINO's name for it): the last layer by default.

        ``layer`` is a 0-based block index (negative counts from the end), as in the CRATE emergence demo's
        ``get_last_selfattention(img, layer=5)``; note that the demo's DEFAULT is ``layer=5`` (the sixth block),
        ours is the last block, so pass ``layer=5`` to reproduce a demo notebook exactly.
        """
        depth = len(self.blocks)
        if not -depth <= layer < depth:
            raise UserError(f"layer={layer} is outside this {depth}-layer model; use 0..{depth - 1} or -{depth}..-1")
        return self.forward_trace(x, layers=[layer]).layers[0].attn

    # ----------------------------------------------------------------------------------------------- timm features
    def _take_indices(self, indices: int | list[int] | tuple[int, ...] | None) -> list[int]:
        """timm's layer selection: None -> every layer, n -> the last n, a list -> those (negative from the end)."""
        depth = len(self.blocks)
        if indices is None or isinstance(indices, int):
            n = depth if indices is None else indices
            if not 0 < n <= depth:
                raise UserError(f"indices={n} asks for the last {n} layers of a {depth}-layer model; use 1..{depth}")
            return list(range(depth - n, depth))
        if not indices or any(not -depth <= i < depth for i in indices):
            raise UserError(f"layer indices {list(indices)} must lie in -{depth}..{depth - 1}")
        return sorted({i % depth for i in indices})

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's feature API: the patch tokens of the selected layers' outputs ``Z^{l+1}``, as maps
        (b, dim, gh, gw) (``output_fmt="NCHW"``) or (b, n_patches, dim) (``"NLC"``); ``norm`` applies ``fc_norm``.
        Returns ``(final tokens, intermediates)``, or only the intermediates (timm's signature)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise UserError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = self._take_indices(indices)
        z, (gh, gw) = self.embed(x)
        blocks = self.blocks[: take[-1] + 1] if stop_early or intermediates_only else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            z = block(z)
            if i in take:
                y = (self.fc_norm(z) if norm else z)[:, 1:]  # patch tokens, (b, gh*gw, dim)
                intermediates.append(y.transpose(1, 2).reshape(y.shape[0], -1, gh, gw) if output_fmt == "NCHW" else y)
        return intermediates if intermediates_only else (z, intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the layers after the last selected one (and the head / final norm); returns the kept indices."""
        take = self._take_indices(indices)
        self.blocks = self.blocks[: take[-1] + 1]
        self.config = self.config.replace(depth=len(self.blocks))
        self._copy_config_attributes()
        self.feature_info = self.feature_info[: len(self.blocks)]
        if prune_head:
            self.pre_logits = nn.Identity()
            self.head_hidden_size = self.config.dim
            self.config = self.config.replace(head_hidden_dim=None)
            self.reset_classifier(0)
        if prune_norm:
            self.fc_norm = nn.Identity()
        return take

    # ----------------------------------------------------------------------------------------------- utilities
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` (0: no classifier)."""
        if global_pool is not None:
            if global_pool not in ("cls", "mean", "token", "avg"):
                raise UserError(f"global_pool must be 'cls' or 'mean', got {global_pool!r}")
            pool = {"token": "cls", "avg": "mean"}.get(global_pool, global_pool)
            self.config = self.config.replace(pool=pool)
        device = self.fc_norm.weight.device
        self.num_classes = num_classes
        self.config = self.config.replace(num_classes=num_classes)
        self._copy_config_attributes()
        self.head = nn.Linear(self.head_hidden_size, num_classes, device=device) if num_classes > 0 else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter grouping (layer-wise lr decay): the embedding, one group per layer, then the head."""
        blocks = r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^fc_norm|^pre_logits", (99999,))]
        return {"stem": r"^cls_token|^pos_embed|^patch_embed", "blocks": blocks}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"image_size={c.image_size}, patch_size={c.patch_size}, dim={c.dim}, depth={c.depth}, "
            f"heads={c.heads}x{c.dim_head}, num_classes={c.num_classes}, pool={c.pool!r}"
        )


def geometry_cfg(cfg: CRATEConfig) -> dict[str, Any]:
    """The part of timm's ``pretrained_cfg`` that the configuration alone determines."""
    return {
        "input_size": (int(cfg.channels), *cfg.image_size),
        "fixed_input_size": not cfg.dynamic_img_size,
        "num_classes": int(cfg.num_classes),
        "pool_size": None,
        # The first learned projection: CRATE's patches go through LayerNorm -> Linear (timm's in_chans adaptation
        # of pretrained weights is for Conv2d stems; for this Linear it re-initialises the layer); CRATE-alpha's
        # configuration names its convolutional stem.
        "first_conv": getattr(cfg, "first_conv", "patch_embed.proj"),
        "classifier": "head",
    }


def forward_flops(cfg: CRATEConfig, ista_matmuls: int = 2, image_size: tuple[int, int] | None = None) -> int:
    """Analytic forward FLOPs per image of the matrix products (2 FLOPs per multiply-add).

    ``ista_matmuls`` is 2 for this implementation and 3 for the literal reference formulation.
    """
    h, w = image_size or cfg.image_size
    n_patch = (h // cfg.patch_size[0]) * (w // cfg.patch_size[1])
    n = n_patch + 1
    flops = 2 * n_patch * cfg.patch_dim * cfg.dim  # patch projection
    per_layer = 2 * n * cfg.dim * cfg.inner_dim  # U^T x
    per_layer += 2 * 2 * cfg.heads * n * n * cfg.dim_head  # w w^T and attn @ w
    if not (cfg.heads == 1 and cfg.dim_head == cfg.dim):
        per_layer += 2 * n * cfg.inner_dim * cfg.dim  # output projection
    per_layer += cfg.sparse_code_flops(n, ista_matmuls)  # ISTA
    flops += cfg.depth * per_layer
    if cfg.head_hidden_dim:
        flops += 2 * cfg.dim * cfg.head_hidden_dim
    flops += 2 * (cfg.head_hidden_dim or cfg.dim) * max(cfg.num_classes, 0)
    return flops
