"""Hugging Face Hub and timm interoperability: ``save_pretrained`` / ``from_pretrained`` and ``pretrained_cfg``.

:class:`CRATEHubMixin` specialises huggingface_hub's ``PyTorchModelHubMixin`` for CRATE:

* ``model.save_pretrained(dir)`` writes ``model.safetensors`` (the weights, with the configuration in the file's
  metadata) and ``config.json`` in timm's layout (``architecture``, ``num_classes``, ``model_args``,
  ``pretrained_cfg``) plus ``"model_type": "crate"``, so the folder loads with ``CRATE.from_pretrained(dir)``,
  with ``timm.create_model("local-dir:DIR")`` and, once pushed, with ``timm.create_model("hf-hub:USER/REPO")``;
* ``CRATE.from_pretrained(dir_or_repo_id)`` reads that folder (or downloads it from the Hub when the network
  allows) and loads the weights strictly: every tensor used, none missing, every shape equal.

This module imports nothing from :mod:`cratevit.model` at import time (the model class inherits from the mixin).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import PyTorchModelHubMixin, constants, hf_hub_download
from huggingface_hub.utils import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    "CONFIG_NAME",
    "MODEL_TYPE",
    "WEIGHTS_NAME",
    "CRATEHubMixin",
    "check_hub_config",
    "hub_config",
    "merged_pretrained_cfg",
    "pretrained_cfg_for",
]

MODEL_TYPE = "crate"
CONFIG_NAME = constants.CONFIG_NAME  # config.json
WEIGHTS_NAME = constants.SAFETENSORS_SINGLE_FILE  # model.safetensors
IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # timm's constants
PAPER_URL = "https://arxiv.org/abs/2306.01129"
REPO_URL = "https://github.com/Ma-Lab-Berkeley/CRATE"
_HUB_ERRORS = (EntryNotFoundError, HFValidationError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError)
# timm's pretrained_cfg keys that say where weights come from; a saved folder must not point back to its source.
_SOURCE_KEYS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "tag")


def pretrained_cfg_for(config: Any) -> dict[str, Any]:
    """timm's per-weight metadata for a :class:`~cratevit.model.CRATEConfig`.

    The reference recipe: ImageNet mean/std, ``Resize(256) + CenterCrop(224)`` (crop 0.875) with torchvision's
    default bilinear interpolation. Small-image presets (32 px) are used without a crop (crop 1.0).
    """
    channels = int(config.channels)
    height, width = config.image_size
    mean = IMAGENET_MEAN if channels == 3 else (0.5,) * channels
    std = IMAGENET_STD if channels == 3 else (0.5,) * channels
    return {
        "input_size": (channels, height, width),
        "fixed_input_size": not config.dynamic_img_size,
        "interpolation": "bilinear",
        "crop_pct": 0.875 if min(height, width) >= 128 else 1.0,
        "crop_mode": "center",
        "mean": mean,
        "std": std,
        "num_classes": int(config.num_classes),
        "pool_size": None,
        # The first learned projection (patches in (p1, p2, c) order -> LayerNorm -> Linear). timm's in_chans
        # adaptation of pretrained weights is for Conv2d stems; for this Linear it re-initialises the layer.
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        "paper_name": "White-Box Transformers via Sparse Rate Reduction",
        "paper_ids": "arXiv:2306.01129",
        "origin_url": REPO_URL,
    }


def merged_pretrained_cfg(stored: Mapping[str, Any] | None, config: Any) -> dict[str, Any]:
    """Stored per-weight metadata (mean/std, crop ...) with the input size and class count of ``config``."""
    current = pretrained_cfg_for(config)
    merged = {**current, **{k: v for k, v in dict(stored or {}).items() if k not in _SOURCE_KEYS}}
    merged.update({k: current[k] for k in ("input_size", "fixed_input_size", "num_classes")})
    return {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items() if k != "architecture"}


def check_hub_config(data: Any, where: str) -> dict[str, Any]:
    """Raise one clear error when a loaded config.json is not a cratevit CRATE config."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} holds a {type(data).__name__}, not a model configuration object")
    if data.get("model_type") != MODEL_TYPE or not isinstance(data.get("model_args"), dict):
        arch = data.get("architecture") or data.get("architectures") or data.get("model_type") or "unknown"
        raise ValueError(
            f"{where} describes another architecture ({arch!r}), not a cratevit CRATE model "
            f'(expected "model_type": "crate" and "model_args"); load it with the library that wrote it, or '
            f"point CRATE.from_pretrained at a folder written by CRATE.save_pretrained / `cratevit export --format hf`"
        )
    return data


