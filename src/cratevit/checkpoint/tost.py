"""Loading files of the official ToST code (RobinWu218/ToST, ``tost_vision/main.py``) into :class:`ToST`.

The official training script saves DeiT/XCiT-style files, ``{"model", "optimizer", "lr_scheduler", "epoch",
"model_ema", "scaler", "args"}`` (``args`` an ``argparse.Namespace``); a bare state_dict in the official key
layout (``patch_embed.proj.0.0.weight``, ``blocks.3.attn.temp``, ``cls_attn_blocks.1.gamma1`` ...) loads too, with
or without the ``module.`` prefix of DistributedDataParallel. The file is read with ``weights_only=True``
(:func:`.read.load_file`), the architecture is read off the tensor shapes (or the preset named in ``args.model``),
and the weights are loaded strictly. No weights are published; the later phase wires this into ``load_checkpoint``.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import CheckpointError
from ..models.tost import TOST_PRESETS, ToST, ToSTConfig, from_official_keys, tost_preset
from .read import load_file

__all__ = ["is_official_tost", "load_official_tost", "official_tost_config"]

_SIGNATURE = ("cls_token", "blocks.0.attn.temp", "blocks.0.attn.to_out.0.weight", "patch_embed.proj.0.0.weight")


def is_official_tost(state: Mapping[str, Any]) -> bool:
    """Whether a state_dict is in the official ToST vision layout (prefix ``module.`` allowed)."""
    keys = {k.removeprefix("module.") for k in state}
    return all(k in keys for k in _SIGNATURE)


def _weights(obj: Any, path: Path, entry: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get(entry), Mapping):
        obj = obj[entry]
    elif isinstance(obj, Mapping) and entry != "model":
        raise CheckpointError(f"{path} has no {entry!r} entry; its entries are {sorted(map(str, obj))[:8]}")
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path} is not an official ToST file: expected a state_dict or a dict with 'model' (DeiT/XCiT layout)"
        )
    state = {str(k).removeprefix("module."): v for k, v in obj.items()}
    if not is_official_tost(state):
        missing = [k for k in _SIGNATURE if k not in state]
        raise CheckpointError(
            f"{path} is not an official ToST checkpoint (no {missing[0]!r}; keys start {sorted(state)[:3]}); "
            "load files of other families with cratevit.load_checkpoint"
        )
    return state


def official_tost_config(state: Mapping[str, Tensor], args: Mapping[str, Any] | None = None) -> ToSTConfig:
    """The :class:`ToSTConfig` of an official-layout state_dict, read off its tensor shapes; ``args`` (the file's
    training arguments) supply the preset name (``model``) and image size (``input_size``) where present."""
    args = dict(args or {})
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    class_blocks = len({m.group(1) for k in state if (m := re.match(r"cls_attn_blocks\.(\d+)\.", k))})
    stages = len({m.group(1) for k in state if (m := re.match(r"patch_embed\.proj\.(\d+)\.0\.weight", k))})
    head = state.get("head.weight")
    found = {
        "dim": dim,
        "depth": depth,
        "heads": state["blocks.0.attn.temp"].shape[0],
        "patch_size": 2**stages,
        "class_blocks": class_blocks,
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "pos_dim": state["pos_embeder.token_projection.weight"].shape[1] // 2,
        "channels": state["patch_embed.proj.0.0.weight"].shape[1],
        "num_classes": 0 if head is None else head.shape[0],
        "eta": 1.0 if depth <= 12 else 1e-5,  # the official rule; only the initial value, the file overrides it
    }
    if isinstance(args.get("input_size"), int):
        found["image_size"] = args["input_size"]
    name = args.get("model")
    if isinstance(name, str) and name in TOST_PRESETS:
        preset, probe = tost_preset(name), ToSTConfig(**found)
        differ = [k for k in ("dim", "depth", "heads", "patch_size") if getattr(preset, k) != getattr(probe, k)]
        if differ:
            raise CheckpointError(f"the file says model={name!r} but its tensors differ from that preset in {differ}")
        return preset.replace(**{k: v for k, v in found.items() if k in ("num_classes", "image_size")})
    return ToSTConfig(**found, name=name if isinstance(name, str) else None)


def load_official_tost(path: str | Path, entry: str = "model") -> tuple[ToST, dict[str, Any]]:
    """Read an official ToST file -> (model in eval mode, the rest of the file: ``epoch``, ``args`` as a dict ...).

    ``entry="model_ema"`` loads the EMA weights of a training checkpoint instead. Loading is strict: a missing or
    unexpected tensor, or a shape that does not fit, is one :class:`CheckpointError` naming it.
    """
    path = Path(path)
    obj = load_file(path)
    state = _weights(obj, path, entry)
    meta = {k: v for k, v in obj.items() if k not in ("model", "model_ema")} if "model" in obj else {}
    if isinstance(meta.get("args"), argparse.Namespace):
        meta["args"] = dict(vars(meta["args"]))
    cfg = official_tost_config(state, meta.get("args") if isinstance(meta.get("args"), Mapping) else None)
    model = ToST(config=cfg)
    ours = from_official_keys(state)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the official ToST weights do not fit a {cfg.depth}-block dim-{cfg.dim} ToST "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    bad = [k for k, v in ours.items() if v.shape != expected[k].shape]
    if bad:
        raise CheckpointError(
            f"{path}: tensor {bad[0]} has shape {list(ours[bad[0]].shape)}, the model expects "
            f"{list(expected[bad[0]].shape)}"
        )
    model.load_state_dict(ours, strict=True)
    return model.eval(), meta
