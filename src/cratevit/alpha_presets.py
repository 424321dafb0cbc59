"""CRATE-alpha's named configurations (the sizes of the paper and of the released files)."""

from __future__ import annotations

from typing import Any

from .models.crate_alpha import CRATEAlphaConfig

__all__ = ["ALPHA_PRESETS", "IN21K_CLASSES"]

# The ImageNet-21K pre-training head of the official configs (configs/crate/classification/pre_training_in21k.py:
# num_classes = 19167, the winter-2021 release of ImageNet-21K).
IN21K_CLASSES = 19167

ALPHA_PRESETS: dict[str, CRATEAlphaConfig] = {}


def _alpha(name: str, dim: int, depth: int, heads: int, patch: int, image: int = 224, **kw: Any) -> None:
    ALPHA_PRESETS[name] = CRATEAlphaConfig(
        image_size=image, patch_size=patch, dim=dim, depth=depth, heads=heads, dim_head=dim // heads, name=name, **kw
    )


for _size, (_dim, _depth, _heads) in {"b": (768, 12, 12), "l": (1024, 24, 16)}.items():
    for _patch in (32, 16, 8) if _size == "b" else (32, 14, 8):
        _alpha(f"crate_alpha_{_size}{_patch}", _dim, _depth, _heads, _patch)
        _alpha(f"crate_alpha_{_size}{_patch}_in21k", _dim, _depth, _heads, _patch, num_classes=IN21K_CLASSES)

# Small presets for 32 px inputs: the built-in digits (`cratevit train --arch crate_alpha_digits`) and tests.
_alpha("crate_alpha_digits", 96, 6, 3, 8, image=32, num_classes=10)
_alpha("crate_alpha_debug", 32, 2, 2, 8, image=32, num_classes=10)
