"""Named CRATE configurations and ``create_model``.

A preset is a :class:`CRATEConfig` registered under a name; the original code's names (``CRATE_tiny``) resolve
to ours (``crate_tiny``) case-insensitively.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .model import CRATE, CRATEConfig

__all__ = ["PRESETS", "create_model", "get_config", "list_models", "register_preset", "resolve_name"]

PRESETS: dict[str, CRATEConfig] = {}
_ALIASES: dict[str, str] = {}


def register_preset(name: str, cfg: CRATEConfig, aliases: tuple[str, ...] = ()) -> CRATEConfig:
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    PRESETS[name] = cfg.replace(name=name)
    for alias in aliases:
        _ALIASES[alias.lower()] = name
    return PRESETS[name]


def _vit(name: str, dim: int, heads: int, depth: int, patch: int = 16, image: int = 224, **kw: Any) -> None:
    register_preset(
        name,
        CRATEConfig(image_size=image, patch_size=patch, dim=dim, depth=depth, heads=heads, dim_head=dim // heads, **kw),
        aliases=(name.upper(), "CRATE_" + name.removeprefix("crate_")),
    )


# ImageNet-1K presets of the paper (224 px, patch 16, 1000 classes).
_vit("crate_tiny", 384, 6, 12)
_vit("crate_small", 576, 12, 12)
_vit("crate_base", 768, 12, 12)
_vit("crate_large", 1024, 16, 24)

# The same sizes with 8x8 patches (784 patch tokens at 224 px), like the emergence-demo models below.
_vit("crate_tiny_patch8", 384, 6, 12, patch=8)
_vit("crate_small_patch8", 576, 12, 12, patch=8)
_vit("crate_base_patch8", 768, 12, 12, patch=8)
_vit("crate_large_patch8", 1024, 16, 24, patch=8)

# The emergence-demo models (ImageNet-21k, 21,842 classes, 8x8 patches; see cratevit.zoo). CRATE_base_demo has
# 6 heads of 128 and a two-stage head: LayerNorm -> Linear(768, 768) -> Linear(768, 21842), no activation.
_vit("crate_base_demo", 768, 6, 12, patch=8, num_classes=21842, head_hidden_dim=768)
_vit("crate_small_21k", 384, 6, 12, patch=8, num_classes=21842)
_vit("crate_base_21k", 768, 12, 12, patch=8, num_classes=21842)
_vit("crate_base_768", 768, 12, 12, patch=8, num_classes=768)

# Small presets for 32 px inputs (CIFAR, the built-in digits data) and for tests.
_vit("crate_debug", 32, 2, 2, patch=8, image=32, num_classes=10)
_vit("crate_nano", 96, 3, 6, patch=4, image=32, num_classes=10)
_vit("crate_micro", 192, 6, 8, patch=4, image=32, num_classes=10)
_vit("crate_digits", 96, 3, 6, patch=8, image=32, num_classes=10)  # `cratevit train` default: 16 tokens


def resolve_name(name: str) -> str:
    if name in PRESETS:
        return name
    key = name.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key in PRESETS:
        return key
    raise ValueError(f"unknown CRATE preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")


def get_config(name: str, **overrides: Any) -> CRATEConfig:
    """The preset's configuration with ``overrides`` applied (``None`` values are ignored)."""
    cfg = PRESETS[resolve_name(name)]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return cfg.replace(**overrides) if overrides else cfg


def list_models() -> list[str]:
    return sorted(PRESETS)


def create_model(
    name: str,
    num_classes: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    patch_size: int | tuple[int, int] | None = None,
    checkpoint: str | Path | None = None,
    **overrides: Any,
) -> CRATE:
    """Build a preset, optionally with other class count / image size / patch size, and load weights.

    With ``checkpoint``, the file is loaded strictly; if ``num_classes`` differs from the checkpoint's head, the
    head is dropped and re-initialised (fine-tuning).
    """
    cfg = get_config(name, num_classes=num_classes, image_size=image_size, patch_size=patch_size, **overrides)
    model = CRATE(config=cfg)
    if checkpoint is not None:
        from .checkpoint import load_into

        load_into(model, checkpoint, drop_head=num_classes is not None)
    return model
