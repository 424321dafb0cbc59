"""Reading and writing CRATE weights.

Supported files:

* cratevit checkpoints: ``torch.save`` of ``{"format": "cratevit", "config": {...}, "model": state_dict, ...}``;
* cratevit ``.safetensors`` (the config is kept in the file's metadata);
* the reference implementation's checkpoints: ``{"state_dict": ..., "epoch", "arch", ...}`` with ``module.``
  prefixed keys, a bare reference state_dict, with or without ``module.``.

Every file is read with ``torch.load(weights_only=True)`` (or safetensors): loading a checkpoint never runs code.
Loading is strict: every tensor of the file is used and none of the model's is missing.

One converter maps the reference key layout to ours (:func:`from_reference_keys`) and back
(:func:`to_reference_keys`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .model import CRATE, CRATEConfig

__all__ = [
    "FORMAT",
    "CheckpointError",
    "atomic_save",
    "from_reference_keys",
    "load_checkpoint",
    "load_into",
    "load_state_dict_strict",
    "read_checkpoint",
    "save_checkpoint",
    "save_safetensors",
    "to_reference_keys",
]

FORMAT = "cratevit"
HEAD_KEYS = ("head.weight", "head.bias")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------- key conversion
# (reference regex, our template); applied to keys without the "module." prefix.
_REFERENCE_TO_OURS: list[tuple[str, str]] = [
    (r"pos_embedding", "pos_embed"),
    (r"cls_token", "cls_token"),
    (r"to_patch_embedding\.1\.(weight|bias)", r"patch_embed.norm_in.\1"),
    (r"to_patch_embedding\.2\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"to_patch_embedding\.3\.(weight|bias)", r"patch_embed.norm_out.\1"),
    (r"transformer\.layers\.(\d+)\.0\.norm\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.qkv\.weight", r"blocks.\1.mssa.subspace_proj.weight"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.to_out\.0\.(weight|bias)", r"blocks.\1.mssa.out_proj.\2"),
    (r"transformer\.layers\.(\d+)\.1\.norm\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.weight", r"blocks.\1.ista.dictionary"),
    (r"mlp_head\.0\.(weight|bias)", r"fc_norm.\1"),
    (r"mlp_head\.1\.(weight|bias)", r"head.\1"),
]
_OURS_TO_REFERENCE: list[tuple[str, str]] = [
    (r"pos_embed", "pos_embedding"),
    (r"cls_token", "cls_token"),
    (r"patch_embed\.norm_in\.(weight|bias)", r"to_patch_embedding.1.\1"),
    (r"patch_embed\.proj\.(weight|bias)", r"to_patch_embedding.2.\1"),
    (r"patch_embed\.norm_out\.(weight|bias)", r"to_patch_embedding.3.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"transformer.layers.\1.0.norm.\2"),
    (r"blocks\.(\d+)\.mssa\.subspace_proj\.weight", r"transformer.layers.\1.0.fn.qkv.weight"),
    (r"blocks\.(\d+)\.mssa\.out_proj\.(weight|bias)", r"transformer.layers.\1.0.fn.to_out.0.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"transformer.layers.\1.1.norm.\2"),
    (r"blocks\.(\d+)\.ista\.dictionary", r"transformer.layers.\1.1.fn.weight"),
    (r"fc_norm\.(weight|bias)", r"mlp_head.0.\1"),
    (r"head\.(weight|bias)", r"mlp_head.1.\1"),
]


def _convert(state: Mapping[str, Tensor], rules: list[tuple[str, str]], what: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for pattern, template in rules:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, template, key)] = value
                break
        else:
            raise CheckpointError(f"unexpected key {key!r} in a {what} state_dict: this is not a CRATE checkpoint")
    return out


def strip_prefix(state: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items()}


def is_reference_state(state: Mapping[str, Any]) -> bool:
    return any(k.removeprefix("module.").startswith(("transformer.layers.", "to_patch_embedding.")) for k in state)


def from_reference_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Reference key layout (``transformer.layers.3.1.fn.weight``, optional ``module.``) -> ours."""
    return _convert(strip_prefix(state), _REFERENCE_TO_OURS, "reference CRATE")


