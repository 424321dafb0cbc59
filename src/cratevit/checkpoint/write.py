"""Writing checkpoints: atomically (a crash or kill while writing leaves the previous file intact).

* :func:`save_checkpoint`: our self-describing ``torch.save`` layout (format tag, family, configuration,
  ``pretrained_cfg`` with the preprocessing, weights, and whatever the caller adds);
* :func:`save_safetensors`: the weights as ``.safetensors`` with the configuration in the metadata;
* :func:`save_folder`: a Hugging Face folder (``config.json`` in timm's layout + ``model.safetensors``), which
  :mod:`cratevit.interop.hub` completes with a model card.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..presets import merged_pretrained_cfg, timm_name_for
from ..registry import family_for
from .keys import to_reference_keys
from .read import CONFIG_NAME, FORMAT, WEIGHTS_NAME

__all__ = [
    "atomic_path",
    "atomic_save",
    "checkpoint_dict",
    "hub_config",
    "save_checkpoint",
    "save_folder",
    "save_safetensors",
]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it (with the usual new-file permissions) when the block
    succeeds and removed otherwise: a crash or kill while writing leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def _pretrained_cfg(model: nn.Module) -> dict[str, Any]:
    """The model's preprocessing metadata, checked against its configuration (plain values only)."""
    return merged_pretrained_cfg(getattr(model, "pretrained_cfg", None), model.config)


def checkpoint_dict(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """Our checkpoint layout: format tag, family, configuration, preprocessing, weights, and what the caller adds."""
    return {
        "format": FORMAT,
        "format_version": 1,
        "model_family": family_for(model).name,
        "config": model.config.to_dict(),
        "pretrained_cfg": _pretrained_cfg(model),
        "model": model.state_dict(),
        **extra,
    }


def save_checkpoint(path: str | Path, model: nn.Module, **extra: Any) -> Path:
    """Write a self-describing cratevit checkpoint atomically."""
    return atomic_save(checkpoint_dict(model, **extra), path)


def save_safetensors(path: str | Path, model: nn.Module, reference_keys: bool = False) -> Path:
    """Write the weights as safetensors with the configuration in the metadata (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    family = family_for(model).name
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if reference_keys:
        state = to_reference_keys(state, family)
    metadata = {
        "format": FORMAT,
        "model_family": family,
        "config": json.dumps(model.config.to_dict()),
        "pretrained_cfg": json.dumps(_pretrained_cfg(model)),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def hub_config(model: nn.Module) -> dict[str, Any]:
    """The ``config.json`` content for ``model``: timm's hub layout plus ``model_type`` (the family name)."""
    cfg = model.config
    return {
        "model_type": family_for(model).name,
        "library_name": "cratevit",
        "architecture": timm_name_for(cfg),
        "num_classes": cfg.num_classes,
        "num_features": model.num_features,
        "global_pool": "avg" if getattr(cfg, "pool", "cls") == "mean" else "token",
        "model_args": cfg.to_dict(),
        "pretrained_cfg": _pretrained_cfg(model),
    }


def save_folder(model: nn.Module, folder: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``folder`` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / WEIGHTS_NAME, model)
    text = json.dumps(hub_config(model), indent=2, sort_keys=True)
    with atomic_path(folder / CONFIG_NAME) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return folder
