"""The architectures: one file per family, each importing torch alone (no I/O, no hub, no timm).

* :mod:`.crate`: CRATE (Yu et al., NeurIPS 2023), the fast formulation;
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
from .reference import ReferenceCRATE

__all__ = [
    "CRATE",
    "ISTA",
    "MSSA",
    "CRATEBlock",
    "CRATEConfig",
    "CRATETrace",
    "LayerTrace",
    "PatchEmbed",
    "ReferenceCRATE",
    "forward_flops",
    "geometry_cfg",
    "to_2tuple",
]
