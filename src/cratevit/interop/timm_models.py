"""Every cratevit preset as a timm model: ``timm.create_model("crate_small_patch16_224", num_classes=10)``.

Importing :mod:`cratevit` registers the presets under timm-style names (``crate_tiny_patch16_224``,
``crate_debug_patch8_32``, ...), each with a ``pretrained_cfg`` (input size, mean/std, crop, interpolation,
classifier name) so that ``timm.data.resolve_data_config`` + ``timm.data.create_transform`` give the right
preprocessing (from :mod:`cratevit.presets`). timm's keyword arguments map onto
:class:`~cratevit.models.CRATEConfig`:

==================================  ============================
timm                                CRATEConfig
==================================  ============================
``num_classes``                     ``num_classes``
``in_chans``                        ``channels``
``img_size``                        ``image_size``
``global_pool`` (token/avg)         ``pool`` (cls/mean)
``drop_rate``, ``proj_drop_rate``   ``dropout``
``pos_drop_rate``                   ``emb_dropout``
``drop_path_rate``                  ``drop_path_rate`` (not in the paper: stochastic depth on the MSSA branch)
==================================  ============================

Any :class:`CRATEConfig` field may also be passed by its own name (``dim=``, ``ista=``, ``dynamic_img_size=``).
Weights given to timm (``pretrained_cfg_overlay=dict(file=PATH)``, ``local-dir:``/``hf-hub:`` folders) go through
:func:`checkpoint_filter_fn`, which also accepts the reference implementation's key layout.

timm keeps its registry in module-level tables and reads each module's ``default_cfgs``; that table is the one
piece of module state here, filled once per preset by :func:`register_timm_models`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import is_model as timm_is_model
from torch import Tensor, nn

from ..checkpoint.keys import from_reference_keys, state_family, strip_prefix
from ..checkpoint.read import read_checkpoint
from ..errors import UserError
from ..presets import PRESET_INFO, PRESETS, pretrained_cfg_for, timm_name, timm_name_for
from ..registry import get_family

__all__ = ["checkpoint_filter_fn", "register_timm_models", "timm_name", "timm_name_for"]

default_cfgs: dict[str, Any] = {}  # timm's per-module pretrained-config table (see the module docstring)

_POOL = {"token": "cls", "cls": "cls", "avg": "mean", "mean": "mean"}


def _config_from_timm_kwargs(preset: str, kwargs: dict[str, Any]) -> Any:
    """Translate timm's keyword arguments into the configuration of ``preset``, through its family's
    ``timm_kwargs`` (timm's name -> the configuration's field)."""
    kwargs = dict(kwargs)
    family = get_family(PRESET_INFO[preset].family)
    changes: dict[str, Any] = {}
    for timm_key, ours in family.timm_kwargs.items():
        if timm_key not in kwargs:
            continue
        value = kwargs.pop(timm_key)
        if ours == "pool":
            if value not in _POOL:
                raise UserError(
                    f"global_pool must be 'token' (or 'cls') or 'avg' (or 'mean') for {family.name}, got {value!r}"
                )
            value = _POOL[value]
        changes[ours] = value
    fields = set(type(PRESETS[preset]).__dataclass_fields__)
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise UserError(
            f"{timm_name(preset)} does not take {unknown}; it takes timm's {', '.join(family.timm_kwargs)} or "
            f"{family.name} config fields {sorted(fields)}"
        )
    changes.update(kwargs)
    changes.setdefault("name", preset)  # a saved folder records its own name (None: not a preset)
    return PRESETS[preset].replace(**changes)  # explicit None values count (head_hidden_dim=None)


def _build(preset: str, **kwargs: Any) -> nn.Module:
    return get_family(PRESET_INFO[preset].family).build(_config_from_timm_kwargs(preset, kwargs))


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module | None = None) -> dict[str, Tensor]:
    """timm's weight filter: a cratevit or reference checkpoint (dict or state_dict) -> our key layout."""
    for key in ("model", "state_dict"):  # our checkpoints, the reference's main.py / finetune.py files
        if isinstance(state_dict.get(key), Mapping):
            state_dict = state_dict[key]
    family, layout = state_family(state_dict)  # CRATE's or CRATE-alpha's official layout, or ours
    if layout == "reference":
        return from_reference_keys(state_dict, family)
    return strip_prefix(state_dict)


def _classes_in_file(path: str) -> int | None:
    """The class count of a weights file's classifier (None: the file has no ``head``)."""
    state, _, _ = read_checkpoint(path)
    head = state.get("head.weight")
    return int(head.shape[0]) if head is not None and head.ndim == 2 else None


def _overlay_with_file_classes(preset: str, kwargs: dict[str, Any]) -> None:
    """``pretrained_cfg_overlay=dict(file=...)``: record the file's class count in the overlay.

    timm keeps a classifier only when the model's class count equals ``pretrained_cfg["num_classes"]``, which
    would otherwise be the preset's (1000): a fine-tuned 3-class head loaded with ``num_classes=3`` was silently
    re-initialised. Now ``num_classes`` equal to the file's keeps the head, another value re-initialises it
    (fine-tuning), and leaving it out when the counts differ is a one-line error.
    """
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if not overlay.get("file") or "num_classes" in overlay:
        return
    in_file = _classes_in_file(overlay["file"])
    if in_file is None:
        return
    if "num_classes" not in kwargs and in_file != PRESETS[preset].num_classes:
        raise UserError(
            f"{overlay['file']} has a {in_file}-class classifier, {timm_name(preset)} has "
            f"{PRESETS[preset].num_classes}; pass num_classes={in_file} to load the file's classifier, or another "
            f"num_classes to re-initialise it"
        )
    kwargs["pretrained_cfg_overlay"] = {**overlay, "num_classes": in_file}


def _create(preset: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm entry point body: timm handles pretrained_cfg and weights, :func:`_build` the configuration."""
    if pretrained:
        _overlay_with_file_classes(preset, kwargs)
    for ours, timm_key in (("image_size", "img_size"), ("channels", "in_chans")):
        if ours in kwargs:  # use timm's names so that timm's defaults and traits see them
            kwargs[timm_key] = kwargs.pop(ours)
    depth = int(kwargs.get("depth", PRESETS[preset].depth))
    feature_cfg = {"out_indices": min(3, depth), "feature_cls": "getter"}  # features_only: the last 3 layers
    return build_model_with_cfg(
        partial(_build, preset),
        timm_name(preset),
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        **kwargs,
    )


def _entrypoint(preset: str) -> Callable[..., nn.Module]:
    name = timm_name(preset)

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create(preset, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"CRATE preset {preset!r} ({PRESETS[preset].dim} dim, depth {PRESETS[preset].depth})."
    return entrypoint


def register_timm_models() -> list[str]:
    """Register every classifier preset not yet known to timm; returns the timm names registered by this call.

    A name timm already knows from another library is left alone (never overwritten). Families that are not
    image classifiers (CRATE-MAE) are not timm models.
    """
    added = []
    for preset in sorted(PRESETS):
        if not get_family(PRESET_INFO[preset].family).classifier:
            continue
        name = timm_name(preset)
        if name in default_cfgs or timm_is_model(name):
            continue
        preset_cfg = pretrained_cfg_for(PRESETS[preset], PRESET_INFO[preset].preprocessing)
        default_cfgs.update(generate_default_cfgs({name: preset_cfg}))
        register_model(_entrypoint(preset))
        added.append(name)
    return added


register_timm_models()
