"""CRATE: the Coding RAte reduction TransformEr (Yu et al., NeurIPS 2023), and the ablations of the emergence paper.

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

Ablations ("Emergence of Segmentation with Minimalistic White-Box Transformers", Yu et al. 2023, Table 2; and
attention-only transformers): ``attn_kind`` (``"mssa"`` | ``"mhsa"``) and ``feedforward`` (``"ista"`` | ``"mlp"``
| ``"none"``) choose the two halves of every layer (:class:`~.blocks.WhiteBoxBlock`), so CRATE (MSSA + ISTA),
CRATE-MLP (MSSA + MLP), CRATE-MHSA (MHSA + ISTA), a ViT (MHSA + MLP) and attention-only stacks share this one
configuration and one backbone.

The blocks are in :mod:`.blocks`, the backbone in :mod:`.backbone`; :mod:`cratevit.models.reference` keeps the
literal reference formulation the tests compare with. The family record at the end is what the rest of cratevit
reads about CRATE (:mod:`cratevit.registry`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from ..errors import UserError
from .backbone import (
    BackboneConfig,
    PatchGrid,
    WhiteBoxBackbone,
    WhiteBoxTrace,
    check_images,
    forward_flops,
    geometry_cfg,
    resample_pos_embed,
    to_2tuple,
)
from .blocks import (
    ISTA,
    MSSA,
    ConvPatchEmbed,
    DropPath,
    LayerTrace,
    PatchEmbed,
    WhiteBoxBlock,
    explicit_attention,
    ista_step,
    subspace_attention,
    use_fused_attention,
)
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
    split_patch_dim,
    square_grid,
)

__all__ = [
    "CRATE",
    "FAMILY",
    "ISTA",
    "MSSA",
    "CRATEBlock",
    "CRATEConfig",
    "CRATETrace",
    "ConvPatchEmbed",
    "DropPath",
    "LayerTrace",
    "PatchEmbed",
    "PatchGrid",
    "check_images",
    "explicit_attention",
    "forward_flops",
    "geometry_cfg",
    "ista_step",
    "resample_pos_embed",
    "subspace_attention",
    "to_2tuple",
    "use_fused_attention",
]

CRATETrace = WhiteBoxTrace  # the result of CRATE.forward_trace


@dataclass
class CRATEConfig(BackboneConfig):
    """Everything that defines a CRATE network; stored in every checkpoint so a file describes itself."""

    label = "CRATE"

    ista: float = 0.1  # ISTA step size eta
    lambd: float = 0.1  # sparsity penalty lambda
    patch_embed: Literal["linear", "conv"] = "linear"  # conv: a strided convolution, as CRATE-MAE's encoder
    attn_kind: Literal["mssa", "mhsa"] = "mssa"  # MSSA: CRATE's; MHSA: the ViT's q/k/v attention
    feedforward: Literal["ista", "mlp", "none"] = "ista"  # ISTA: CRATE's; MLP: the ViT's; none: attention only
    mlp_ratio: float = 4.0  # hidden width / dim of the MLP (feedforward="mlp" only)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_embed not in ("linear", "conv"):
            raise UserError(f"patch_embed must be 'linear' or 'conv', got {self.patch_embed!r}")
        if self.attn_kind not in ("mssa", "mhsa"):
            raise UserError(f"attn_kind must be 'mssa' or 'mhsa', got {self.attn_kind!r}")
        if self.feedforward not in ("ista", "mlp", "none"):
            raise UserError(f"feedforward must be 'ista', 'mlp' or 'none', got {self.feedforward!r}")
        if self.feedforward == "mlp" and not float(self.mlp_ratio) > 0:
            raise UserError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")

    @property
    def patch_embed_kind(self) -> str:
        return self.patch_embed

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def variant(self) -> str:
        """The emergence paper's name of this composition (CRATE, CRATE-MLP, CRATE-MHSA, ViT, ...)."""
        return VARIANTS[(self.attn_kind, self.feedforward)]

    def make_block(self, drop_path: float) -> WhiteBoxBlock:
        return CRATEBlock(self, drop_path)

    def attention_flops(self, n: int) -> int:
        if self.attn_kind == "mhsa":  # W_qkv x, q k^T, attn v, output projection
            return (
                2 * n * self.dim * 3 * self.inner_dim
                + 2 * 2 * self.heads * n * n * self.dim_head
                + (2 * n * self.inner_dim * self.dim)
            )
        return super().attention_flops(n)

    def sparse_code_flops(self, n: int, ista_matmuls: int = 2) -> int:
        """FLOPs of one layer's second half on ``n`` tokens: ISTA makes 2 products here, 3 in the literal
        formulation; the MLP two ``dim x hidden`` products; none, none."""
        if self.feedforward == "mlp":
            return 2 * 2 * n * self.dim * self.mlp_hidden
        if self.feedforward == "none":
            return 0
        return ista_matmuls * 2 * n * self.dim * self.dim


