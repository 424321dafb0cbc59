"""Architecture families: what the rest of cratevit needs to know about each model file in :mod:`cratevit.models`.

A family is one model class and its configuration class. Everything above this layer (checkpoint loading, timm
and Hub interop, the engine, analysis) finds the class to build for a configuration or a preset here, never by
importing a model file directly:

* presets (:mod:`cratevit.presets`) name their family;
* checkpoint files record it (``"family"``; files without it are CRATE files), and :mod:`cratevit.checkpoint.keys`
  holds one key table per family;
* ``trace`` names the model method that returns every layer's intermediates (:meth:`CRATE.forward_trace`).

Adding a family: a file in ``models/``, one :func:`register_family` call below, its key table in
``checkpoint/keys.py`` and its presets in ``presets.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import UserError
from .models import CRATE, CRATEMAE, CRATEAlpha, CRATEAlphaConfig, CRATEConfig, CRATEMAEConfig

__all__ = ["Family", "families", "family_for", "get_family", "is_family_model", "register_family", "trace_method"]


@dataclass(frozen=True)
class Family:
    """One architecture family."""

    name: str  # recorded in checkpoints and presets ("crate")
    model_cls: type[nn.Module]  # built as model_cls(config=config)
    config_cls: type  # a dataclass with to_dict() / from_dict() / replace() and a ``name`` field
    description: str
    trace: str | None = "forward_trace"  # method returning per-layer intermediates (None: the family has none)
    classifier: bool = True  # an image classifier (timm registration, the model contract); False: e.g. an autoencoder
    paper: dict[str, Any] = field(default_factory=dict)  # timm's pretrained_cfg paper fields

    def build(self, config: Any) -> nn.Module:
        return self.model_cls(config=config)


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
    subclass another's, as CRATE-alpha's subclass CRATE's)."""
    for cls in type(obj).__mro__:
        for family in _FAMILIES.values():
            if cls in (family.model_cls, family.config_cls):
                return family
    raise UserError(f"{type(obj).__name__} belongs to no registered architecture family ({', '.join(_FAMILIES)})")


register_family(
    Family(
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
    )
)

register_family(
    Family(
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
    )
)

register_family(
    Family(
        name="crate_mae",
        model_cls=CRATEMAE,
        config_cls=CRATEMAEConfig,
        description="CRATE-MAE: white-box masked autoencoder (Pai et al., ICLR 2024)",
        classifier=False,
        paper={
            "license": "mit",
            "paper_name": "Masked Completion via Structured Diffusion with White-Box Transformers",
            "paper_ids": "https://openreview.net/forum?id=PvyOYleymy",
            "origin_url": "https://github.com/Ma-Lab-Berkeley/CRATE",
        },
    )
)
