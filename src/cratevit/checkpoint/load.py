"""The one front door from "a name, a file or a folder" to a model with its weights.

* :func:`load_model`: a preset name (random weights), a checkpoint file of any kind of
  :data:`~cratevit.checkpoint.read.FILE_KINDS` (also a Hub *file* ``hf-hub:OWNER/REPO/PATH``, read through
  huggingface_hub's cache), or a ``save_pretrained`` folder. A Hub *repository* ``user/repo`` is not read here:
  ``CRATE.from_pretrained("user/repo")`` (:mod:`cratevit.interop.hub`) downloads it and calls :func:`load_folder`;
* :func:`load_checkpoint`: a checkpoint file (``arch=``/``heads=`` for files that do not record their architecture);
* :func:`create_model`: a preset, optionally with other sizes and a checkpoint's weights (fine-tuning);
* :func:`load_folder`: a ``save_pretrained`` folder (``CRATE.from_pretrained`` uses it).

Loading is strict: every tensor of the file is used and none of the model's is missing; errors name the key in
our layout and in the file's. Every model built here carries its preprocessing in ``model.pretrained_cfg``: what
the file records, else what its training data used, else its preset's (:mod:`cratevit.presets`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, CratevitWarning, UserError
from ..presets import (
    PRESET_INFO,
    PRESETS,
    data_preprocessing,
    get_config,
    merged_pretrained_cfg,
    pretrained_cfg_for,
    resolve_name,
)
from ..registry import family_for, get_family
from .hubfile import hub_file, is_hub_file
from .infer import recorded_preset, resolve_config
from .keys import KeyNamer, key_namer
from .read import CONFIG_NAME, read_checkpoint, read_folder

__all__ = [
    "HEAD_KEYS",
    "create_model",
    "load_checkpoint",
    "load_folder",
    "load_into",
    "load_model",
    "load_state_dict_strict",
    "non_finite_keys",
    "pretrained_cfg_from_meta",
    "warn_non_finite",
]

HEAD_KEYS = ("head.weight", "head.bias")
"""The classifier's tensors, replaced when a checkpoint is loaded for another class count."""


def load_state_dict_strict(
    model: nn.Module,
    state: Mapping[str, Tensor],
    drop_head: bool = False,
    source: str = "",
    name_in_file: KeyNamer | None = None,
    hint: str | None = None,
    assign: bool = False,
) -> None:
    """Load ``state`` (our key layout) into ``model``: every key used, none missing, every shape equal.

    ``assign=True`` (a model built on the meta device) gives the model fresh copies of the file's tensors, in the
    model's dtypes, as its parameters: the random initialisation is skipped. (Fresh copies, not the file's own
    tensors: a safetensors buffer may be unaligned, and BLAS then rounds differently.)

    With ``drop_head=True`` a classifier of another shape is skipped and the model's fresh head kept.
    ``name_in_file`` maps our key to the file's name for it, so errors name both. ``hint`` replaces the default
    advice (another architecture) when the caller knows better, e.g. the model came from the file's own description.
    """
    own = model.state_dict()
    state = dict(state)
    if drop_head:
        for k in HEAD_KEYS:
            if k in state and (k not in own or state[k].shape != own[k].shape):
                del state[k]
    missing = [k for k in own if k not in state and not (drop_head and k in HEAD_KEYS)]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        + (f" ({name_in_file(k)} in the file)" if name_in_file and name_in_file(k) != k else "")
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch " + "; ".join(wrong[:6]) + (" ..." if len(wrong) > 6 else ""))
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{what} {keys[:6]}" + (" ..." if len(keys) > 6 else ""))
                names = [name_in_file(k) for k in keys[:6]] if name_in_file else keys[:6]
                if names != keys[:6]:
                    parts[-1] += f" (in the file: {names})"
        hint = hint or (
            "the checkpoint is for another architecture; build the matching preset, or load it with "
            "load_checkpoint(path, arch='auto')"
            if not drop_head
            else "the checkpoint body does not match this architecture"
        )
        only_head = not missing and not unexpected and all(w.split(":")[0] in HEAD_KEYS for w in wrong)
        if only_head:
            hint = (
                "the classifier has another class count; pass num_classes (create_model(name, num_classes=N, "
                "checkpoint=FILE)): the file's count keeps its classifier, another re-initialises it"
            )
        where = f"{source}: " if source else ""
        raise CheckpointError(f"{where}checkpoint does not fit the model ({'; '.join(parts)}); {hint}")
    with torch.no_grad():
        if assign:
            state = {k: v.to(own[k].dtype, copy=True) for k, v in state.items()}  # fresh, aligned memory
        model.load_state_dict(state, strict=not drop_head, assign=assign)
    if assign and any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise RuntimeError(f"{type(model).__name__} kept tensors on the meta device after loading (a bug)")


