"""Reading checkpoint files: the only ``torch.load`` and the only safetensors read of cratevit.

Kinds of files, recognised from the file's own structure (``meta["kind"]`` after :func:`read_checkpoint`; the
older key ``meta["family"]`` holds the same value; "family" alone means the architecture, ``meta["model_family"]``):

* ``cratevit``: ``torch.save`` of ``{"format": "cratevit", "config": {...}, "model": state_dict, ...}``;
* ``cratevit-safetensors``: our ``.safetensors`` export (the config is kept in the file's metadata);
* ``reference``: ImageNet-1K training checkpoints of the original ``main.py``: ``{"state_dict", "epoch",
  "arch", "best_acc1", "optimizer", "scheduler"}`` with ``module.`` prefixed keys;
* ``reference-finetune``: checkpoints of the original ``finetune.py``: ``{"model", "optimizer", "scaler"}``, keys
  prefixed ``module.`` (DataParallel);
* ``emergence-demo``: the emergence-demo models (``CRATE_base_demo``, ``CRATE_small_21k``, ``CRATE_base_21k``,
  ``CRATE_base_768``): weights under ``"model"``, keys without prefix; ``CRATE_base_demo`` has a two-stage head,
  ``mlp_head`` = LayerNorm -> Linear(768, 768), then ``head`` = Linear(768, 21842), no activation between;
* ``reference-state-dict`` / ``cratevit-state-dict``: a bare state_dict in either key layout; CRATE-alpha's
  released PyTorch files (``conv1.*``, ``transformer.layers.{i}.1.fn.D`` / ``D1``, ``mlp_head.*``) are bare
  state_dicts in the official CRATE-alpha layout.

The architecture family of a file without a stored configuration (``meta["model_family"]``) is the family whose
key table (:mod:`.keys`) names every tensor of the file.

Every file is read with ``torch.load(weights_only=True)`` (or safetensors): loading a checkpoint never runs code.
A Hugging Face folder (``config.json`` + ``model.safetensors``, written by ``save_pretrained``) is read by
:func:`read_folder`.
"""

from __future__ import annotations

import argparse
import json
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..registry import families, get_family
from .keys import from_reference_keys, state_family, strip_prefix

__all__ = [
    "CONFIG_NAME",
    "FAMILIES",
    "FILE_KINDS",
    "FORMAT",
    "WEIGHTS_NAME",
    "Peek",
    "check_hub_config",
    "check_zip_records",
    "config_from_dict",
    "load_file",
    "peek",
    "read_checkpoint",
    "read_folder",
    "read_safetensors",
    "stored_preprocessing",
]

FORMAT = "cratevit"
"""The format tag of cratevit's own checkpoint files (``obj["format"]``)."""
CONFIG_NAME = "config.json"  # huggingface_hub's constants.CONFIG_NAME
"""The configuration file of a ``save_pretrained`` folder."""
WEIGHTS_NAME = "model.safetensors"  # huggingface_hub's constants.SAFETENSORS_SINGLE_FILE
"""The weights file of a ``save_pretrained`` folder."""

FILE_KINDS: dict[str, str] = {
    "cratevit": "cratevit checkpoint: format tag, configuration, weights",
    "cratevit-safetensors": "cratevit .safetensors export (configuration in the metadata)",
    "cratevit-state-dict": "bare state_dict in the cratevit key layout",
    "reference": "original main.py (ImageNet-1K training): state_dict with module. keys, epoch, arch, optimizer",
    "reference-finetune": "original finetune.py: model with module. keys, optimizer, scaler",
    "emergence-demo": "model without prefix: the emergence-demo weights (CRATE_base_demo, CRATE_*_21k, CRATE_base_768)",
    "mae-pretrain": "FAIR MAE main_pretrain.py (the released CRATE-MAE-B): model, optimizer, epoch, scaler, args",
    "mae-state-dict": "bare state_dict in the official CRATE-MAE key layout",
    "reference-state-dict": "bare state_dict in the reference key layout (also CRATE-alpha's released .pth files)",
    "tost-official": "official ToST main.py (DeiT/XCiT style): model, optimizer, lr_scheduler, epoch, args",
    "tost-state-dict": "bare state_dict in the official ToST key layout (tost_vision/tost.py)",
}
"""The kinds of checkpoint file :func:`load_checkpoint` recognises: kind -> what such a file holds."""
# The older name of the file kinds, kept for callers written before "family" came to mean the architecture only.
FAMILIES = FILE_KINDS
"""The old name of :data:`FILE_KINDS` (kept for code written against it)."""


