"""The architectures: one file per family, each importing torch alone (no I/O, no hub, no timm).

* :mod:`.crate`: CRATE (Yu et al., NeurIPS 2023), the fast formulation;
* :mod:`.crate_mae`: CRATE-MAE (Pai et al., ICLR 2024), the white-box masked autoencoder;
* :mod:`.reference`: the literal reference formulation of CRATE (tests and benchmarks compare against it).

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
from .crate_mae import CRATEMAE, MAE_PRESETS, CRATEMAEConfig, CRATEMAETrace
from .reference import ReferenceCRATE

__all__ = [
    "CRATE",
    "CRATEMAE",
    "ISTA",
    "MAE_PRESETS",
    "MSSA",
    "CRATEBlock",
    "CRATEConfig",
    "CRATEMAEConfig",
    "CRATEMAETrace",
    "CRATETrace",
    "LayerTrace",
    "PatchEmbed",
    "ReferenceCRATE",
    "forward_flops",
    "geometry_cfg",
    "to_2tuple",
]