def hub_config(model: Any) -> dict[str, Any]:
    """The ``config.json`` content for ``model``: timm's hub layout plus ``model_type``."""
    from .timm_models import timm_name_for

    cfg = model.config
    pretrained_cfg = merged_pretrained_cfg(getattr(model, "pretrained_cfg", None), cfg)
    model_args = cfg.to_dict()
    return {
        "model_type": MODEL_TYPE,
        "library_name": "cratevit",
        "architecture": timm_name_for(cfg),
        "num_classes": cfg.num_classes,
        "num_features": model.num_features,
        "global_pool": "token" if cfg.pool == "cls" else "avg",
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    }


class CRATEHubMixin(
    PyTorchModelHubMixin,
    library_name="cratevit",
    license="mit",
    pipeline_tag="image-classification",
    paper_url=PAPER_URL,
    repo_url=REPO_URL,
    tags=["image-classification", "timm", "crate", "white-box-transformer"],
):
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for CRATE (huggingface_hub's mixin)."""

    def _save_pretrained(self, save_directory: Path) -> None:
        """Write ``model.safetensors`` and ``config.json`` (the mixin then adds a model card README.md)."""
        from .checkpoint import save_safetensors
        save_safetensors(save_directory / WEIGHTS_NAME, self)  # type: ignore[arg-type]
        text = json.dumps(hub_config(self), indent=2, sort_keys=True)
        (save_directory / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> Any:
        """Load a folder written by ``save_pretrained`` or a Hub repository id (``user/repo``).

        Keyword arguments that name :class:`~cratevit.model.CRATEConfig` fields override the stored configuration
        (``num_classes=`` re-initialises the classifier; ``dynamic_img_size=True`` allows other input sizes).
        """
        source = str(pretrained_model_name_or_path)
        looks_local = os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1
        if os.path.isdir(source):
            if not os.path.isfile(os.path.join(source, CONFIG_NAME)):
                raise FileNotFoundError(
                    f"{source} has no {CONFIG_NAME}; pass a folder written by CRATE.save_pretrained or "
                    f"`cratevit export --format hf` (training checkpoints load with cratevit.load_checkpoint)"
                )
        elif looks_local or os.path.exists(source):
            raise FileNotFoundError(
                f"{source} is not a folder; pass a folder written by CRATE.save_pretrained or a Hub id 'user/repo' "
                f"(single checkpoint files load with cratevit.load_checkpoint)"
            )
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except _HUB_ERRORS as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise FileNotFoundError(
                f"cannot fetch {source!r} from the Hugging Face Hub ({type(e).__name__}: {first[:160]}); check the "
                f"repo id and the network, or pass a local folder written by save_pretrained"
            ) from None

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: dict[str, Any] | None = None,
        map_location: str = "cpu",
        **model_kwargs: Any,
    ) -> Any:
        from .checkpoint import load_state_dict_strict, read_checkpoint
        from .model import CRATEConfig

        if not isinstance(config, dict):
            raise FileNotFoundError(f"{model_id} has no readable {CONFIG_NAME}; it was not written by save_pretrained")
        data = check_hub_config(config, f"{CONFIG_NAME} of {model_id}")
        # The mixin also passes every config.json entry as a keyword; only values that differ are user overrides.
        model_kwargs.pop("strict", None)  # PyTorchModelHubMixin's option; loading here is always strict
        overrides = {k: v for k, v in model_kwargs.items() if not (k in data and data[k] == v)}
        fields = set(CRATEConfig.__dataclass_fields__)
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(
                f"unknown CRATE.from_pretrained arguments {unknown}; CRATE config fields are {sorted(fields)}"
            )
        cfg = CRATEConfig.from_dict(data["model_args"])
        model = cls(config=cfg.replace(**overrides) if overrides else cfg)
        model.pretrained_cfg = model.default_cfg = merged_pretrained_cfg(data.get("pretrained_cfg"), model.config)
        weights = cls._weights_file(model_id, revision, cache_dir, force_download, local_files_only, token)
        state, _, _ = read_checkpoint(weights)
        drop_head = "num_classes" in overrides
        load_state_dict_strict(model, state, drop_head=drop_head, source=str(weights))  # type: ignore[arg-type]
        return model.to(map_location).eval()

    @staticmethod
    def _weights_file(
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
    ) -> Path:
        if os.path.isdir(model_id):
            path = Path(model_id) / WEIGHTS_NAME
            if not path.is_file():
                raise FileNotFoundError(f"{model_id} has {CONFIG_NAME} but no {WEIGHTS_NAME}; save the model again")
            return path
        return Path(
            hf_hub_download(repo_id=model_id, filename=WEIGHTS_NAME, revision=revision, cache_dir=cache_dir,
                            force_download=force_download, token=token, local_files_only=local_files_only)
        )  # fmt: skip