def config_from_dict(d: Mapping[str, Any], family: str = "crate") -> Any:
    """A stored configuration dict -> the family's config object."""
    return get_family(family).config_cls.from_dict(dict(d))


def _safe_globals() -> list[Any]:
    """Harmless Python objects that checkpoints of other projects store beside their weights, allowed through
    ``weights_only`` loading: ``argparse.Namespace`` (FAIR MAE-style files keep their ``args``), numpy scalars and
    dtypes (accuracies stored as numpy floats). Unpickling them builds plain data and runs no code of the file."""
    allowed: list[Any] = [argparse.Namespace]
    try:
        import numpy as np

        multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray  # numpy 2 renamed np.core
        allowed += [multiarray.scalar, np.dtype, *{type(np.dtype(t)) for t in ("f4", "f8", "i4", "i8", "bool")}]
    except (ImportError, AttributeError):
        pass
    return allowed


def check_zip_records(path: str | Path) -> None:
    """Refuse a zip-format ``.pt`` file whose records could inflate beyond the file, before ``torch.load``.

    ``torch.save`` writes every record *stored* (``ZIP_STORED``: its declared size equals its bytes in the file),
    so a compressed record, or one that declares more bytes than it occupies, was not written by ``torch.save``:
    a 1 MB deflated record of zeros inflates to 1 GiB, which ``torch.load`` would allocate. Only the zip's central
    directory is read here (its size is bounded by the file's). Files that are not zip archives (the legacy
    ``torch.save`` format, text, truncated files) pass through, for ``torch.load`` to read or report.
    """
    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        return  # an unreadable directory: torch.load reports the file as corrupt
    size = path.stat().st_size
    for r in records:
        if r.compress_type != zipfile.ZIP_STORED or r.file_size != r.compress_size or r.file_size > size:
            how = "compressed" if r.compress_type != zipfile.ZIP_STORED else "oversized"
            raise CheckpointError(
                f"{path} is refused unread: its record {r.filename!r} is {how} ({r.compress_size} bytes declaring "
                f"{r.file_size} bytes, in a {size}-byte file); torch.save writes only stored records, so this file "
                f"was not written by torch.save and could inflate to far more memory than its size. Re-save the "
                f"weights with torch.save where you trust the file's source"
            )


def load_file(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one clear :class:`CheckpointError` per failure.

    A zip record that could inflate beyond the file (:func:`check_zip_records`) is refused before ``torch.load``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a directory; pass the checkpoint file inside it")
    check_zip_records(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types here; turn each into one clear line
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch's message carries terminal colour codes
        msg = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        if "WeightsUnpickler error:" in text:  # torch's advice about weights_only is not the reason
            msg = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0]
        unsupported = re.search(r"GLOBAL ([\w.]+)", text)  # a class or function the file wants to import
        if unsupported:
            raise CheckpointError(
                f"{path} stores a pickled Python object ({unsupported.group(1)}) beside its weights; cratevit never "
                f"runs code from a file, so it does not unpickle it. Re-save the file without that entry where you "
                f"trust it, e.g. torch.save({{'model': state_dict}}, NEW_PATH)"
            ) from None
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated, corrupt or another file type): {msg[:200]}"
        ) from None


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a ``.safetensors`` file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt): {e}") from None
    return state, meta


