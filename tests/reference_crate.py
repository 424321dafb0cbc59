"""The literal reference formulation, re-exported from :mod:`cratevit.reference` for the tests."""

from cratevit.reference import Attention, FeedForward, PreNorm, ReferenceCRATE, Transformer

__all__ = ["Attention", "FeedForward", "PreNorm", "ReferenceCRATE", "Transformer"]
