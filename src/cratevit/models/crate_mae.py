"""CRATE-MAE: a white-box masked autoencoder (Pai et al., "Masked Completion via Structured Diffusion with
White-Box Transformers", ICLR 2024).

The encoder is a stack of CRATE layers; the decoder runs each step backwards. With ``Z^l`` the ``(n, d)`` tokens
(row vectors) entering layer ``l``:

* Encoder layer (a CRATE layer, sparsity ``lambda = 0.5`` instead of CRATE's 0.1)::

      Z^{l+1/2} = Z^l + MSSA(LN(Z^l))                                   (compression)
      Z^{l+1}   = relu(x + eta * (x D - x D^T D) - eta * lambda),  x = LN(Z^{l+1/2})   (one ISTA step)

* Decoder layer (the inverse steps, in the opposite order)::

      Z^{l+1/2} = LN(Z^l) D^T                 (a learned dim x dim dictionary D, no ReLU: sparse code -> signal)
      Z^{l+1}   = Z^{l+1/2} - MSSA(LN(Z^{l+1/2}))                        (the compression step undone)

  ``MSSA`` is CRATE's multi-head subspace self-attention (one projection ``U_k`` per head serves as query, key
  and value), ``LN`` a LayerNorm with its own parameters in every step.

Masked autoencoding (as MAE, He et al. 2022, with the official CRATE-MAE's one difference): the image is cut into
patches by a convolution, a random ``mask_ratio`` (0.75) of the patches is chosen per image, and the chosen
patches' tokens are *replaced by a learned mask token*, so the encoder sees the full sequence
``[cls, tokens with mask tokens in place]`` plus a fixed 2-D sine-cosine positional embedding. A final LayerNorm
ends the encoder; the decoder layers, a LayerNorm and ``decoder_pred`` (a linear map to the pixels of a patch)
end the decoder. The loss is the mean squared error on the masked patches only, optionally against per-patch
normalised pixels (``norm_pix_loss``).

The encoder and the decoder have the same width (the official code's ``decoder_embed`` is never applied).

Composition: :class:`CRATEMAE` *is* the shared white-box backbone (:class:`~.backbone.WhiteBoxBackbone`) built
from its encoder's configuration (:attr:`CRATEMAEConfig.encoder`: a CRATE with a convolutional patch embedding,
lambda 0.5 and no classifier), with a ``mask_token``, the fixed sine-cosine positions as a buffer, the encoder's
final LayerNorm as the backbone's token norm ``norm``, and the decoder. Its state-dict keys are those of every
released file (``patch_embed.proj``, ``blocks.{i}.*``, ``norm``, ``decoder_blocks.{i}.*``, ...), so the classifier
of its encoder (fine-tuning) is a key rename: ``norm`` -> ``fc_norm``, decoder and mask token dropped
(:func:`crate_classifier_from_mae`). This file imports torch only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .backbone import PatchGrid, WhiteBoxBackbone, to_2tuple, trace_blocks
from .blocks import MSSA, ConvPatchEmbed, LayerTrace, WhiteBoxBlock
from .crate import CRATE, CRATEConfig
from .family import Card, Family
from .key_table import KeyTable
from .shapes import ShapeError, ShapeReading, layer_count, need, square_grid

__all__ = [
    "CRATEMAE",
    "MAE_PRESETS",
    "CRATEMAEConfig",
    "CRATEMAETrace",
    "ConvPatchEmbed",
    "DecoderBlock",
    "EncoderBlock",
    "MAEOutput",
    "crate_classifier_from_mae",
    "mae_crate_base",
    "mae_crate_large",
    "mae_crate_small",
    "mae_crate_tiny",
    "mae_geometry_cfg",
    "masked_mse",
    "patchify",
    "random_masking",
    "sincos_pos_embed_2d",
    "unpatchify",
]


@dataclass
class CRATEMAEConfig(PatchGrid):
    """Everything that defines a CRATE-MAE network (stored in every checkpoint)."""

    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    channels: int = 3
    dim: int = 768  # width of encoder and decoder
    depth: int = 12
    heads: int = 12
    dim_head: int = 64
    decoder_depth: int = 12
    decoder_heads: int = 12
    decoder_dim_head: int = 64
    ista: float = 0.1  # ISTA step size eta (encoder)
    lambd: float = 0.5  # sparsity penalty lambda (encoder)
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    num_classes: int = 0  # no classifier: fine-tuning builds a CRATE from the encoder (cratevit finetune)
    dynamic_img_size: bool = False  # the sine-cosine table is fixed to image_size
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.image_size = to_2tuple(self.image_size)
        self.patch_size = to_2tuple(self.patch_size)
        for what, size, patch in zip(("height", "width"), self.image_size, self.patch_size, strict=True):
            if patch <= 0 or size <= 0 or size % patch:
                raise UserError(
                    f"image {what} {size} must be a positive multiple of the patch {what} {patch}; "
                    f"choose an image_size that is a multiple of patch_size {self.patch_size}"
                )
        for name in ("dim", "depth", "heads", "dim_head", "decoder_depth", "decoder_heads", "decoder_dim_head"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.dim % 4:
            raise UserError(f"dim must be a multiple of 4 for the 2-D sine-cosine embedding, got {self.dim}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise UserError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CRATEMAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown CRATE-MAE config keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> CRATEMAEConfig:
        return replace(self, **changes)

    @property
    def encoder(self) -> CRATEConfig:
        """The encoder as a CRATE configuration: convolutional patches, this ``ista`` / ``lambd``, the class
        token pooled, no classifier (``num_classes=0``). The backbone of :class:`CRATEMAE` is built from it, and
        ``encoder.replace(num_classes=n)`` is the classifier of fine-tuning."""
        return CRATEConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_classes=0,
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
            dim_head=self.dim_head,
            pool="cls",
            channels=self.channels,
            dynamic_img_size=self.dynamic_img_size,
            ista=self.ista,
            lambd=self.lambd,
            patch_embed="conv",
            name=f"{self.name}_encoder" if self.name else None,
        )


def _preset(name: str, dim: int, depth: int, heads: int) -> CRATEMAEConfig:
    # the official mae_crate_* functions: patch 16, dim_head = dim // heads, decoder as wide and deep as the encoder
    return CRATEMAEConfig(
        dim=dim,
        depth=depth,
        heads=heads,
        dim_head=dim // heads,
        decoder_depth=depth,
        decoder_heads=heads,
        decoder_dim_head=dim // heads,
        name=name,
    )


MAE_PRESETS: dict[str, CRATEMAEConfig] = {
    "mae_crate_tiny": _preset("mae_crate_tiny", 384, 12, 6),
    "mae_crate_small": _preset("mae_crate_small", 576, 12, 12),
    "mae_crate_base": _preset("mae_crate_base", 768, 12, 12),
    "mae_crate_large": _preset("mae_crate_large", 1024, 24, 16),
}
"""The CRATE-MAE configurations: the official sizes (tiny ... large) and the small digits and shapes models."""


# ---------------------------------------------------------------------------------------------- pure functions
def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> Tensor:
    """Fixed 2-D sine-cosine positional embedding, (1 + rows*cols, dim) with a zero row for the class token.

    Token ``r * cols + c`` gets ``[sin(c w), cos(c w), sin(r w), cos(r w)]`` with ``w_k = 10000^(-k / (dim/4))``,
    k = 0 .. dim/4 - 1: the first half encodes the column, the second half the row (MAE's layout).
    """
    if dim % 4:
        raise UserError(f"the 2-D sine-cosine embedding needs dim divisible by 4, got {dim}")
    rows, cols = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    r, c = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )
    halves = []
    for pos in (c.reshape(-1), r.reshape(-1)):
        angle = pos[:, None] * omega[None, :]  # (rows*cols, dim/4)
        halves += [angle.sin(), angle.cos()]
    emb = torch.cat(halves, dim=1).float()  # (rows*cols, dim)
    return torch.cat([emb.new_zeros(1, dim), emb]) if cls_token else emb


def patchify(images: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """(b, c, H, W) -> (b, rows*cols, p1*p2*c), each patch flattened in (p1, p2, c) order (MAE's order)."""
    b, c, h, w = images.shape
    p1, p2 = patch_size
    x = images.reshape(b, c, h // p1, p1, w // p2, p2)  # b c rows p1 cols p2
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p1) * (w // p2), p1 * p2 * c)


def unpatchify(patches: Tensor, patch_size: tuple[int, int], grid: tuple[int, int], channels: int) -> Tensor:
    """Inverse of :func:`patchify`: (b, rows*cols, p1*p2*c) -> (b, c, rows*p1, cols*p2)."""
    b = patches.shape[0]
    (p1, p2), (rows, cols) = patch_size, grid
    x = patches.reshape(b, rows, cols, p1, p2, channels)  # b rows cols p1 p2 c
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, rows * p1, cols * p2)


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Per-image random masking as MAE: the ``int(n * (1 - mask_ratio))`` patches with the smallest noise are kept.

    Returns the mask (b, n) as booleans, True where the patch is removed. ``noise`` (b, n) fixes the choice;
    otherwise it is drawn uniformly (from ``generator`` when given: seeded masks).
    """
    keep = int(num_patches * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, num_patches, generator=generator, device=device)
    if noise.shape != (batch, num_patches):
        raise UserError(f"noise must have shape ({batch}, {num_patches}), got {tuple(noise.shape)}")
    order = noise.argsort(dim=1)  # ascending: the first `keep` are kept
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=noise.device)
    mask[:, :keep] = False
    return mask.gather(1, order.argsort(dim=1))  # back to patch order


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = False) -> Tensor:
    """Mean over masked patches of the per-patch mean squared error; ``norm_pix`` normalises each target patch
    by its own mean and variance (unbiased, eps 1e-6) first, as MAE."""
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    dtype = torch.promote_types(pred.dtype, torch.float32)  # bf16 predictions are scored in float32
    per_patch = (pred.to(dtype) - target.to(dtype)).pow(2).mean(dim=-1)  # (b, n)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------------------------- modules
class EncoderBlock(WhiteBoxBlock):
    """A CRATE layer: ``z_half = z + MSSA(LN1(z))``; ``z_next = ISTA(LN2(z_half))``."""

    def __init__(self, dim: int, heads: int, dim_head: int, step_size: float, lambd: float) -> None:
        super().__init__(dim, heads, dim_head, "mssa", "ista", step_size=step_size, lambd=lambd)


class DecoderBlock(nn.Module):
    """The inverse layer: ``z_half = LN1(z) D^T``; ``z_next = z_half - MSSA(LN2(z_half))``."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.dictionary = nn.Parameter(torch.empty(dim, dim))  # D
        self.norm2 = nn.LayerNorm(dim)
        self.mssa = MSSA(dim, heads, dim_head)
        nn.init.kaiming_uniform_(self.dictionary)

    def forward(self, z: Tensor) -> Tensor:
        z_half = F.linear(self.norm1(z), self.dictionary)
        return z_half - self.mssa(self.norm2(z_half))

    def trace(self, z: Tensor) -> tuple[Tensor, LayerTrace]:
        """The same step with its intermediates; here ``proj`` is ``U_k^T LN(Z^{l+1/2})`` (the MSSA input)."""
        z_half = F.linear(self.norm1(z), self.dictionary)
        out, proj, attn = self.mssa.trace(self.norm2(z_half))
        z_next = z_half - out
        return z_next, LayerTrace(z_in=z, proj=proj, attn=attn, z_half=z_half, z_out=z_next)


class MAEOutput(NamedTuple):
    """A CRATE-MAE forward pass: the masked MSE ``loss`` (scalar), the predicted pixels ``pred``
    ``(b, n_patches, patch_dim)`` and the ``mask`` ``(b, n_patches)``, True where a patch was masked."""

    loss: Tensor  # masked MSE, a scalar
    pred: Tensor  # predicted pixels of every patch, (b, n_patches, patch_dim) (normalised if norm_pix_loss)
    mask: Tensor  # (b, n_patches) booleans, True where the patch was masked


@dataclass
class CRATEMAETrace:
    """Result of :meth:`CRATEMAE.forward_trace`. Shapes: b images, n = 1 + patches tokens (class token first)."""

    embedding: Tensor  # Z^0: patch tokens with mask tokens in place, class token, positional embedding, (b, n, dim)
    mask: Tensor  # (b, n_patches), True where masked
    encoder: list[LayerTrace]  # z_in, proj, attn, z_half (after MSSA), z_out (after ISTA) per selected layer
    latent: Tensor  # encoder output after its final LayerNorm, (b, n, dim)
    decoder: list[LayerTrace]  # z_in, z_half (= LN(z_in) D^T), proj, attn, z_out (after subtracting MSSA)
    pred: Tensor  # (b, n_patches, patch_dim)
    grid_size: tuple[int, int]

    @property
    def layers(self) -> list[LayerTrace]:
        """The encoder's layers (the name CRATE's trace uses, so that CRATE's analysis reads the encoder)."""
        return self.encoder


class CRATEMAE(WhiteBoxBackbone):
    """The CRATE masked autoencoder. ``CRATEMAE(CRATEMAEConfig(...))`` or ``CRATEMAE(dim=..., depth=..., ...)``.

    The encoder is the white-box backbone of ``config.encoder`` (embedding, blocks, timm's feature API:
    ``forward_features``, ``forward_intermediates``, ``get_last_selfattention``); the decoder is its own."""

    def __init__(self, config: CRATEMAEConfig | None = None, **kwargs: Any) -> None:
        if config is None:
            config = CRATEMAEConfig(**kwargs)
        elif kwargs:
            raise TypeError(f"pass either a config or keyword arguments, not both (got {sorted(kwargs)})")
        super().__init__(config.encoder)  # patch_embed, cls_token, blocks; no classifier
        cfg = self.config = config
        self.pretrained_cfg = self.default_cfg = mae_geometry_cfg(cfg)

        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        del self.pos_embed  # the backbone's learned table: here a fixed sine-cosine one, (1, n, dim)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.dim, cfg.grid_size)[None])
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)  # the encoder's final LayerNorm, over every token
        self.fc_norm = nn.Identity()
        self.decoder_blocks = nn.ModuleList(
            DecoderBlock(cfg.dim, cfg.decoder_heads, cfg.decoder_dim_head) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.dim, cfg.patch_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: xavier-uniform linear maps (the patch convolution as a linear map), zero
        biases, unit LayerNorms, class and mask tokens ~ N(0, 0.02^2); dictionaries keep kaiming-uniform."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------------- pieces
    def patchify(self, images: Tensor) -> Tensor:
        return patchify(images, self.config.patch_size)

    def unpatchify(self, patches: Tensor) -> Tensor:
        cfg = self.config
        return unpatchify(patches, cfg.patch_size, cfg.grid_size, cfg.channels)

    def make_mask(
        self, batch: int, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """A random mask (b, n_patches), True where masked; seeded when a generator is given."""
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        device = self.cls_token.device if generator is None else generator.device
        mask = random_masking(batch, self.config.num_patches, ratio, generator=generator, device=device)
        return mask.to(self.cls_token.device)

    # ----------------------------------------------------------------------------------------------- forward
    def forward_encoder(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Images (and a mask, None for none) -> latent tokens after the encoder's final LayerNorm. ``embed``
        (the backbone's) puts the mask token where ``mask`` is True, the class token in front, and the positions."""
        z, _ = self.embed(x, mask)
        return self.norm(self.forward_blocks(z))

    def forward_decoder(self, latent: Tensor) -> Tensor:
        """Latent tokens -> predicted pixels of every patch (b, n_patches, patch_dim) (class token dropped)."""
        z = latent
        for block in self.decoder_blocks:
            z = block(z)
        return self.decoder_pred(self.decoder_norm(z))[:, 1:]

    def forward_loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        return masked_mse(pred, self.patchify(images), mask, self.config.norm_pix_loss)

    def forward(
        self,
        images: Tensor,
        mask_ratio: float | None = None,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> MAEOutput:
        """Mask, encode, decode, score. The mask is ``mask`` if given, else drawn (``mask_ratio``, ``generator``)."""
        if mask is None:
            mask = self.make_mask(images.shape[0], mask_ratio, generator)
        pred = self.forward_decoder(self.forward_encoder(images, mask))
        return MAEOutput(self.forward_loss(images, pred, mask), pred, mask)

    def forward_encoder_features(self, x: Tensor) -> Tensor:
        """Unmasked images -> encoder tokens after the final LayerNorm, (b, 1 + n_patches, dim): for probes and
        fine-tuning (the backbone's ``forward_features``)."""
        return self.forward_features(x)

    def forward_trace(
        self,
        images: Tensor,
        mask: Tensor | None = None,
        encoder_layers: list[int] | None = None,
        decoder_layers: list[int] | None = None,
        layers: list[int] | None = None,
    ) -> CRATEMAETrace:
        """Run encoder and decoder on ``images`` (masked where ``mask`` is True; None: nothing masked) and return
        every selected layer's intermediates (all layers by default; negative indices count from the end).
        ``layers`` (CRATE's signature) selects encoder layers and no decoder layer."""
        if layers is not None:  # CRATE's signature: these encoder layers, no decoder layer
            encoder_layers, decoder_layers = layers, []
        if mask is None:
            mask = torch.zeros(images.shape[0], self.config.num_patches, dtype=torch.bool, device=images.device)

        z0, _ = self.embed(images, mask)
        z, enc = trace_blocks(self.blocks, z0, encoder_layers)
        latent = self.norm(z)
        z, dec = trace_blocks(self.decoder_blocks, latent, decoder_layers)
        pred = self.decoder_pred(self.decoder_norm(z))[:, 1:]
        return CRATEMAETrace(z0, mask, enc, latent, dec, pred, self.config.grid_size)

    # ----------------------------------------------------------------------------------------------- utilities
    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """An autoencoder has no classifier: ``reset_classifier(0)`` keeps it so (timm's feature extraction);
        anything else is an error naming the conversion (``cratevit.registry.to_classifier``)."""
        if num_classes != 0 or global_pool not in (None, "cls", "token"):
            raise UserError(
                "a CRATE-MAE has no classifier; build one from its encoder with "
                "cratevit.registry.to_classifier(model, num_classes) (or cratevit finetune)"
            )

    def prune_intermediate_layers(self, *args: Any, **kwargs: Any) -> list[int]:
        raise UserError("a CRATE-MAE's encoder feeds its decoder and cannot be pruned; prune its classifier instead")

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "mask_token"}

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"image_size={c.image_size}, patch_size={c.patch_size}, dim={c.dim}, encoder={c.depth}x{c.heads}x"
            f"{c.dim_head}, decoder={c.decoder_depth}x{c.decoder_heads}x{c.decoder_dim_head}, lambd={c.lambd}, "
            f"mask_ratio={c.mask_ratio}"
        )


def crate_classifier_from_mae(mae: CRATEMAE, num_classes: int) -> CRATE:
    """A CRATE classifier whose body is the CRATE-MAE's encoder (fine-tuning, as MAE fine-tunes its ViT encoder).

    Same patch convolution, class token, positional table (now a learned parameter), and CRATE layers with
    lambda 0.5; the encoder's final LayerNorm becomes the classifier's ``fc_norm`` on the class token (exact: a
    LayerNorm acts on each token alone; eps 1e-5 instead of 1e-6); a fresh linear head. The decoder is dropped."""
    model = CRATE(config=mae.config.encoder.replace(num_classes=num_classes))
    encoder = {
        ENCODER_TO_CLASSIFIER.get(k, k): v
        for k, v in mae.state_dict().items()
        if not k.startswith(AUTOENCODER_ONLY_KEYS)
    }
    own = model.state_dict()
    encoder |= {k: own[k] for k in own if k.startswith("head.")}  # the fresh head
    model.load_state_dict(encoder, strict=True)
    return model


# The classifier of the encoder is a key rename: the encoder's token norm is the classifier's pooled-token norm
# (exact: a LayerNorm acts on each token alone), the rest of the decoder's and masking's keys are dropped.
ENCODER_TO_CLASSIFIER = {"norm.weight": "fc_norm.weight", "norm.bias": "fc_norm.bias"}
AUTOENCODER_ONLY_KEYS = ("mask_token", "decoder_")


def mae_geometry_cfg(cfg: CRATEMAEConfig) -> dict[str, Any]:
    """The part of timm's ``pretrained_cfg`` that the configuration alone determines."""
    return {
        "input_size": (int(cfg.channels), *cfg.image_size),
        "fixed_input_size": True,
        "num_classes": 0,
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": None,
    }


def _build(name: str, **overrides: Any) -> CRATEMAE:
    return CRATEMAE(MAE_PRESETS[name].replace(**overrides))


def mae_crate_tiny(**overrides: Any) -> CRATEMAE:
    """384 wide, 12 + 12 layers, 6 heads of 64."""
    return _build("mae_crate_tiny", **overrides)


def mae_crate_small(**overrides: Any) -> CRATEMAE:
    """576 wide, 12 + 12 layers, 12 heads of 48."""
    return _build("mae_crate_small", **overrides)


def mae_crate_base(**overrides: Any) -> CRATEMAE:
    """768 wide, 12 + 12 layers, 12 heads of 64 (the released CRATE-MAE-B)."""
    return _build("mae_crate_base", **overrides)


def mae_crate_large(**overrides: Any) -> CRATEMAE:
    """1024 wide, 24 + 24 layers, 16 heads of 64."""
    return _build("mae_crate_large", **overrides)


# ---------------------------------------------------------------------------------------------- the family record
def read_shapes(state: Mapping[str, Tensor], heads: int | None = None) -> ShapeReading:
    """The :class:`CRATEMAEConfig` of a state dict in our key layout, from its tensor shapes alone: width, depths,
    patch, channels and image size; the head count (encoder and decoder alike, as every official size) from
    ``heads``, which the shapes cannot tell (``heads_read=False`` without it)."""
    pos = need(state, "pos_embed", 3)
    proj = need(state, "patch_embed.proj.weight", 4)
    inner = need(state, "blocks.0.mssa.subspace_proj.weight", 2).shape[0]
    decoder_inner = need(state, "decoder_blocks.0.mssa.subspace_proj.weight", 2).shape[0]
    dim, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    grid = square_grid(pos)
    if grid is None or proj.shape[2] != proj.shape[3]:
        raise ShapeError(
            f"cannot read a square patch grid from {{0}} {tuple(pos.shape)}; pass arch= a CRATEMAEConfig", "pos_embed"
        )
    cfg = CRATEMAEConfig(
        image_size=grid * patch,
        patch_size=patch,
        channels=channels,
        dim=dim,
        depth=layer_count(state),
        heads=1,
        dim_head=inner,
        decoder_depth=layer_count(state, "decoder_blocks", "dictionary"),
        decoder_heads=1,
        decoder_dim_head=decoder_inner,
    )
    return ShapeReading(cfg, heads_read=False) if heads is None else ShapeReading(mae_with_heads(cfg, heads))


def mae_with_heads(cfg: CRATEMAEConfig, heads: int) -> CRATEMAEConfig:
    """The configuration with ``heads`` heads in the encoder and in the decoder, each projection as wide as before."""
    inner, decoder_inner = cfg.heads * cfg.dim_head, cfg.decoder_heads * cfg.decoder_dim_head
    for width in (inner, decoder_inner):
        if heads <= 0 or width % heads:
            raise ShapeError(f"heads={heads} does not divide the {width}-wide subspace projection")
    return cfg.replace(
        heads=heads, dim_head=inner // heads, decoder_heads=heads, decoder_dim_head=decoder_inner // heads
    )


# CRATE-MAE as released (model/crate_ae/ of the CRATE repository, trained with FAIR's MAE code): timm's conv
# PatchEmbed, encoder blocks ``[PreNorm(Attention), PreNorm(ISTA)]``, decoder blocks ``[PreNorm(D x), PreNorm(Attention)]``.
# The official forward pass adds ``decoder_pos_embed`` to the encoder's input and never applies ``pos_embed`` or
# ``decoder_embed``: those are checked to be there and dropped.
CRATE_MAE_KEYS = KeyTable(
    body=(
        ("patch_embed.proj.{p}", "patch_embed.proj.{p}"),
        ("cls_token", "cls_token"),
        ("mask_token", "mask_token"),
        ("decoder_pos_embed", "pos_embed"),
        ("blocks.{i}.layers.0.0.norm.{p}", "blocks.{i}.norm1.{p}"),
        ("blocks.{i}.layers.0.0.fn.qkv.weight", "blocks.{i}.mssa.subspace_proj.weight"),
        ("blocks.{i}.layers.0.0.fn.to_out.0.{p}", "blocks.{i}.mssa.out_proj.{p}"),
        ("blocks.{i}.layers.0.1.norm.{p}", "blocks.{i}.norm2.{p}"),
        ("blocks.{i}.layers.0.1.fn.weight", "blocks.{i}.ista.dictionary"),
        ("norm.{p}", "norm.{p}"),
        ("decoder_blocks.{i}.layers.0.0.norm.{p}", "decoder_blocks.{i}.norm1.{p}"),
        ("decoder_blocks.{i}.layers.0.0.fn.weight", "decoder_blocks.{i}.dictionary"),
        ("decoder_blocks.{i}.layers.0.1.norm.{p}", "decoder_blocks.{i}.norm2.{p}"),
        ("decoder_blocks.{i}.layers.0.1.fn.qkv.weight", "decoder_blocks.{i}.mssa.subspace_proj.weight"),
        ("decoder_blocks.{i}.layers.0.1.fn.to_out.0.{p}", "decoder_blocks.{i}.mssa.out_proj.{p}"),
        ("decoder_norm.{p}", "decoder_norm.{p}"),
        ("decoder_pred.{p}", "decoder_pred.{p}"),
    ),
    reference_markers=("blocks.0.layers.0.", "decoder_blocks.0.layers.0."),
    reference_unused=("pos_embed", "decoder_embed.weight", "decoder_embed.bias"),
)
"""CRATE-MAE's key table: the official release's names (``blocks.{i}.layers.0.*``)."""


FAMILY = Family(
    name="crate_mae",
    model_cls=CRATEMAE,
    config_cls=CRATEMAEConfig,
    description="CRATE-MAE: white-box masked autoencoder (Pai et al., ICLR 2024)",
    classifier=False,
    objective="masked_autoencoding",
    paper={
        "license": "mit",
        "paper_name": "Masked Completion via Structured Diffusion with White-Box Transformers",
        "paper_ids": "https://openreview.net/forum?id=PvyOYleymy",
        "origin_url": "https://github.com/Ma-Lab-Berkeley/CRATE",
    },
    card=Card(
        title="a CRATE-MAE white-box masked autoencoder",
        paper_url="https://openreview.net/forum?id=PvyOYleymy",
        blurb="CRATE-MAE, a white-box masked autoencoder: a CRATE encoder and a decoder that runs each layer's steps "
        "backwards, trained to complete masked patches.",
        license="mit",
        pipeline_tag="image-feature-extraction",
        tags=("masked-autoencoder", "vision", "white-box", "crate", "crate-mae"),
        loader="CRATEMAE",
    ),
    code_kind=lambda cfg: "output",
    pretrained_cfg=mae_geometry_cfg,
    to_classifier=crate_classifier_from_mae,
    mask_sampler=random_masking,
    key_table=CRATE_MAE_KEYS,
    shape_reader=read_shapes,
    head_facts=lambda cfg: (f"dim {cfg.dim}",),  # every official size has its own width
    with_heads=mae_with_heads,
    file_args={"norm_pix_loss": "norm_pix_loss", "mask_ratio": "mask_ratio"},  # FAIR MAE's main_pretrain.py args
)
"""CRATE-MAE's family record (registered by :mod:`cratevit.registry`)."""
