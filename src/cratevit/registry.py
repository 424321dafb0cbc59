"""Architecture families: the one place that lists them. Each model file in :mod:`cratevit.models` ends with its
family record (:class:`cratevit.models.family.Family`: classes, card, license, pretrained_cfg geometry, timm
keywords, activation memory, trace and code kinds, training objective, the key table of its foreign layout and
the shape reader of bare state dicts); this module registers those records, and
everything above this layer (checkpoint loading, timm and Hub interop, the engine, analysis) asks it, never a model
file and never ``isinstance`` on a family's class (``tests/project/test_layers.py`` enforces the first).

* presets (:mod:`cratevit.presets`) name their family;
* checkpoint files record it (``"family"``; files without it are CRATE files), and :mod:`cratevit.checkpoint.keys`
  reads each record's key table (``Family.key_table``) to tell a file's family and layout apart;
* ``trace`` names the model method that returns every layer's intermediates.

Adding a family: see ``docs/architecture.md`` ("Adding a family").
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import UserError
from .models import crate, crate_alpha, crate_mae, tost
from .models.family import Card, Family

__all__ = [
    "Card",
    "Family",
    "code_kind",
    "ddp_prepare",
    "families",
    "family_for",
    "get_family",
    "is_autoencoder",
    "is_family_model",
    "layer_count",
    "layer_description",
    "layer_label",
    "mask_sampler",
    "objective",
    "register_family",
    "to_classifier",
    "trace_blocks",
    "trace_method",
]


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add an architecture family (once per name); loading, saving, timm and the CLI find it from here."""
    if family.name in _FAMILIES:
        raise ValueError(f"architecture family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, Family]:
    """Every registered family by name (a copy)."""
    return dict(_FAMILIES)


def get_family(name: str) -> Family:
    """The registered family of that name; a one-line error listing the known ones otherwise."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise UserError(
            f"unknown architecture family {name!r}; this cratevit knows {', '.join(sorted(_FAMILIES))}"
        ) from None


def is_family_model(obj: Any) -> bool:
    """Whether ``obj`` is a model of a registered family (as opposed to, e.g., a timm ViT baseline)."""
    return any(isinstance(obj, family.model_cls) for family in _FAMILIES.values())


def trace_method(model: nn.Module) -> Any:
    """The model's bound trace method (its family's ``trace``: every layer's intermediates), or a clear error."""
    family = family_for(model)
    if family.trace is None:
        raise UserError(f"{family.name} models have no trace method; the analysis needs per-layer intermediates")
    return getattr(model, family.trace)


def family_for(obj: Any) -> Family:
    """The family of a model or a configuration (by its class; the most derived one when a family's classes
    subclass another's, as a test family may subclass CRATE's)."""
    for cls in type(obj).__mro__:
        for family in _FAMILIES.values():
            if cls in (family.model_cls, family.config_cls):
                return family
    raise UserError(f"{type(obj).__name__} belongs to no registered architecture family ({', '.join(_FAMILIES)})")


def objective(obj: Any) -> str:
    """What a model (or configuration) of this family trains with: ``"classification"`` or
    ``"masked_autoencoding"`` (the training engine's question)."""
    return family_for(obj).objective


def is_autoencoder(model: nn.Module) -> bool:
    """Whether the model is a masked autoencoder of a registered family (an encoder and a decoder)."""
    return is_family_model(model) and family_for(model).objective == "masked_autoencoding"


def to_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """A classifier built from an autoencoder's encoder (its family's conversion), for fine-tuning."""
    family = family_for(model)
    if family.to_classifier is None:
        raise UserError(f"{family.name} models have no encoder to turn into a classifier")
    return family.to_classifier(model, num_classes)


def mask_sampler(model: nn.Module) -> Any:
    """The random patch masking of an autoencoder's family: ``(batch, num_patches, mask_ratio, generator=None)``
    -> (b, n) booleans, True where a patch is masked (what the masked-autoencoding objective draws)."""
    family = family_for(model)
    if family.mask_sampler is None:
        raise UserError(f"{family.name} models are not masked autoencoders: they take no patch mask")
    return family.mask_sampler


def ddp_prepare(model: nn.Module, device_type: str) -> nn.Module:
    """The model made ready for DistributedDataParallel on ``device_type`` ("cuda", "cpu" ...) by its family (ToST:
    its BatchNorm becomes SyncBatchNorm on accelerators); other models unchanged."""
    return family_for(model).ddp_prepare(model, device_type) if is_family_model(model) else model


def trace_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks whose layers the model's trace records, in order: ``trace.layers[i]`` is block ``i``'s (CRATE:
    ``model.blocks``; ToST: its TSSA blocks, then its class-attention blocks)."""
    return list(family_for(model).trace_blocks(model))


def layer_count(model: nn.Module) -> int:
    """How many layers the analysis can read (``--layer`` ranges over them): the trace's blocks for a family model
    (ToST: its TSSA blocks and its class-attention blocks), ``len(model.blocks)`` for a timm ViT."""
    return len(trace_blocks(model)) if is_family_model(model) else len(model.blocks)


def layer_description(model: nn.Module, layer: int) -> str:
    """The family's words for layer ``layer`` (0-based, negative from the end), as ``"; blocks.3, TSSA: ..."`` to
    append after a layer number, or ``""`` where the family has none (every layer is a block ``blocks.i``)."""
    describe = family_for(model).layer_label if is_family_model(model) else None
    return f"; {describe(model, layer % layer_count(model))}" if describe else ""


def layer_label(model: nn.Module, layer: int) -> str:
    """What layer ``layer`` is and what its attention map shows, for titles: ``"layer 3 (0-based)"``, or with the
    family's own words (ToST: ``"layer 3 (0-based; blocks.3, TSSA: head membership Pi)"``)."""
    index = layer % layer_count(model)
    describe = family_for(model).layer_label if is_family_model(model) else None
    return f"layer {index} (0-based{'; ' + describe(model, index) if describe else ''})"


def code_kind(model: nn.Module) -> str | None:
    """Where the model's sparse code is: ``"output"`` (the layer's output, CRATE's ISTA), ``"trace"``
    (``LayerTrace.code``, CRATE-alpha's ``A_2``) or None (no ISTA step: MLP or attention-only ablations)."""
    return family_for(model).code_kind(model.config)


for _record in (crate.FAMILY, crate_alpha.FAMILY, crate_mae.FAMILY, tost.FAMILY):
    register_family(_record)