def pretrained_cfg_from_meta(meta: Mapping[str, Any], config: Any) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` for a model read from a file: the file's own record (mean/std, crop ...), else the
    normalisation of the data it was trained on (``train_config``), else its preset's."""
    stored = meta.get("pretrained_cfg")
    if isinstance(stored, Mapping):
        return merged_pretrained_cfg(stored, config)
    train_config = meta.get("train_config")
    if isinstance(train_config, Mapping) and train_config.get("data") is not None:
        kind = "dummy" if train_config.get("dummy") else str(train_config["data"])
        return pretrained_cfg_for(config, data_preprocessing(kind))
    return pretrained_cfg_for(config)


def _set_pretrained_cfg(model: nn.Module, cfg: dict[str, Any]) -> nn.Module:
    model.pretrained_cfg = model.default_cfg = cfg
    return model


def _build(config: Any, family: str = "crate") -> nn.Module:
    return get_family(family).build(config)


def load_into(model: nn.Module, path: str | Path, drop_head: bool = False) -> dict[str, Any]:
    """Load the weights of ``path`` into ``model`` strictly; returns the file's other contents."""
    state, _, meta = read_checkpoint(path)
    namer = key_namer(meta, state, meta.get("model_family", "crate"))
    load_state_dict_strict(model, state, drop_head=drop_head, source=str(path), name_in_file=namer)
    return meta


def _misfit_hint(arch: Any, stored: Any, meta: Mapping[str, Any]) -> str | None:
    """What a strict-load misfit means, given where the configuration came from (None: the default advice)."""
    if arch is not None and arch != "auto":
        return None
    if arch is None and stored is None and recorded_preset(meta) is not None:
        return (
            f"the file's arch entry {meta['arch']!r} does not fit its tensors: the file is damaged, or load it "
            f"with load_checkpoint(path, arch='auto') to read the architecture from the shapes"
        )
    return "the file is damaged or incomplete: its tensors do not match the architecture it describes"


def load_checkpoint(path: str | Path, arch: Any = None, heads: int | None = None, **overrides: Any) -> nn.Module:
    """Build the model a checkpoint describes and load its weights strictly; any family of ``FAMILIES``.

    ``arch``: a preset name, a configuration object, or ``"auto"`` (read the architecture from the tensor
    shapes). By default the file's stored configuration is used, else its ``arch`` entry, else ``"auto"``.
    ``heads`` gives the head count where shapes cannot (6 heads of 128 and 12 of 64 have the same tensors).
    ``overrides`` change the configuration (e.g. ``dynamic_img_size=True``). ``path`` may be a Hub file,
    ``hf-hub:OWNER/REPO/PATH`` (``hf-hub:UCSC-VLAA/CRATE-alpha/torch/crate_alpha_B16.pth``): it is downloaded once
    into huggingface_hub's cache, which is all that is read with ``HF_HUB_OFFLINE=1``.

    The model comes back in evaluation mode, ready for inference, as ``from_pretrained`` returns it (and the Hub
    does); call ``model.train()`` before fine-tuning it.
    """
    if is_hub_file(str(path)):
        path = hub_file(str(path))
    state, stored, meta = read_checkpoint(path)
    cfg = resolve_config(path, state, stored, meta, arch=arch, heads=heads)
    if overrides:
        cfg = cfg.replace(**overrides)
    family = meta.get("model_family", "crate")
    with torch.device("meta"):  # the file provides every tensor: skip the random initialisation
        model = family_for(cfg).build(cfg)  # the configuration's family (arch= may name another than the file's)
    hint = _misfit_hint(arch, stored, meta)
    if family != family_for(cfg).name:
        hint = (
            f"the file holds a {family} model, not a {family_for(cfg).name} one; load it without arch= (the file "
            "says what it is)"
        )
    namer = key_namer(meta, state, family)
    load_state_dict_strict(model, state, source=str(path), name_in_file=namer, hint=hint, assign=True)
    warn_non_finite(state, path)
    return _set_pretrained_cfg(model, pretrained_cfg_from_meta(meta, model.config)).eval()


def non_finite_keys(state: Mapping[str, Tensor]) -> list[str]:
    """The floating-point tensors that hold NaN or infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]


def warn_non_finite(state: Mapping[str, Tensor], path: str | Path) -> list[str]:
    """Warn (one line) when a checkpoint's weights hold NaN or infinity: the model's outputs will be NaN."""
    bad = non_finite_keys(state)
    if bad:
        warnings.warn(
            f"{path} holds non-finite weights (NaN or infinity in {len(bad)} of {len(state)} tensors, "
            f"e.g. {bad[0]}): the model's outputs will not be numbers; use an earlier checkpoint",
            CratevitWarning,
            stacklevel=3,
        )
    return bad


def load_folder(
    folder: str | Path, config: dict[str, Any] | None = None, weights: str | Path | None = None, **overrides: Any
) -> nn.Module:
    """A ``save_pretrained`` folder -> the model, in eval mode.

    ``overrides`` name configuration fields (``num_classes=`` re-initialises the classifier;
    ``dynamic_img_size=True`` allows other input sizes). ``config``/``weights``: see :func:`read_folder`."""
    state, cfg, meta = read_folder(folder, config=config, weights=weights)
    fields = set(type(cfg).__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"unknown CRATE.from_pretrained arguments {unknown}; CRATE config fields are {sorted(fields)}")
    model = _build(cfg.replace(**overrides) if overrides else cfg, meta["model_family"])
    _set_pretrained_cfg(model, merged_pretrained_cfg(meta.get("pretrained_cfg"), model.config))
    source = str(weights or Path(folder) / "model.safetensors")
    load_state_dict_strict(model, state, drop_head="num_classes" in overrides, source=source)
    warn_non_finite(state, folder)
    return model.eval()


def create_model(
    name: str,
    num_classes: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    patch_size: int | tuple[int, int] | None = None,
    checkpoint: str | Path | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a preset, optionally with other class count / image size / patch size, and load weights.

    With ``checkpoint``, the file is loaded strictly; if ``num_classes`` differs from the checkpoint's head, the
    head is dropped and re-initialised (fine-tuning).
    """
    key = resolve_name(name)
    cfg = get_config(key, num_classes=num_classes, image_size=image_size, patch_size=patch_size, **overrides)
    model = _set_pretrained_cfg(_build(cfg, PRESET_INFO[key].family), pretrained_cfg_for(cfg))
    if checkpoint is not None:
        meta = load_into(model, checkpoint, drop_head=num_classes is not None)
        _set_pretrained_cfg(model, pretrained_cfg_from_meta(meta, model.config))
    return model


def load_model(source: str | Path, arch: Any = None, heads: int | None = None, **overrides: Any) -> nn.Module:
    """The front door: a checkpoint file, a ``save_pretrained`` folder or a preset name (random weights).
    (Hub ids ``user/repo`` are fetched by :func:`cratevit.interop.hub.from_pretrained`, which then calls
    :func:`load_folder`.) ``arch``/``heads``: for files that do not record their architecture; ``overrides``
    change the configuration. A missing file gets a clear error. A Hub file ``hf-hub:OWNER/REPO/PATH`` is read
    through huggingface_hub's cache (:func:`load_checkpoint`)."""
    if is_hub_file(source):
        return load_checkpoint(str(source), arch=arch, heads=heads, **overrides)
    path = Path(source)
    if path.is_file():
        return load_checkpoint(path, arch=arch, heads=heads, **overrides)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return load_folder(path, **overrides)
    try:
        name = resolve_name(str(source))
    except UserError:
        if path.is_dir():
            raise FileNotFoundError(
                f"{source} is a folder without {CONFIG_NAME}; pass a checkpoint file or a folder written by "
                f"save_pretrained / `cratevit export --format hf`"
            ) from None
        if path.suffix or len(path.parts) > 1:
            raise FileNotFoundError(f"checkpoint file not found: {source}") from None
        raise UserError(
            f"{source!r} is neither a checkpoint file nor a preset; pass a checkpoint path or one of "
            f"{', '.join(sorted(PRESETS))}"
        ) from None
    return create_model(name, **overrides)