def _tensors(weights: Mapping[str, Any], path: Path, slot: str) -> Mapping[str, Tensor]:
    bad = [k for k, v in weights.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: entry {slot!r} holds non-tensor values (e.g. {bad[0]!r}); it is not a state_dict"
        )
    return weights


def _layout(weights: Mapping[str, Tensor]) -> dict[str, Any]:
    """How the weights are keyed: ``layout`` (reference or cratevit) and ``key_prefix`` (``module.`` or '')."""
    prefix = "module." if weights and all(k.startswith("module.") for k in weights) else ""
    return {"layout": state_family(weights)[1], "key_prefix": prefix}


def _to_ours(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    family, layout = state_family(weights)
    return from_reference_keys(weights, family) if layout == "reference" else strip_prefix(weights)


def _is_reference(weights: Mapping[str, Tensor]) -> bool:
    return state_family(weights)[1] == "reference"


def _mae_args(meta: dict[str, Any]) -> dict[str, Any]:
    """FAIR MAE's ``args`` (an argparse.Namespace) as a plain dict; its ``model`` becomes the file's ``arch``."""
    args = meta.get("args")
    if isinstance(args, argparse.Namespace):
        meta["args"] = args = dict(vars(args))
    if isinstance(args, Mapping) and isinstance(args.get("model"), str):
        meta.setdefault("arch", args["model"])
    return meta


def _weights_entry(obj: Mapping[str, Any], path: Path) -> tuple[str, str, Mapping[str, Tensor]]:
    """(family, entry name or '', weights) of a checkpoint dict, told apart by the file's own structure."""
    if isinstance(obj.get("state_dict"), Mapping):
        weights = _tensors(obj["state_dict"], path, "state_dict")
        return ("reference" if _is_reference(weights) else "cratevit-state-dict"), "state_dict", weights
    if isinstance(obj.get("model"), Mapping):
        weights = _tensors(obj["model"], path, "model")
        if state_family(weights) == ("crate_mae", "reference"):
            return "mae-pretrain", "model", weights
        if state_family(weights) == ("tost", "reference"):
            return "tost-official", "model", weights
        if not _is_reference(weights):
            return "cratevit-state-dict", "model", weights
        prefixed = _layout(weights)["key_prefix"] == "module."
        return ("reference-finetune" if prefixed else "emergence-demo"), "model", weights
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        family = "reference-state-dict" if _is_reference(obj) else "cratevit-state-dict"
        family = "mae-state-dict" if state_family(obj) == ("crate_mae", "reference") else family
        family = "tost-state-dict" if state_family(obj) == ("tost", "reference") else family
        return family, "", obj
    raise CheckpointError(
        f"{path} is not a CRATE checkpoint: expected a cratevit checkpoint, a reference checkpoint with "
        f"'state_dict' or 'model', or a bare state_dict; found keys {sorted(map(str, obj))[:8]}"
    )


def read_checkpoint(path: str | Path, mmap: bool = False) -> tuple[dict[str, Tensor], Any, dict[str, Any]]:
    """Read any supported file -> (state_dict in our key layout, stored config or None, the rest of the file).

    The returned ``meta`` dict holds what else the file carried (``epoch``, ``arch``, ``optimizer``,
    ``pretrained_cfg`` ...), ``"kind"`` (a key of :data:`FILE_KINDS`; also under its older name ``"family"``),
    ``"layout"`` (``"reference"`` or
    ``"cratevit"``: the file's key layout), ``"key_prefix"`` (``"module."`` or ``""``) and ``"model_family"``
    (the architecture family, ``"crate"`` for files that do not say). ``mmap``: torch files stay on disk (their
    tensors are read when used).
    """
    state, cfg, meta = _read(Path(path), mmap)
    return state, cfg, {"kind": meta["family"], **meta}


def _read(path: Path, mmap: bool) -> tuple[dict[str, Tensor], Any, dict[str, Any]]:
    if path.suffix == ".safetensors":
        state, meta = read_safetensors(path)
        rest: dict[str, Any] = {k: v for k, v in meta.items() if k != "config"}
        if "pretrained_cfg" in rest:
            rest["pretrained_cfg"] = json.loads(rest["pretrained_cfg"])
        rest.setdefault("model_family", "crate")
        cfg = config_from_dict(json.loads(meta["config"]), rest["model_family"]) if "config" in meta else None
        return _to_ours(state), cfg, {"family": "cratevit-safetensors", **rest, **_layout(state)}
    obj = load_file(path, mmap=mmap)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state_dict")
    if obj.get("format") == "timm":  # `cratevit train --arch vit_...`: a timm model, built by the analysis layer
        raise CheckpointError(
            f"{path} is a `cratevit train --arch {obj.get('arch')}` run of a timm model, not a white-box family; "
            f"the analysis commands take it as it is, and in Python cratevit.analysis.segmentation.load_vision_model(path) "
            f"builds it"
        )
    if obj.get("format") == FORMAT:
        meta = {"model_family": "crate", **{k: v for k, v in obj.items() if k not in ("model", "config")}}
        cfg = config_from_dict(obj["config"], meta["model_family"])
        return dict(obj["model"]), cfg, {**meta, "family": "cratevit", "layout": "cratevit", "key_prefix": ""}
    family, entry, weights = _weights_entry(obj, path)
    meta = _mae_args({k: v for k, v in obj.items() if entry and k != entry})
    return (
        _to_ours(weights),
        None,
        {"model_family": state_family(weights)[0], **meta, "family": family, **_layout(weights)},
    )


# --------------------------------------------------------------------------------------------- peek
@dataclass(frozen=True)
class Peek:
    """What a model file or folder is, from one read that leaves its tensors on disk (:func:`peek`)."""

    path: str
    kind: str  # the file kind, a key of FILE_KINDS ("cratevit", "reference", "mae-pretrain", ...)
    family: str  # the architecture family ("crate", "crate_alpha", "crate_mae")
    layout: str  # the key layout: "cratevit" or "reference"
    key_prefix: str  # "module." (DataParallel) or ""
    config: dict[str, Any] | None  # the stored configuration (None: the loader infers it from the shapes)
    train_config: dict[str, Any] | None  # the training run's settings, where the file records them
    pretrained_cfg: dict[str, Any] | None  # timm's per-weight metadata, where the file records it
    epoch: int | None  # the last completed epoch, where recorded
    num_tensors: int


def peek(path: str | Path) -> Peek:
    """Kind, family, layout, configuration, training configuration and ``pretrained_cfg`` of a checkpoint file, a
    ``.safetensors`` file or a ``save_pretrained`` folder, in one read: torch files are memory-mapped, safetensors
    files give their header only."""
    path = Path(path)
    if path.is_dir():
        data = read_folder_config(path)
        return Peek(str(path), "cratevit-safetensors", data["model_type"], "cratevit", "", dict(data["model_args"]),
                    None, data.get("pretrained_cfg"), None, len(_safetensors_keys(path / WEIGHTS_NAME)))  # fmt: skip
    if path.suffix == ".safetensors":
        meta = read_safetensors_metadata(path)
        keys = _safetensors_keys(path)
        family, layout = state_family(dict.fromkeys(keys))
        prefix = "module." if keys and all(k.startswith("module.") for k in keys) else ""
        return Peek(str(path), "cratevit-safetensors", meta.get("model_family", family), layout, prefix,
                    json.loads(meta["config"]) if "config" in meta else None, None,
                    json.loads(meta["pretrained_cfg"]) if "pretrained_cfg" in meta else None, None, len(keys))  # fmt: skip
    state, cfg, meta = read_checkpoint(path, mmap=True)
    epoch = meta.get("epoch")
    return Peek(
        str(path),
        meta["kind"],
        meta["model_family"],
        meta["layout"],
        meta["key_prefix"],
        cfg.to_dict() if cfg is not None else None,
        dict(meta["train_config"]) if isinstance(meta.get("train_config"), Mapping) else None,
        dict(meta["pretrained_cfg"]) if isinstance(meta.get("pretrained_cfg"), Mapping) else None,
        int(epoch) if isinstance(epoch, int) else None,
        len(state),
    )


def _safetensors_keys(path: Path) -> list[str]:
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


# --------------------------------------------------------------------------------------------- folders
def check_hub_config(data: Any, where: str) -> dict[str, Any]:
    """Raise one clear error when a loaded config.json is not a cratevit config."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} holds a {type(data).__name__}, not a model configuration object")
    if data.get("model_type") not in families() or not isinstance(data.get("model_args"), dict):
        arch = data.get("architecture") or data.get("architectures") or data.get("model_type") or "unknown"
        raise CheckpointError(
            f"{where} describes another architecture ({arch!r}), not a cratevit CRATE model "
            f'(expected "model_type": "crate" and "model_args"); load it with the library that wrote it, or '
            f"point CRATE.from_pretrained at a folder written by CRATE.save_pretrained / `cratevit export --format hf`"
        )
    return data


def read_folder_config(folder: str | Path) -> dict[str, Any]:
    """The checked ``config.json`` of a ``save_pretrained`` folder."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {CONFIG_NAME}; pass a folder written by CRATE.save_pretrained or "
            f"`cratevit export --format hf` (training checkpoints load with cratevit.load_checkpoint)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); it was not written by save_pretrained") from None
    return check_hub_config(data, f"{CONFIG_NAME} of {folder}")


