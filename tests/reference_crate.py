"""The literal reference formulation, re-exported from :mod:`cratevit.models.reference` for the tests."""

from cratevit.models.reference import Attention, FeedForward, PreNorm, ReferenceCRATE, Transformer

__all__ = ["Attention", "FeedForward", "PreNorm", "ReferenceCRATE", "Transformer"]
