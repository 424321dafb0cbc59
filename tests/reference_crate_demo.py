"""The emergence-demo model ``CRATE_base_demo`` as the demo code builds it, for the tests.

The demo code builds the reference CRATE, then replaces ``mlp_head`` with LayerNorm(dim) -> Linear(dim, hidden)
and adds a separate ``head`` = Linear(hidden, classes); there is no activation between the two Linear layers. Its
``forward`` still returns ``mlp_head(x)`` (the ``hidden``-wide pre-logits); the class logits are
``head(forward(x))``.
"""

from __future__ import annotations

from torch import nn

from reference_crate import ReferenceCRATE


class ReferenceDemoCRATE(ReferenceCRATE):
    def __init__(self, *, hidden, num_classes, dim, **kw):
        super().__init__(num_classes=num_classes, dim=dim, **kw)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden))
        self.head = nn.Linear(hidden, num_classes)

    def logits(self, img):
        return self.head(self(img))
