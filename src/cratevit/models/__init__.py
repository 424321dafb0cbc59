"""The architectures: shared blocks, one backbone, one file per family, each importing torch alone (no I/O, no hub,
no timm).

* :mod:`.blocks`: patch embeddings, MSSA, MHSA, ISTA (CRATE's, CRATE-alpha's overcomplete), MLP, DropPath, the
  composed :class:`WhiteBoxBlock` and its :class:`LayerTrace`;
* :mod:`.backbone`: :class:`WhiteBoxBackbone` (embedding, block loop, trace, pooling, head, timm's contract);
* :mod:`.crate`: CRATE (Yu et al., NeurIPS 2023) and the emergence paper's ablations (CRATE-MLP, CRATE-MHSA, ViT,
  attention-only) as configurations;
* :mod:`.reference`: the literal reference formulation of CRATE (tests and benchmarks compare against it);
* :mod:`.crate_alpha`: CRATE-alpha (Yang et al., 2024): overcomplete two-step ISTA, decoupled decoder, residual;
* :mod:`.crate_mae`: CRATE-MAE (Pai et al., ICLR 2024), the white-box masked autoencoder;
* :mod:`.reference_alpha`: the literal formulation of CRATE-alpha, in the official release's module names;
* :mod:`.tost`: ToST (Wu et al., ICLR 2025): Token Statistics Self-Attention, linear in the tokens, with
  class-attention blocks; :mod:`.reference_tost` its literal formulation in the official module names;
* :mod:`.family`: the record each model file ends with (``FAMILY``), registered by :mod:`cratevit.registry`;
  :mod:`.key_table` the :class:`KeyTable` a record holds for its foreign weight layout, :mod:`.shapes` what the
  records' shape readers share (reading a bare state dict's configuration off its tensor shapes);
* :mod:`.contract`: :class:`~.contract.TimmContract`, timm's model contract shared by the backbone and ToST.

Hub methods (``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``) are attached to every family's class by
:mod:`cratevit.interop.hub`, which this package may not import (layers run downwards). Importing
``cratevit.models`` imports the package ``cratevit`` first, whose import hook runs ``cratevit.interop.hub`` right
after this package has loaded; so ``from cratevit.models import CRATE`` always finds them.
"""

from .backbone import BackboneConfig, WhiteBoxBackbone, WhiteBoxTrace
from .blocks import MHSA, MLP, OvercompleteISTA, WhiteBoxBlock
from .crate import (
    CRATE,
    ISTA,
    MSSA,
    CRATEBlock,
    CRATEConfig,
    CRATETrace,
    LayerTrace,
    PatchEmbed,
    forward_flops,
    geometry_cfg,
    to_2tuple,
)
from .crate_alpha import AlphaLayerTrace, CRATEAlpha, CRATEAlphaConfig, alpha_forward_flops
from .crate_mae import CRATEMAE, MAE_PRESETS, CRATEMAEConfig, CRATEMAETrace
from .family import Card, Family
from .key_table import KeyTable
from .reference import ReferenceCRATE
from .reference_alpha import ReferenceCRATEAlpha
from .shapes import ShapeError, ShapeReading
from .tost import TOST_PRESETS, ToST, ToSTConfig

__all__ = [
    "CRATE",
    "CRATEMAE",
    "ISTA",
    "MAE_PRESETS",
    "MHSA",
    "MLP",
    "MSSA",
    "TOST_PRESETS",
    "AlphaLayerTrace",
    "BackboneConfig",
    "CRATEAlpha",
    "CRATEAlphaConfig",
    "CRATEBlock",
    "CRATEConfig",
    "CRATEMAEConfig",
    "CRATEMAETrace",
    "CRATETrace",
    "Card",
    "Family",
    "KeyTable",
    "LayerTrace",
    "OvercompleteISTA",
    "PatchEmbed",
    "ReferenceCRATE",
    "ReferenceCRATEAlpha",
    "ShapeError",
    "ShapeReading",
    "ToST",
    "ToSTConfig",
    "WhiteBoxBackbone",
    "WhiteBoxBlock",
    "WhiteBoxTrace",
    "alpha_forward_flops",
    "forward_flops",
    "geometry_cfg",
    "to_2tuple",
]
