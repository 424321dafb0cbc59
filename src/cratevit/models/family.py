"""The record a family keeps next to its model: everything the rest of cratevit asks of an architecture.

Each model file ends with one :class:`Family`; :mod:`cratevit.registry` only registers them, and every consumer
(checkpoint reading and writing, timm and Hub interop, the training engine, analysis) asks the registry, never a
model class. The record is torch-only data and functions of a configuration or a model:

* identity: ``name`` (recorded in checkpoints and presets), ``model_cls`` built as ``model_cls(config=cfg)``,
  ``config_cls`` (a dataclass with ``to_dict`` / ``from_dict`` / ``replace`` and a ``name`` field);
* what it does: ``objective`` (``"classification"`` or ``"masked_autoencoding"``: what the engine trains),
  ``classifier`` (an image classifier: timm registration and its model contract), ``trace`` (the method returning
  every layer's intermediates, or None), ``code_kind`` (where the sparse code of a layer is: see
  :meth:`Family.code_of`), ``code_editor`` (edited code -> the layer's output, for interventions);
* the card: :class:`Card` (blurb, license, pipeline tag, tags, the class that loads a saved folder) and the paper
  fields of timm's ``pretrained_cfg`` (``paper``; its license is the card's);
* ``pretrained_cfg(cfg)``: the part of timm's ``pretrained_cfg`` the configuration determines;
* ``timm_kwargs``: timm's ``create_model`` keyword -> the configuration's field;
* ``activation_bytes(cfg, amp, checkpointing)``: activation bytes one training image keeps, or None (unknown);
* ``key_table``: the :class:`~.key_table.KeyTable` of the family's foreign layout (its official code's names), or
  None where the family has no released files in another layout;
* ``shape_reader(state, heads)``: the configuration of a bare state dict from its tensor shapes alone, as a
  :class:`~.shapes.ShapeReading` (``heads_read`` False where the shapes cannot tell the head count); then
  ``head_facts(cfg)`` (what presets must share with it to lend their head count, in words) and
  ``with_heads(cfg, heads)`` (its projection split into ``heads``; None: the shapes always tell the heads).
  :mod:`cratevit.checkpoint.infer` does the preset part for every family alike: the head count from the presets
  with the same facts, the name of the preset the configuration equals;
* ``file_args``: fields of a file's recorded training ``args`` (FAIR MAE / DeiT ``main.py``) -> configuration
  fields they set (CRATE-MAE's mask ratio and loss target, ToST's image size);
* ``to_classifier(model, num_classes)``: an autoencoder's encoder as a classifier (fine-tuning);
* ``mask_sampler(batch, num_patches, mask_ratio, generator)``: an autoencoder's random patch mask (b, n) of
  booleans, True where a patch is masked (the training objective draws its seeded masks with it).
* ``ddp_prepare(model, device_type)``: the model made ready for DistributedDataParallel (ToST: SyncBatchNorm);
* ``forward_flops(cfg)``: analytic forward FLOPs per image (None: CRATE's, :func:`cratevit.models.forward_flops`);
* ``layer_label(model, index)``: what a traced layer is and what its attention map shows (None: the default);
* ``trace_blocks(model)``: the modules whose layers the trace records, in order (the analysis' layer indices).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .key_table import KeyTable
from .shapes import ShapeReading

__all__ = ["TIMM_KWARGS", "Card", "Family", "classifier_geometry"]

# timm's create_model keywords -> configuration fields (timm's Vision Transformer names; same-named fields such as
# num_classes, patch_size, drop_path_rate and dynamic_img_size pass through unchanged).
TIMM_KWARGS: dict[str, str] = {
    "in_chans": "channels",
    "img_size": "image_size",
    "pos_drop_rate": "emb_dropout",
    "drop_rate": "dropout",
    "proj_drop_rate": "dropout",
    "attn_drop_rate": "dropout",
    "global_pool": "pool",  # values "token" / "avg" are timm's "cls" / "mean"
}
"""timm's ``create_model`` keywords mapped onto configuration fields (the default of a family's ``timm_kwargs``)."""


def classifier_geometry(cfg: Any) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` geometry of an image classifier configuration with ``channels``, ``image_size``,
    ``num_classes`` (and optionally ``dynamic_img_size``): the default of a family that does not give its own."""
    size = tuple(cfg.image_size)
    return {
        "input_size": (int(cfg.channels), *size),
        "fixed_input_size": not getattr(cfg, "dynamic_img_size", False),
        "num_classes": int(cfg.num_classes),
        "pool_size": None,
        "first_conv": getattr(cfg, "first_conv", None),
        "classifier": "head" if int(cfg.num_classes) > 0 else None,
    }