VARIANTS = {
    ("mssa", "ista"): "CRATE",
    ("mssa", "mlp"): "CRATE-MLP",
    ("mhsa", "ista"): "CRATE-MHSA",
    ("mhsa", "mlp"): "ViT",
    ("mssa", "none"): "MSSA only",
    ("mhsa", "none"): "MHSA only",
}


class CRATEBlock(WhiteBoxBlock):
    """One CRATE layer: ``z_half = z + MSSA(LN1(z))``; ``z_next = ISTA(LN2(z_half))`` (or the configuration's
    ablation of either half). ``drop_path`` (stochastic depth on the residual branches, not in the paper) is the
    identity unless asked for."""

    def __init__(self, cfg: CRATEConfig, drop_path: float = 0.0) -> None:
        super().__init__(
            cfg.dim,
            cfg.heads,
            cfg.dim_head,
            cfg.attn_kind,
            cfg.feedforward,
            dropout=cfg.dropout,
            attn_impl=cfg.attn_impl,
            drop_path=drop_path,
            step_size=cfg.ista,
            lambd=cfg.lambd,
            mlp_hidden=cfg.mlp_hidden,
        )


class CRATE(WhiteBoxBackbone):
    """The CRATE vision transformer. Accepts the original constructor arguments unchanged::

    CRATE(image_size=224, patch_size=16, num_classes=1000, dim=384, depth=12, heads=6, dropout=0.0,
          emb_dropout=0.0, dim_head=64, mlp_dim=384 * 4)

    ``mlp_dim`` is accepted and ignored: CRATE's ISTA block has no hidden width (its dictionary is ``dim x dim``),
    and the original code ignores it too (the MLP ablation's width is ``mlp_ratio``).
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
        super().__init__(config)

    def extra_repr(self) -> str:
        c = self.config
        extra = "" if c.variant == "CRATE" else f", variant={c.variant!r}"
        return super().extra_repr() + extra


# ---------------------------------------------------------------------------------------------- the family record
def activation_bytes(cfg: Any, amp: str | None, checkpointing: bool = False) -> int | None:
    """Activation bytes one image keeps for the backward pass (with activation checkpointing: each layer's input,
    plus one layer's activations recomputed at a time); calibrated on CRATE (MSSA + ISTA), None for the ablations.
    Per layer, with ``n`` tokens, width ``d``, ``h`` heads and inner width ``i``: float32 ``4 (6 n d + 3 n i)``,
    bf16/fp16 ``26 n d + 6 n i + 2 h n^2`` bytes."""
    if getattr(cfg, "attn_kind", "mssa") != "mssa" or getattr(cfg, "feedforward", "ista") != "ista":
        return None
    n = cfg.grid_size[0] * cfg.grid_size[1] + 1
    d, heads, inner = cfg.dim, cfg.heads, cfg.heads * cfg.dim_head
    if amp in ("bf16", "fp16"):
        per_layer = 26 * n * d + 6 * n * inner + 2 * heads * n * n
    else:
        per_layer = 4 * (6 * n * d + 3 * n * inner)
    image = 4 * cfg.channels * cfg.image_size[0] * cfg.image_size[1] * 2  # the batch and its normalised copy
    if checkpointing:
        return cfg.depth * 4 * n * d + per_layer + image
    return cfg.depth * per_layer + image


def read_shapes(state: Mapping[str, Tensor], heads: int | None = None) -> ShapeReading:
    """The :class:`CRATEConfig` of a state dict in our key layout, from its tensor shapes alone.

    dim, depth, channels, patch size, image size (square), class count, head layout (one or two stages) and the
    emergence paper's ablation (MHSA's ``attn.qkv`` or MSSA's U; ISTA's D, an MLP or nothing) come from the shapes;
    pooling is the class token, as in every released model. The head count is ``heads``, or 1 where there is no
    output projection and U is square; otherwise the shapes cannot tell it (``heads_read=False``).
    """
    pos = need(state, "pos_embed", 3)
    proj = need(state, "patch_embed.proj.weight", 2)
    attention = "mhsa" if "blocks.0.attn.qkv.weight" in state else "mssa"
    if attention == "mssa":
        inner = need(state, "blocks.0.mssa.subspace_proj.weight", 2).shape[0]
        out_proj = "blocks.0.mssa.out_proj.weight" in state
    else:
        inner, out_proj = need(state, "blocks.0.attn.qkv.weight", 2).shape[0] // 3, True
    feedforward = (
        "ista" if "blocks.0.ista.dictionary" in state else "mlp" if "blocks.0.mlp.fc1.weight" in state else "none"
    )
    dim, split, grid = pos.shape[2], split_patch_dim(proj.shape[1]), square_grid(pos)
    if split is None or grid is None:
        raise ShapeError(
            f"cannot read a square patch grid from {{0}} {tuple(pos.shape)} and {{1}} {tuple(proj.shape)}; pass "
            "arch= a CRATEConfig with the image and patch size",
            "pos_embed",
            "patch_embed.proj.weight",
        )
    channels, patch = split
    n_heads = backbone_heads(dim, inner, out_proj, heads)
    extra: dict[str, Any] = {"attn_kind": attention, "feedforward": feedforward}
    if feedforward == "mlp":
        extra["mlp_ratio"] = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
    cfg = CRATEConfig(
        **extra,
        image_size=grid * patch,
        patch_size=patch,
        channels=channels,
        dim=dim,
        depth=layer_count(state),
        **head_split(inner, n_heads),
        head_hidden_dim=state["pre_logits.weight"].shape[0] if "pre_logits.weight" in state else None,
        num_classes=class_count(state),
    )
    return ShapeReading(cfg, heads_read=n_heads is not None)


# The official CRATE code (model/crate.py of Ma-Lab-Berkeley/CRATE) names the layers ``transformer.layers.{i}``
# with ``[PreNorm(Attention), PreNorm(FeedForward)]``; the emergence demo adds a second head stage ``head``.
CRATE_KEYS = KeyTable(
    body=(
        ("pos_embedding", "pos_embed"),
        ("cls_token", "cls_token"),
        ("to_patch_embedding.1.{p}", "patch_embed.norm_in.{p}"),
        ("to_patch_embedding.2.{p}", "patch_embed.proj.{p}"),
        ("to_patch_embedding.3.{p}", "patch_embed.norm_out.{p}"),
        ("transformer.layers.{i}.0.norm.{p}", "blocks.{i}.norm1.{p}"),
        ("transformer.layers.{i}.0.fn.qkv.weight", "blocks.{i}.mssa.subspace_proj.weight"),
        ("transformer.layers.{i}.0.fn.to_out.0.{p}", "blocks.{i}.mssa.out_proj.{p}"),
        ("transformer.layers.{i}.1.norm.{p}", "blocks.{i}.norm2.{p}"),
        ("transformer.layers.{i}.1.fn.weight", "blocks.{i}.ista.dictionary"),
        ("mlp_head.0.{p}", "fc_norm.{p}"),
    ),
    head_one_stage=(("mlp_head.1.{p}", "head.{p}"),),
    head_two_stage=(("mlp_head.1.{p}", "pre_logits.{p}"), ("head.{p}", "head.{p}")),
    reference_markers=("transformer.layers.", "to_patch_embedding."),
    two_stage_reference_key="head.weight",
    two_stage_our_key="pre_logits.weight",
)
"""CRATE's key table: the official repository's names (``transformer.layers.{i}.0.fn.qkv``, ``mlp_head``), with
the emergence demo's two-stage head."""


FAMILY = Family(
    name="crate",
    model_cls=CRATE,
    config_cls=CRATEConfig,
    description="CRATE: white-box transformer via sparse rate reduction (Yu et al., NeurIPS 2023)",
    paper={
        "license": "mit",
        "paper_name": "White-Box Transformers via Sparse Rate Reduction",
        "paper_ids": "arXiv:2306.01129",
        "origin_url": "https://github.com/Ma-Lab-Berkeley/CRATE",
    },
    card=Card(
        title="a CRATE white-box vision transformer",
        paper_url="https://arxiv.org/abs/2306.01129",
        blurb="CRATE, a white-box vision transformer: every layer is one step of sparse rate reduction "
        "(multi-head subspace self-attention compresses, one ISTA step sparsifies).",
        license="mit",
    ),
    code_kind=lambda cfg: "output" if getattr(cfg, "feedforward", "ista") == "ista" else None,
    pretrained_cfg=geometry_cfg,
    activation_bytes=activation_bytes,
    key_table=CRATE_KEYS,
    shape_reader=read_shapes,
    head_facts=backbone_head_facts,
    with_heads=backbone_with_heads,
)
"""CRATE's family record (registered by :mod:`cratevit.registry`)."""
