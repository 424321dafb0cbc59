"""Named configurations and their metadata, as data: family, configuration, preprocessing, timm name.

This module is the ONE source of truth for preprocessing (mean/std, crop, interpolation):

* :data:`PRESET_INFO` gives each preset's :class:`Preprocessing` (what the released weights expect, and what
  ``timm.data.resolve_data_config`` reads through ``pretrained_cfg``);
* :data:`DATA_PREPROCESSING` gives the normalisation each kind of training data uses; the engine records it in
  every checkpoint, so a model trained on the built-in digits exports and analyses with 0.5/0.5.

The original code's names (``CRATE_tiny``) resolve to ours (``crate_tiny``) case-insensitively.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .errors import UserError
from .models import MAE_PRESETS, TOST_PRESETS, CRATEAlphaConfig, CRATEConfig, CRATEMAEConfig, ToSTConfig
from .registry import family_for, get_family

__all__ = [
    "DATA_PREPROCESSING",
    "HALF",
    "IMAGENET",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "PRESET_INFO",
    "Preprocessing",
    "Preset",
    "classifier_presets",
    "data_preprocessing",
    "get_config",
    "list_models",
    "merged_pretrained_cfg",
    "preprocessing_for",
    "pretrained_cfg_for",
    "register_preset",
    "resolve_name",
    "timm_name",
    "timm_name_for",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm's IMAGENET_DEFAULT_MEAN / _STD
"""ImageNet's per-channel mean (RGB), timm's ``IMAGENET_DEFAULT_MEAN``."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""ImageNet's per-channel standard deviation (RGB), timm's ``IMAGENET_DEFAULT_STD``."""


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for a model: timm's ``mean``, ``std``, ``crop_pct``, ``interpolation``."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875  # Resize(224 / 0.875 = 256) + CenterCrop(224), the reference recipe
    interpolation: str = "bilinear"  # torchvision's default, which the reference used

    def to_cfg(self) -> dict[str, Any]:
        return {
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "crop_pct": self.crop_pct,
            "crop_mode": "center",
            "interpolation": self.interpolation,
        }


IMAGENET = Preprocessing()
"""The reference evaluation: ImageNet mean/std, Resize(256) + CenterCrop(224), bilinear."""
IMAGENET_NO_CROP = Preprocessing(crop_pct=1.0)  # small images (32 px) are used without a crop
HALF = Preprocessing((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), crop_pct=1.0)  # the built-in digits and shapes data
"""Mean and std 0.5 per channel, no crop: the built-in digits and shapes data."""

# The normalisation of each kind of training data (cratevit.data.DataInfo.kind); other kinds use ImageNet's.
DATA_PREPROCESSING: Mapping[str, Preprocessing] = {"digits": HALF, "shapes": HALF}
"""The normalisation of each kind of training data (``DataInfo.kind``); other kinds use ImageNet's."""


@dataclass(frozen=True)
class Preset:
    """A named configuration of an architecture family and the preprocessing its weights expect."""

    name: str
    config: Any  # the family's config class
    preprocessing: Preprocessing
    family: str = "crate"


PRESET_INFO: dict[str, Preset] = {}
"""Preset name -> :class:`Preset` (family, configuration, preprocessing), filled by :func:`register_preset`."""
PRESETS: dict[str, CRATEConfig] = {}  # name -> configuration (every family's), the view most code needs
"""Preset name -> configuration, of every family: the view most code needs."""
_ALIASES: dict[str, str] = {}


def register_preset(
    name: str,
    cfg: Any,
    aliases: tuple[str, ...] = (),
    preprocessing: Preprocessing | None = None,
    family: str | None = None,
) -> Any:
    """Register ``cfg`` under ``name`` (its family is that of the config class unless given)."""
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    family = family or family_for(cfg).name
    get_family(family)
    cfg = cfg.replace(name=name)
    if preprocessing is None:
        preprocessing = IMAGENET if min(cfg.image_size) >= 128 else IMAGENET_NO_CROP
    PRESET_INFO[name] = Preset(name, cfg, preprocessing, family)
    PRESETS[name] = cfg
    for alias in aliases:
        _ALIASES[alias.lower()] = name
    return cfg