def to_reference_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our key layout -> the reference layout (without ``module.``), for export."""
    return _convert(state, _OURS_TO_REFERENCE, "cratevit")


# --------------------------------------------------------------------------------------------- reading
def _torch_load(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a directory; pass the checkpoint file inside it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types here; turn each into one clear line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path} contains pickled Python objects other than tensors and plain containers; cratevit loads "
                f"checkpoints with weights_only=True and never runs code from a file ({msg[:200]})"
            ) from None
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated, corrupt or another file type): {msg[:200]}"
        ) from None


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt): {e}") from None
    return state, meta


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], CRATEConfig | None, dict[str, Any]]:
    """Read any supported file -> (state_dict in our key layout, stored config or None, the rest of the file).

    The returned ``meta`` dict holds what else the file carried (``epoch``, ``arch``, ``optimizer`` ...) and
    ``"family"``: ``"cratevit"``, ``"cratevit-safetensors"``, ``"reference"`` or ``"reference-state-dict"``.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state, meta = _read_safetensors(path)
        cfg = CRATEConfig.from_dict(json.loads(meta["config"])) if "config" in meta else None
        if is_reference_state(state):
            state = from_reference_keys(state)
        return state, cfg, {"family": "cratevit-safetensors", **{k: v for k, v in meta.items() if k != "config"}}
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state_dict")
    if obj.get("format") == FORMAT:
        meta = {k: v for k, v in obj.items() if k not in ("model", "config")}
        return dict(obj["model"]), CRATEConfig.from_dict(dict(obj["config"])), {"family": "cratevit", **meta}
    if isinstance(obj.get("state_dict"), Mapping):
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        return from_reference_keys(obj["state_dict"]), None, {"family": "reference", **meta}
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        if is_reference_state(obj):
            return from_reference_keys(obj), None, {"family": "reference-state-dict"}
        return strip_prefix(dict(obj)), None, {"family": "cratevit-state-dict"}
    raise CheckpointError(
        f"{path} is not a CRATE checkpoint: expected a cratevit checkpoint, a reference checkpoint with "
        f"'state_dict', or a bare state_dict; found keys {sorted(map(str, obj))[:8]}"
    )


def load_state_dict_strict(
    model: CRATE, state: Mapping[str, Tensor], drop_head: bool = False, source: str = ""
) -> None:
    """Load ``state`` (our key layout) into ``model``: every key used, none missing, every shape equal.

    With ``drop_head=True`` a classifier of another shape is skipped and the model's fresh head kept.
    """
    own = model.state_dict()
    state = dict(state)
    if drop_head:
        for k in HEAD_KEYS:
            if k in state and (k not in own or state[k].shape != own[k].shape):
                del state[k]
    missing = [k for k in own if k not in state and not (drop_head and k in HEAD_KEYS)]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in state if k in own and state[k].shape != own[k].shape]  # fmt: skip
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch " + "; ".join(wrong[:6]) + (" ..." if len(wrong) > 6 else ""))
        if missing:
            parts.append(f"missing {missing[:6]}" + (" ..." if len(missing) > 6 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[:6]}" + (" ..." if len(unexpected) > 6 else ""))
        hint = ("the checkpoint is for another architecture; build the matching preset" if not drop_head
                else "the checkpoint body does not match this architecture")  # fmt: skip
        only_head = not missing and not unexpected and all(w.split(":")[0] in HEAD_KEYS for w in wrong)
        if only_head:
            hint = "the classifier has another class count; pass drop_head=True (or num_classes=) to re-initialise it"
        where = f"{source}: " if source else ""
        raise CheckpointError(f"{where}checkpoint does not fit the model ({'; '.join(parts)}); {hint}")
    with torch.no_grad():
        model.load_state_dict(state, strict=not drop_head)


def load_into(model: CRATE, path: str | Path, drop_head: bool = False) -> dict[str, Any]:
    """Load the weights of ``path`` into ``model`` strictly; returns the file's other contents."""
    state, _, meta = read_checkpoint(path)
    load_state_dict_strict(model, state, drop_head=drop_head, source=str(path))
    return meta


def load_checkpoint(path: str | Path, arch: str | CRATEConfig | None = None, **overrides: Any) -> CRATE:
    """Build the model a checkpoint describes and load its weights.

    ``arch`` names a preset (needed for reference checkpoints, which do not store their configuration; the
    file's own ``arch`` entry is used when present). ``overrides`` change the configuration (e.g.
    ``dynamic_img_size=True``).
    """
    from .presets import get_config

    state, cfg, meta = read_checkpoint(path)
    if isinstance(arch, CRATEConfig):
        cfg = arch
    elif arch is not None:
        cfg = get_config(arch)
    elif cfg is None and isinstance(meta.get("arch"), str):
        cfg = get_config(meta["arch"])
    if cfg is None:
        raise CheckpointError(
            f"{path} does not record its architecture; pass arch= (a preset name such as 'crate_small')"
        )
    if "head.weight" in state and cfg.num_classes != state["head.weight"].shape[0]:
        cfg = cfg.replace(num_classes=state["head.weight"].shape[0])
    if overrides:
        cfg = cfg.replace(**overrides)
    model = CRATE(config=cfg)
    load_state_dict_strict(model, state, source=str(path))
    return model


# --------------------------------------------------------------------------------------------- writing
def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or kill during the save leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def checkpoint_dict(model: CRATE, **extra: Any) -> dict[str, Any]:
    """Our checkpoint layout: format tag, configuration, weights, and whatever the caller adds."""
    return {"format": FORMAT, "format_version": 1, "config": model.config.to_dict(),
            "model": model.state_dict(), **extra}  # fmt: skip


def save_checkpoint(path: str | Path, model: CRATE, **extra: Any) -> Path:
    """Write a self-describing cratevit checkpoint atomically."""
    return atomic_save(checkpoint_dict(model, **extra), path)


def save_safetensors(path: str | Path, model: CRATE, reference_keys: bool = False) -> Path:
    """Write the weights as safetensors with the configuration in the metadata (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if reference_keys:
        state = to_reference_keys(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": FORMAT, "config": json.dumps(model.config.to_dict())})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
