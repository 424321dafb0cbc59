"""The architectures: one file per family, each importing torch alone (no I/O, no hub, no timm).

* :mod:`.crate`: CRATE (Yu et al., NeurIPS 2023), the fast formulation;
* :mod:`.reference`: the literal reference formulation of CRATE (tests and benchmarks compare against it);
* :mod:`.crate_alpha`: CRATE-alpha (Yang et al., 2024): overcomplete two-step ISTA, decoupled decoder, residual;
* :mod:`.crate_mae`: CRATE-MAE (Pai et al., ICLR 2024), the white-box masked autoencoder;
* :mod:`.reference_alpha`: the literal formulation of CRATE-alpha, in the official release's module names.

A family is registered (model class, config class, key table, trace method) in :mod:`cratevit.registry`.
"""

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
from .reference import ReferenceCRATE
from .reference_alpha import ReferenceCRATEAlpha

__all__ = [
    "CRATE",
    "CRATEMAE",
    "ISTA",
    "MAE_PRESETS",
    "MSSA",
    "AlphaLayerTrace",
    "CRATEAlpha",
    "CRATEAlphaConfig",
    "CRATEBlock",
    "CRATEConfig",
    "CRATEMAEConfig",
    "CRATEMAETrace",
    "CRATETrace",
    "LayerTrace",
    "PatchEmbed",
    "ReferenceCRATE",
    "ReferenceCRATEAlpha",
    "alpha_forward_flops",
    "forward_flops",
    "geometry_cfg",
    "to_2tuple",
]
