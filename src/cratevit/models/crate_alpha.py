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
positional embedding; the head is LayerNorm (eps 1e-5) -> Linear on the class token. The network is the shared
:class:`~.backbone.WhiteBoxBackbone` with the block :class:`CRATEAlphaBlock`.

The fast path of :class:`OvercompleteISTA` uses the four matrix products the math needs and nothing more
(``X D``, ``A_1 D^T``, ``(A_1 D^T) D``, ``A_2 D_hat^T``; each ``n x d x 4d``); it expands the second step as
``A_2 = relu(A_1 + (eta X D - eta lambda) - eta (A_1 D^T) D)``, so the first product, already shifted, serves both
steps, ``X`` is not read again, and the scalings ride in the products (``alpha`` of ``addmm``). Over the wide
``(n, 4d)`` activations it makes three elementwise passes (``relu``, one add, ``relu``) where the literal
formulation makes seven. ``cratevit.models.reference_alpha`` holds the literal formulation the tests compare with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..errors import UserError
from .backbone import BackboneConfig, WhiteBoxBackbone, forward_flops, geometry_cfg
from .blocks import ConvPatchEmbed, LayerTrace, OvercompleteISTA, WhiteBoxBlock
from .family import Card, Family
from .key_table import KeyTable
from .shapes import (
    ShapeError,
    ShapeReading,
    backbone_head_facts,
    backbone_heads,
    backbone_with_heads,
    class_count,
    head_split,
    layer_count,
    need,
    square_grid,
)

__all__ = [
    "FAMILY",
    "AlphaLayerTrace",
    "CRATEAlpha",
    "CRATEAlphaBlock",
    "CRATEAlphaConfig",
    "ConvPatchEmbed",
    "OvercompleteISTA",
    "alpha_forward_flops",
]

AlphaLayerTrace = LayerTrace  # a CRATE-alpha layer's trace: LayerTrace with its sparse code A_2 in ``code``


