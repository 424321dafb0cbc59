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
from ..version import __version__
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


def _project_url() -> str | None:
    """This project's address as its package metadata declares it (``[project.urls]``), if it does."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        urls = metadata("cratevit").get_all("Project-URL") or []
    except PackageNotFoundError:
        return None
    return urls[0].split(",", 1)[-1].strip() if urls else None


def _shape_line(cfg: Any) -> str:
    """``12 layers, width 384, 6 heads of 64, 16x16 patches at 224x224 px, `` from the fields a config has."""
    parts = []
    if hasattr(cfg, "depth") and hasattr(cfg, "dim"):
        parts.append(f"{cfg.depth} layers, width {cfg.dim}")
    if hasattr(cfg, "heads") and hasattr(cfg, "dim_head"):
        parts.append(f"{cfg.heads} heads of {cfg.dim_head}")
    if hasattr(cfg, "patch_size") and hasattr(cfg, "image_size"):
        parts.append(f"{cfg.patch_size[0]}x{cfg.patch_size[1]} patches at {cfg.image_size[1]}x{cfg.image_size[0]} px")
    return "".join(f"{p}, " for p in parts)


def model_card(model: nn.Module) -> str:
    """The ``README.md`` of a ``save_pretrained`` folder: what the model is, how to load it and feed it, and
    where it comes from (the paper, the original code, this project)."""
    cfg, prep = model.config, _pretrained_cfg(model)
    n_params = sum(p.numel() for p in model.parameters())
    names = prep.get("label_names") or []
    n_classes = int(getattr(cfg, "num_classes", 0) or 0)
    classes = f"{n_classes} classes" + (f": {', '.join(map(str, names))}" if 0 < len(names) <= 20 else "")
    record = family_for(model)
    family, card = record.name, record.card
    project = _project_url()
    made_with = f"[cratevit]({project})" if project else "cratevit (`pip install cratevit`)"
    crop = prep.get("crop_pct", 1.0)
    size = cfg.image_size
    resize = f"Resize({int(size[0] / crop)}) + CenterCrop({size[0]})" if crop < 1 else f"resize to {size[1]}x{size[0]}"
    license_id = card.license if card else record.paper.get("license", "other")
    pipeline = card.pipeline_tag if card else "image-classification"
    tags = card.tags if card else ("vision", "white-box")
    loader = card.loader if card else record.model_cls.__name__
    paper = record.paper
    source = (
        f" Paper: [{paper['paper_name']}]({card.paper_url}); original code: <{paper['origin_url']}>."
        if card and "paper_name" in paper and "origin_url" in paper
        else ""
    )
    lines = [
        "---",
        "library_name: cratevit",
        f"license: {license_id}",
        f"pipeline_tag: {pipeline}",
        f"tags: [{', '.join(tags)}]",
        "---",
        "",
        f"# {getattr(cfg, 'name', None) or family}: {card.title if card else record.description}",
        "",
        (card.blurb if card else record.description) + source,
        "",
        "## This model",
        "",
        f"- family {family}; {_shape_line(cfg)}{n_params:,} parameters",
        f"- classifier: {classes} ({'class token' if getattr(cfg, 'pool', 'cls') == 'cls' else 'mean token'})"
        if n_classes
        else "- no classifier (an encoder / autoencoder)",
        f"- input: RGB, {resize} ({prep.get('interpolation', 'bilinear')}), mean {tuple(prep.get('mean', ()))}, "
        f"std {tuple(prep.get('std', ()))}",
        "",
        "## Use",
        "",
        "```python",
        f"from cratevit.models import {loader}",
        f'model = {loader}.from_pretrained("THIS_FOLDER_OR_HUB_ID")   # eval mode, weights loaded strictly',
        "",
        *(
            [
                "",
                "import cratevit, timm                                    # or through timm",
                'model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True)',
                "```",
                "",
                "`cratevit predict THIS_FOLDER IMAGE...` prints the top-5 classes of images.",
            ]
            if record.classifier
            else ["```"]
        ),
        "",
        f"Made with {made_with}, version {__version__}.",
    ]
    return "\n".join(lines) + "\n"


def save_folder(model: nn.Module, folder: str | Path) -> Path:
    """Write ``model.safetensors``, ``config.json`` and a model card ``README.md`` into ``folder`` (created if
    needed); an existing README.md is kept."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / WEIGHTS_NAME, model)
    text = json.dumps(hub_config(model), indent=2, sort_keys=True)
    with atomic_path(folder / CONFIG_NAME) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    if not (folder / "README.md").exists():
        with atomic_path(folder / "README.md") as tmp:
            tmp.write_text(model_card(model), encoding="utf-8")
    return folder
