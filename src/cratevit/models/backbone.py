"""The white-box backbone: one embedding, one loop over blocks, one trace loop, pooling, head and timm's model
contract, shared by every classifier family (as timm's ``VisionTransformer(block_fn=...)``).

A family gives its configuration (a :class:`BackboneConfig` with the fields of its block) and the block to build
(:meth:`BackboneConfig.make_block`); the backbone does the rest::

    Z^0     = [cls; PatchEmbed(x)] + E_pos                    (b, 1 + n_patches, dim)
    Z^{l+1} = block_l(Z^l),  l = 0 .. depth-1                  (blocks.l: a WhiteBoxBlock)
    logits  = head(pre_logits(LN(pool(Z^L))))                  (pool: the class token or the mean token)

``forward`` compiles with TorchScript and traces with ``torch.fx``: it reads plain attributes copied from the
configuration (``in_chans``, ``img_size``, ``patch_size``, ``grid_size``, ``global_pool``), never the dataclass.
This file imports torch alone.
"""

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .blocks import AttnImpl, ConvPatchEmbed, LayerTrace, PatchEmbed
from .contract import TimmContract

__all__ = [
    "BackboneConfig",
    "PatchGrid",
    "WhiteBoxBackbone",
    "WhiteBoxTrace",
    "check_images",
    "forward_flops",
    "geometry_cfg",
    "resample_pos_embed",
    "to_2tuple",
    "trace_blocks",
]


def to_2tuple(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An int or a pair as ``(height, width)``; a one-line :class:`~cratevit.errors.UserError` for anything else."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise UserError(f"expected an int or a pair (height, width), got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


class PatchGrid:
    """The patch grid of a configuration with ``image_size``, ``patch_size`` and ``channels`` (every family's),
    and the dict round trip every configuration shares (``label``: the family's name in messages)."""

    label = "model"

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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """The configuration of a stored dict; an unknown key is one line naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown {cls.label} config keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` (validated again by the dataclass' ``__post_init__``)."""
        return replace(self, **changes)


@dataclass
class BackboneConfig(PatchGrid):
    """The fields every white-box classifier honours; a family's configuration adds those of its block."""

    label = "backbone"  # the family's name in messages (a class attribute, not a field)

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
    head_hidden_dim: int | None = None  # two-stage head (LN -> Linear(dim, hidden) -> Linear(hidden, classes))
    dynamic_img_size: bool = False  # interpolate the positional embedding for other input sizes
    attn_impl: AttnImpl = "auto"
    # Stochastic depth on the residual branches, rising linearly to this rate at the last layer. NOT in the
    # papers (their recipes train without it); offered so that timm recipes (`train.py --drop-path 0.1`) run.
    # CRATE's ISTA step has no outer residual, so it is never skipped.
    drop_path_rate: float = 0.0
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
        if self.attn_impl not in ("auto", "sdpa", "math"):
            raise UserError(f"attn_impl must be 'auto', 'sdpa' or 'math', got {self.attn_impl!r}")
        for name in ("dim", "depth", "heads", "dim_head", "channels"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)!r}")

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head

    # ---- what the backbone builds and counts; a family's configuration overrides these
    @property
    def patch_embed_kind(self) -> str:
        """``"linear"`` (LayerNorm -> Linear -> LayerNorm, CRATE's) or ``"conv"`` (a strided convolution)."""
        return "linear"

    @property
    def first_conv(self) -> str:
        """timm's ``pretrained_cfg["first_conv"]``: the first learned projection."""
        return "patch_embed.proj"

    def make_block(self, drop_path: float) -> nn.Module:
        """One layer of this family (``drop_path``: its stochastic-depth rate)."""
        raise NotImplementedError(f"{type(self).__name__} does not say which block to build")

    def attention_flops(self, n: int) -> int:
        """FLOPs of one layer's attention on ``n`` tokens: MSSA's ``U^T x``, ``w w^T``, ``attn w``, output map."""
        flops = 2 * n * self.dim * self.inner_dim + 2 * 2 * self.heads * n * n * self.dim_head
        if not (self.heads == 1 and self.dim_head == self.dim):
            flops += 2 * n * self.inner_dim * self.dim  # output projection
        return flops

    def sparse_code_flops(self, n: int, ista_matmuls: int = 2) -> int:
        """FLOPs of one layer's second half on ``n`` tokens."""
        raise NotImplementedError(f"{type(self).__name__} does not count its second half")


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