@dataclass
class CRATEAlphaConfig(BackboneConfig):
    """A CRATE-alpha network. ``ista`` is the step size eta; the defaults are CRATE-alpha-B/16. The patch
    embedding is always the convolution; ``drop_path_rate`` drops the MSSA branch (not in the paper)."""

    label = "CRATE-alpha"

    dim: int = 768
    heads: int = 12
    ista: float = 0.1  # ISTA step size eta
    lambd: float = 0.1  # sparsity penalty lambda
    overcomplete: int = 4  # dictionary width / dim
    norm_eps: float = 1e-6  # the block LayerNorms (the head's LayerNorm keeps torch's 1e-5)

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.overcomplete) <= 0:
            raise UserError(f"overcomplete must be a positive integer, got {self.overcomplete!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CRATEAlphaConfig:
        # Files written before the configurations declared only the fields they honour recorded CRATE's
        # ``patch_embed`` (always "linear", never read: the stem is the convolution); it is dropped here.
        d = {k: v for k, v in d.items() if k != "patch_embed"}
        return super().from_dict(d)

    @property
    def patch_embed_kind(self) -> str:
        return "conv"

    @property
    def code_dim(self) -> int:
        """Width of the sparse code (number of dictionary atoms)."""
        return self.overcomplete * self.dim

    def make_block(self, drop_path: float) -> CRATEAlphaBlock:
        return CRATEAlphaBlock(self, drop_path)

    def sparse_code_flops(self, n: int, ista_matmuls: int = 2) -> int:
        """X D, A_1 D^T, (A_1 D^T) D and A_2 D_hat^T, each (n, d) x (d, 4d): the fast path and the literal
        formulation make the same four products, so ``ista_matmuls`` (a CRATE notion) does not change them."""
        return 4 * 2 * n * self.dim * self.code_dim


class CRATEAlphaBlock(WhiteBoxBlock):
    """``z_half = z + MSSA(LN1(z))``; ``z_next = z_half + A_2(LN2(z_half)) D_hat^T`` (MSSA's output map has no
    bias, the LayerNorms eps 1e-6)."""

    def __init__(self, cfg: CRATEAlphaConfig, drop_path: float = 0.0) -> None:
        super().__init__(
            cfg.dim,
            cfg.heads,
            cfg.dim_head,
            "mssa",
            "overcomplete",
            dropout=cfg.dropout,
            attn_impl=cfg.attn_impl,
            drop_path=drop_path,
            norm_eps=cfg.norm_eps,
            out_bias=False,
            step_size=cfg.ista,
            lambd=cfg.lambd,
            overcomplete=cfg.overcomplete,
        )


class CRATEAlpha(WhiteBoxBackbone):
    """The CRATE-alpha vision transformer. ``CRATEAlpha(config=CRATEAlphaConfig(...))`` or keyword arguments::

        CRATEAlpha(image_size=224, patch_size=16, num_classes=1000, dim=768, depth=12, heads=12, dim_head=64)

    Its trace's layers carry the sparse code ``A_2`` in ``code`` (:class:`~.blocks.LayerTrace`).
    """

    def __init__(self, *, config: CRATEAlphaConfig | None = None, **kwargs: Any) -> None:
        if config is None:
            config = CRATEAlphaConfig(**kwargs)
        elif kwargs:
            raise TypeError(f"pass either config= or keyword arguments, not both (got {sorted(kwargs)})")
        if not isinstance(config, CRATEAlphaConfig):
            raise UserError(f"CRATEAlpha needs a CRATEAlphaConfig, got {type(config).__name__}")
        super().__init__(config)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dictionary={self.config.dim}x{self.config.code_dim}"


def alpha_forward_flops(cfg: CRATEAlphaConfig, image_size: tuple[int, int] | None = None) -> int:
    """Analytic forward FLOPs per image (:func:`forward_flops`, whose ISTA term is this config's four products)."""
    return forward_flops(cfg, image_size=image_size)


# ---------------------------------------------------------------------------------------------- the family record
def read_shapes(state: Mapping[str, Tensor], heads: int | None = None) -> ShapeReading:
    """The :class:`CRATEAlphaConfig` of a state dict in our key layout, from its tensor shapes alone: dim, channels
    and patch size from the convolutional stem, the (square) image size from ``pos_embed``, depth from the block
    indices, the dictionary ratio from ``D``, the class count from the head; the head count from ``heads`` (U is
    ``(heads * dim_head, dim)``: its shape cannot tell 12 heads of 64 from 6 of 128, ``heads_read=False``)."""
    pos = need(state, "pos_embed", 3)
    stem = need(state, "patch_embed.proj.weight", 4)
    inner = need(state, "blocks.0.mssa.subspace_proj.weight", 2).shape[0]
    dictionary = need(state, "blocks.0.ista.dictionary", 2)
    dim, channels, ph, pw = stem.shape
    grid = square_grid(pos)
    if grid is None:
        raise ShapeError(
            f"{{0}} {tuple(pos.shape)} holds no square patch grid; pass arch= a CRATEAlphaConfig with the image size",
            "pos_embed",
        )
    n_heads = backbone_heads(dim, inner, "blocks.0.mssa.out_proj.weight" in state, heads)
    cfg = CRATEAlphaConfig(
        image_size=(grid * ph, grid * pw),
        patch_size=(ph, pw),
        channels=channels,
        dim=dim,
        depth=layer_count(state),
        **head_split(inner, n_heads),
        overcomplete=dictionary.shape[1] // dim,
        num_classes=class_count(state),
    )
    return ShapeReading(cfg, heads_read=n_heads is not None)


# CRATE-alpha: the released PyTorch files (Hub UCSC-VLAA/CRATE-alpha, torch/*.pth) are plain state_dicts of the
# official torch_inference/model/crate_alpha.py. Every tensor keeps its shape (D and D1 are (dim, 4 dim) in both).
CRATE_ALPHA_KEYS = KeyTable(
    body=(
        ("conv1.{p}", "patch_embed.proj.{p}"),
        ("cls_token", "cls_token"),
        ("pos_embedding", "pos_embed"),
        ("transformer.layers.{i}.0.norm.{p}", "blocks.{i}.norm1.{p}"),
        ("transformer.layers.{i}.0.fn.qkv.weight", "blocks.{i}.mssa.subspace_proj.weight"),
        ("transformer.layers.{i}.0.fn.to_out.0.weight", "blocks.{i}.mssa.out_proj.weight"),
        ("transformer.layers.{i}.1.norm.{p}", "blocks.{i}.norm2.{p}"),
        ("transformer.layers.{i}.1.fn.D", "blocks.{i}.ista.dictionary"),
        ("transformer.layers.{i}.1.fn.D1", "blocks.{i}.ista.decoder"),
        ("mlp_head.0.{p}", "fc_norm.{p}"),
    ),
    head_one_stage=(("mlp_head.1.{p}", "head.{p}"),),
    head_two_stage=(),
    reference_markers=("conv1.", "transformer.layers."),
    two_stage_reference_key="",
    two_stage_our_key="",
)
"""CRATE-alpha's key table: the official release's names (``conv1``, ``fn.D`` / ``fn.D1``)."""


FAMILY = Family(
    name="crate_alpha",
    model_cls=CRATEAlpha,
    config_cls=CRATEAlphaConfig,
    description="CRATE-alpha: overcomplete two-step ISTA with a decoupled decoder (Yang et al., NeurIPS 2024)",
    paper={
        "license": "apache-2.0",
        "paper_name": "Scaling White-Box Transformers for Vision",
        "paper_ids": "arXiv:2405.20299",
        "origin_url": "https://github.com/UCSC-VLAA/CRATE-alpha",
    },
    card=Card(
        title="a CRATE-alpha white-box vision transformer",
        paper_url="https://arxiv.org/abs/2405.20299",
        blurb="CRATE-alpha, a scaled white-box vision transformer: subspace self-attention, then two ISTA steps on "
        "an overcomplete dictionary decoded by a separate dictionary onto the residual stream.",
        license="apache-2.0",
        tags=("image-classification", "vision", "white-box", "crate", "crate-alpha"),
        loader="CRATEAlpha",
    ),
    code_kind=lambda cfg: "trace",
    code_editor=lambda block, z_half, code: block.ista.decode(code, z_half),
    pretrained_cfg=geometry_cfg,
    key_table=CRATE_ALPHA_KEYS,
    shape_reader=read_shapes,
    head_facts=backbone_head_facts,
    with_heads=backbone_with_heads,
)
"""CRATE-α's family record (registered by :mod:`cratevit.registry`)."""