def _vit(
    name: str,
    dim: int,
    heads: int,
    depth: int,
    patch: int = 16,
    image: int = 224,
    preprocessing: Preprocessing | None = None,
    **kw: Any,
) -> None:
    register_preset(
        name,
        CRATEConfig(image_size=image, patch_size=patch, dim=dim, depth=depth, heads=heads, dim_head=dim // heads, **kw),
        aliases=(name.upper(), "CRATE_" + name.removeprefix("crate_")),
        preprocessing=preprocessing,
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
_vit("crate_digits", 96, 3, 6, patch=8, image=32, num_classes=10, preprocessing=HALF)  # `cratevit train`: 16 tokens

# The emergence paper's ablations (Yu et al. 2023, arXiv 2308.16271, Table 2) and attention-only stacks: the same
# backbone with the attention (attn_kind: MSSA | MHSA) and the second half (ISTA | MLP | none) chosen. Each at the digits scale
# (crate_digits' sizes; `cratevit train --arch NAME`) and at the paper's base size with 8x8 patches.
ABLATIONS: dict[str, tuple[str, str]] = {
    "crate_mlp": ("mssa", "mlp"),  # CRATE-MLP: ISTA replaced by the ViT's MLP
    "crate_mhsa": ("mhsa", "ista"),  # CRATE-MHSA: MSSA replaced by standard q/k/v attention
    "crate_vit": ("mhsa", "mlp"),  # a ViT inside the white-box backbone (MHSA + MLP, timm's key names)
    "crate_mssa_only": ("mssa", "none"),  # MSSA layers alone
    "crate_mhsa_only": ("mhsa", "none"),  # MHSA layers alone
}
for _stem, (_attention, _feedforward) in ABLATIONS.items():
    _vit(f"{_stem}_digits", 96, 3, 6, patch=8, image=32, num_classes=10, preprocessing=HALF, attn_kind=_attention,
         feedforward=_feedforward)  # fmt: skip
    _vit(f"{_stem}_base_patch8", 768, 12, 12, patch=8, attn_kind=_attention, feedforward=_feedforward)


# CRATE-alpha (Yang et al., 2024): the sizes of the paper at 224 px, 1000 classes; "_in21k": the ImageNet-21K
# pre-training heads of the released files (19,167 classes, configs/crate/classification/pre_training_in21k.py).
# Evaluation as in the official ImageNet-1K config: short side to 256, centre crop 224, ImageNet mean/std (the
# JAX pipeline resizes with "area", the released PyTorch eval script with torchvision's bilinear default).
ALPHA_IN21K_CLASSES = 19167


def _alpha(
    name: str,
    dim: int,
    heads: int,
    depth: int,
    patch: int,
    image: int = 224,
    preprocessing: Preprocessing | None = None,
    **kw: Any,
) -> None:
    cfg = CRATEAlphaConfig(
        image_size=image, patch_size=patch, dim=dim, depth=depth, heads=heads, dim_head=dim // heads, **kw
    )
    register_preset(name, cfg, preprocessing=preprocessing)


for _size, (_dim, _heads, _depth, _patches) in {
    "b": (768, 12, 12, (32, 16, 8)),
    "l": (1024, 16, 24, (32, 14, 8)),
}.items():
    for _patch in _patches:
        _alpha(f"crate_alpha_{_size}{_patch}", _dim, _heads, _depth, _patch, preprocessing=IMAGENET)
        _alpha(
            f"crate_alpha_{_size}{_patch}_in21k",
            _dim,
            _heads,
            _depth,
            _patch,
            preprocessing=IMAGENET,
            num_classes=ALPHA_IN21K_CLASSES,
        )

# Small CRATE-alpha presets: the built-in digits (`cratevit train --arch crate_alpha_digits`: crate_digits' depth
# and 16 tokens at dim 64, 4 heads of 16; its 4x-wide dictionaries make a step ~1.5x crate_digits') and tests.
_alpha("crate_alpha_digits", 64, 4, 6, 8, image=32, num_classes=10, preprocessing=HALF)
_alpha("crate_alpha_debug", 32, 2, 2, 8, image=32, num_classes=10)

# CRATE-MAE (family crate_mae): the official mae_crate_* sizes (patch 16, 224 px, decoder as wide and deep as the
# encoder, lambda 0.5), and small ones that pretrain in a minute or two on the built-in data.
for _name, _cfg in MAE_PRESETS.items():
    register_preset(_name, _cfg)
register_preset(
    "mae_crate_digits",
    CRATEMAEConfig(
        image_size=32,
        patch_size=4,
        dim=96,
        depth=3,
        heads=3,
        dim_head=32,
        decoder_depth=3,
        decoder_heads=3,
        decoder_dim_head=32,
    ),
    preprocessing=HALF,
)
register_preset(
    "mae_crate_shapes",
    CRATEMAEConfig(
        image_size=64,
        patch_size=8,
        dim=96,
        depth=3,
        heads=3,
        dim_head=32,
        decoder_depth=3,
        decoder_heads=3,
        decoder_dim_head=32,
    ),
    preprocessing=HALF,
)


# ToST (Wu et al., ICLR 2025; family tost): the official registered names and sizes (tost_vision/tost.py: 224 px,
# 1000 classes), evaluated as the official datasets.py does (short side 256 bicubic, centre crop 224, ImageNet
# mean/std); tost_digits / tost_shapes for the built-in data (crate_digits' and crate_nano's sizes: 16 and 64 tokens).
TOST_BICUBIC = Preprocessing(interpolation="bicubic")
for _name, _fields in TOST_PRESETS.items():
    _small = _name in ("tost_digits", "tost_shapes")
    register_preset(
        _name,
        ToSTConfig(**_fields),
        preprocessing=HALF if _small else TOST_BICUBIC if _fields.get("image_size", 224) >= 128 else IMAGENET_NO_CROP,
    )


def resolve_name(name: str) -> str:
    """The registered preset a name means: exact, else case- and dash-insensitive (``CRATE_small`` -> ``crate_small``);
    a one-line error listing the known presets otherwise."""
    if name in PRESETS:
        return name
    key = name.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key in PRESETS:
        return key
    by_timm_name = {timm_name(p): p for p in PRESETS}  # a timm name, as timm's train.py records ("arch")
    if key in by_timm_name:
        return by_timm_name[key]
    raise UserError(f"unknown CRATE preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")


def get_config(name: str, **overrides: Any) -> CRATEConfig:
    """The preset's configuration with ``overrides`` applied (``None`` values are ignored)."""
    cfg = PRESETS[resolve_name(name)]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return cfg.replace(**overrides) if overrides else cfg


def list_models() -> list[str]:
    """The names of every registered preset, sorted."""
    return sorted(PRESETS)


def classifier_presets() -> list[str]:
    """The presets of image-classifier families (timm models): every preset but the autoencoders'."""
    return sorted(n for n, info in PRESET_INFO.items() if get_family(info.family).classifier)


# --------------------------------------------------------------------------------------------- preprocessing
def data_preprocessing(kind: str | None) -> Preprocessing:
    """The normalisation a kind of training data uses (``digits``/``shapes``: 0.5; others ImageNet's)."""
    return DATA_PREPROCESSING.get(kind or "", IMAGENET)


def preprocessing_for(config: Any) -> Preprocessing:
    """A configuration's preprocessing: its preset's (when it has a preset's name and input size), else ImageNet's
    (crop 0.875 from 128 px up, no crop below); non-RGB inputs are normalised with 0.5."""
    preset = PRESET_INFO.get(getattr(config, "name", None) or "")
    by_size = IMAGENET if min(config.image_size) >= 128 else IMAGENET_NO_CROP
    prep = by_size if preset is None else preset.preprocessing
    if preset is not None and preset.config.image_size != config.image_size:
        prep = replace(prep, crop_pct=by_size.crop_pct)
    channels = int(config.channels)
    if channels != len(prep.mean):
        prep = Preprocessing((0.5,) * channels, (0.5,) * channels, prep.crop_pct, prep.interpolation)
    return prep


def pretrained_cfg_for(config: Any, preprocessing: Preprocessing | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """timm's per-weight metadata for a configuration: geometry, preprocessing and the family's paper fields."""
    family = family_for(config)
    if preprocessing is None:
        preprocessing = preprocessing_for(config)
    prep = preprocessing.to_cfg() if isinstance(preprocessing, Preprocessing) else dict(preprocessing)
    return {
        **family.pretrained_cfg(config),
        **{k: tuple(v) if isinstance(v, list) else v for k, v in prep.items()},
        **family.paper,
    }


# timm's pretrained_cfg keys that say where weights come from; a saved folder must not point back to its source.
_SOURCE_KEYS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "tag")


def merged_pretrained_cfg(stored: Mapping[str, Any] | None, config: Any) -> dict[str, Any]:
    """Stored per-weight metadata (mean/std, crop ...) with the input size and class count of ``config``."""
    current = pretrained_cfg_for(config)
    merged = {**current, **{k: v for k, v in dict(stored or {}).items() if k not in _SOURCE_KEYS}}
    merged.update({k: current[k] for k in ("input_size", "fixed_input_size", "num_classes")})
    return {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items() if k != "architecture"}


# --------------------------------------------------------------------------------------------- timm names
def timm_name(preset: str) -> str:
    """``crate_tiny`` (224 px, patch 16) -> ``crate_tiny_patch16_224``."""
    cfg = PRESETS[preset]
    (ph, pw), (h, w) = cfg.patch_size, cfg.image_size
    patch = f"patch{ph}" if ph == pw else f"patch{ph}x{pw}"
    size = f"{h}" if h == w else f"{h}x{w}"
    named = f"_{patch}" in preset or (ph == pw and re.search(rf"_[a-z]{ph}(_|$)", preset))  # crate_alpha_b16
    return f"{preset}_{size}" if named else f"{preset}_{patch}_{size}"


def timm_name_for(cfg: Any) -> str:
    """The timm name to record for a configuration: its preset's, else an equal preset's, else the first preset of
    its family (crate_tiny for CRATE).

    (A saved folder records every configuration field in ``model_args``, so the base name only picks defaults.)
    """
    if cfg.name in PRESETS:
        return timm_name(cfg.name)
    family = family_for(cfg).name
    same = [name for name, info in PRESET_INFO.items() if info.family == family]
    equal = [name for name in same if PRESETS[name] == cfg]
    return timm_name(equal[0] if equal else "crate_tiny" if family == "crate" else same[0])