@dataclass(frozen=True)
class Card:
    """What a saved folder's model card says about the family."""

    title: str  # the card's heading after the model's name ("a CRATE white-box vision transformer")
    blurb: str  # one paragraph: what the model is
    paper_url: str  # where the paper is read
    license: str  # SPDX-style id, as the Hub's card metadata
    pipeline_tag: str = "image-classification"  # the Hub's task ("image-feature-extraction" for an autoencoder)
    tags: tuple[str, ...] = ("image-classification", "vision", "white-box", "crate")
    loader: str = "CRATE"  # the class whose from_pretrained loads the folder (cratevit.models.<loader>)


@dataclass(frozen=True)
class Family:
    """One architecture family (module docstring)."""

    name: str
    model_cls: type[nn.Module]
    config_cls: type
    description: str
    trace: str | None = "forward_trace"
    classifier: bool = True
    paper: dict[str, Any] = field(default_factory=dict)  # timm's pretrained_cfg paper fields (license included)
    card: Card | None = None
    objective: str = "classification"  # or "masked_autoencoding"
    # Where a layer's sparse code is, as a function of the configuration: "output" (the layer's output is the
    # code, CRATE's ISTA), "trace" (LayerTrace.code, CRATE-alpha's A_2), None (no code: an MLP or no second half).
    code_kind: Callable[[Any], str | None] = lambda cfg: "output"
    code_editor: Callable[[nn.Module, Any, Any], Any] | None = None  # (block, z_half, code) -> the layer's output
    pretrained_cfg: Callable[[Any], dict[str, Any]] = classifier_geometry  # geometry part of timm's pretrained_cfg
    timm_kwargs: dict[str, str] = field(default_factory=lambda: dict(TIMM_KWARGS))
    activation_bytes: Callable[[Any, str | None, bool], int | None] = lambda cfg, amp, ckpt: None
    # (official name, our name) pairs of the family's foreign layout; None: its files come in our layout only.
    key_table: KeyTable | None = None
    # The shape reader for bare state dicts (our key layout): (state, heads) -> ShapeReading (shapes alone; None: a
    # bare state dict of this family needs arch=). What presets must share with a reading to lend it their head
    # count, and the configuration with its projection split into that many heads (None: shapes tell the heads).
    shape_reader: Callable[[Any, int | None], ShapeReading] | None = None
    head_facts: Callable[[Any], tuple[str, ...]] = lambda cfg: ()
    with_heads: Callable[[Any, int], Any] | None = None
    # A file's recorded training ``args`` (FAIR MAE / DeiT main.py) -> the configuration fields they set.
    file_args: dict[str, str] = field(default_factory=dict)
    # An autoencoder's encoder as a classifier (fine-tuning): (model, num_classes) -> classifier; None elsewhere.
    to_classifier: Callable[[nn.Module, int], nn.Module] | None = None
    # An autoencoder's random mask: (batch, num_patches, mask_ratio, generator=...) -> (b, n) bool; None elsewhere.
    mask_sampler: Callable[..., Any] | None = None
    # Before DistributedDataParallel wraps the model (the engine's multi-process runs): (model, device type such
    # as "cuda" or "cpu") -> the model to wrap.
    ddp_prepare: Callable[[nn.Module, str], nn.Module] = lambda model, device_type: model
    # Analytic forward FLOPs per image of a configuration; None: the white-box backbone's (models.forward_flops).
    forward_flops: Callable[[Any], int] | None = None
    # The blocks the trace's layers come from, in order (``trace.layers[i]`` is ``trace_blocks(model)[i]``'s).
    trace_blocks: Callable[[nn.Module], Any] = lambda model: model.blocks
    # For titles: (model, 0-based layer index) -> "blocks.3, TSSA: head membership Pi"; None: nothing to add.
    layer_label: Callable[[nn.Module, int], str] | None = None

    def build(self, config: Any) -> nn.Module:
        return self.model_cls(config=config)

    @property
    def license(self) -> str | None:
        return self.paper.get("license")