# Shape checks and shape-dependent branches stay out of torch.fx graphs (timm's create_feature_extractor,
# torch.fx.symbolic_trace): each is recorded as one opaque call, evaluated when the graph runs.
torch.fx.wrap("check_images")
torch.fx.wrap("resample_pos_embed")


def trace_blocks(blocks: nn.ModuleList, z: Tensor, layers: list[int] | None) -> tuple[Tensor, list[LayerTrace]]:
    """Run ``z`` through ``blocks``, tracing the selected layers (all when None; negative indices count from the
    end) with ``block.trace`` and running the others plainly; returns the output and the traces in layer order."""
    keep = set(range(len(blocks))) if layers is None else {i % len(blocks) for i in layers}
    traces = []
    for i, block in enumerate(blocks):
        if i in keep:
            z, t = block.trace(z)
            traces.append(t)
        else:
            z = block(z)
    return z, traces


@dataclass
class WhiteBoxTrace:
    """Result of :meth:`WhiteBoxBackbone.forward_trace`."""

    embedding: Tensor  # Z^0: patch embedding + class token + positional embedding, (b, n, dim)
    layers: list[LayerTrace]
    features: Tensor  # output of the last layer after the final token norm (= forward_features), (b, n, dim)
    grid_size: tuple[int, int]  # patch grid (rows, cols) of this input