def read_folder(
    folder: str | Path, config: dict[str, Any] | None = None, weights: str | Path | None = None
) -> tuple[dict[str, Tensor], Any, dict[str, Any]]:
    """A ``save_pretrained`` folder -> (state_dict, config, meta with its ``pretrained_cfg``).

    ``config`` (the parsed ``config.json``) and ``weights`` (the safetensors file) may be given when they were
    fetched from elsewhere (the Hub cache)."""
    folder = Path(folder)
    data = check_hub_config(config, f"{CONFIG_NAME} of {folder}") if config is not None else read_folder_config(folder)
    weights = Path(weights) if weights is not None else folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}; save the model again")
    state, _, _ = read_checkpoint(weights)
    cfg = config_from_dict(data["model_args"], data["model_type"])
    meta = {
        "family": "cratevit-safetensors",
        "model_family": data["model_type"],
        "layout": "cratevit",
        "key_prefix": "",
        "pretrained_cfg": data.get("pretrained_cfg"),
        "hub_config": data,
    }
    return state, cfg, meta


# --------------------------------------------------------------------------------------------- preprocessing
def stored_preprocessing(path: str | Path) -> dict[str, Any] | None:
    """What a checkpoint file records about its preprocessing, without reading its tensors into memory:
    its ``pretrained_cfg`` (files written since this layout), else ``{"data": ...}`` from its ``train_config``
    (older training checkpoints), else None. Unreadable files give None (the loader reports them)."""
    path = Path(path)
    try:
        if path.is_dir():
            return dict(read_folder_config(path).get("pretrained_cfg") or {}) or None
        if path.suffix == ".safetensors":
            meta = read_safetensors_metadata(path)
            return json.loads(meta["pretrained_cfg"]) if "pretrained_cfg" in meta else None
        obj = load_file(path, mmap=True)  # mmap: the tensors stay on disk
    except (CheckpointError, FileNotFoundError, OSError, ValueError):
        return None
    if not isinstance(obj, Mapping):
        return None
    if isinstance(obj.get("pretrained_cfg"), Mapping):
        return dict(obj["pretrained_cfg"])
    config = obj.get("train_config")
    if isinstance(config, Mapping) and config.get("data") is not None:
        return {"data": config["data"]}
    return None


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