class WhiteBoxBackbone(TimmContract, nn.Module):
    """Embedding, ``config.depth`` blocks from ``config.make_block``, pooling and a linear head, with timm's model
    contract (``forward_features``, ``forward_head``; ``forward_intermediates``, ``reset_classifier``, ... from
    :class:`~.contract.TimmContract`).

    Two final norms, as timm's ViT: ``norm`` over every token at the end of ``forward_features`` (the identity in
    the classifiers, CRATE-MAE's encoder LayerNorm) and ``fc_norm`` on the pooled token (the classifiers' LayerNorm,
    the identity in CRATE-MAE). A masked autoencoder (a subclass with a ``mask_token``) passes ``embed`` a mask.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
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

        embed = PatchEmbed if cfg.patch_embed_kind == "linear" else ConvPatchEmbed
        self.patch_embed = embed(cfg.patch_size, cfg.channels, cfg.dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches + 1, cfg.dim))
        self.pos_drop = nn.Dropout(cfg.emb_dropout)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # timm's linear rule
        self.blocks = nn.ModuleList(cfg.make_block(rate) for rate in rates)
        self.norm: nn.Module = nn.Identity()  # final norm over every token (an autoencoder's encoder has one)
        self.fc_norm: nn.Module = nn.LayerNorm(cfg.dim)
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
    def interpolate_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """Positional embedding for another patch grid: bicubic interpolation of the patch part (as DINO)."""
        return resample_pos_embed(self.pos_embed, grid, self.grid_size)

    def embed(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """Images (b, c, H, W) -> tokens Z^0 (b, 1 + n_patches, dim) and the patch grid. ``mask`` (b, n_patches),
        True where a patch's token is replaced by the learned ``mask_token`` (a masked autoencoder's input)."""
        grid = check_images(x, self.in_chans, self.img_size, self.patch_size, self.dynamic_img_size)
        x = self.patch_embed(x)
        if mask is not None:
            x = self.mask_patches(x, mask)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + resample_pos_embed(self.pos_embed, grid, self.grid_size)
        return self.pos_drop(x), grid

    def mask_patches(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Patch tokens (b, n_patches, dim) with ``mask_token`` where ``mask`` (b, n_patches) is True."""
        if hasattr(self, "mask_token"):
            return torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)
        raise UserError("this model has no mask token: only a masked autoencoder takes a patch mask")

    # ----------------------------------------------------------------------------------------------- forward
    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> tokens after the last layer and the final token norm, (b, 1 + n_patches, dim)."""
        z, _ = self.embed(x)
        return self.norm(self.forward_blocks(z))

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

    def forward_trace(self, x: Tensor, layers: list[int] | None = None) -> WhiteBoxTrace:
        """Run the network and return every layer's intermediates: ``Z^l``, the per-head projections
        ``U_k^T LN(Z^l)``, the attention matrices, ``Z^{l+1/2}`` and ``Z^{l+1}`` (see :class:`LayerTrace`).

        ``layers`` selects which layers to record (all by default; negative indices count from the end);
        the forward pass still runs through every layer.
        """
        z0, grid = self.embed(x)
        z, traces = trace_blocks(self.blocks, z0, layers)
        return WhiteBoxTrace(embedding=z0, layers=traces, features=self.norm(z), grid_size=grid)

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

    # ----------------------------------------------------------------------------------------------- timm contract
    def _patch_tokens(self, z: Tensor, norm: bool) -> Tensor:
        """A block's output -> its patch tokens (b, n_patches, dim); ``norm``: the final norm (``norm`` then
        ``fc_norm``: one of them is the identity)."""
        return (self.fc_norm(self.norm(z)) if norm else z)[:, 1:]

    def _final_tokens(self, z: Tensor) -> Tensor:
        return self.norm(z)

    def _prune_head(self) -> None:
        self.pre_logits = nn.Identity()
        self.head_hidden_size = self.config.dim
        self.config = self.config.replace(head_hidden_dim=None)

    def _prune_norm(self) -> None:
        self.norm, self.fc_norm = nn.Identity(), nn.Identity()

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter grouping (layer-wise lr decay): the embedding, one group per layer, then the head."""
        blocks = r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^fc_norm|^pre_logits", (99999,))]
        return {"stem": r"^cls_token|^pos_embed|^patch_embed", "blocks": blocks}

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"image_size={c.image_size}, patch_size={c.patch_size}, dim={c.dim}, depth={c.depth}, "
            f"heads={c.heads}x{c.dim_head}, num_classes={c.num_classes}, pool={c.pool!r}"
        )


def geometry_cfg(cfg: BackboneConfig) -> dict[str, Any]:
    """The part of timm's ``pretrained_cfg`` that the configuration alone determines."""
    return {
        "input_size": (int(cfg.channels), *cfg.image_size),
        "fixed_input_size": not cfg.dynamic_img_size,
        "num_classes": int(cfg.num_classes),
        "pool_size": None,
        # The first learned projection (timm's in_chans adaptation of pretrained weights is for Conv2d stems; for
        # CRATE's LayerNorm -> Linear it re-initialises the layer).
        "first_conv": cfg.first_conv,
        "classifier": "head",
    }


def forward_flops(cfg: BackboneConfig, ista_matmuls: int = 2, image_size: tuple[int, int] | None = None) -> int:
    """Analytic forward FLOPs per image of the matrix products (2 FLOPs per multiply-add).

    ``ista_matmuls`` is 2 for this implementation and 3 for the literal reference formulation.
    """
    h, w = image_size or cfg.image_size
    n_patch = (h // cfg.patch_size[0]) * (w // cfg.patch_size[1])
    n = n_patch + 1
    flops = 2 * n_patch * cfg.patch_dim * cfg.dim  # patch projection
    per_layer = cfg.attention_flops(n) + cfg.sparse_code_flops(n, ista_matmuls)
    flops += cfg.depth * per_layer
    if cfg.head_hidden_dim:
        flops += 2 * cfg.dim * cfg.head_hidden_dim
    flops += 2 * (cfg.head_hidden_dim or cfg.dim) * max(cfg.num_classes, 0)
    return flops
