"""Which configuration to build for a file: its stored config, its ``arch`` entry, or its tensor shapes.

Files that do not record their architecture are read with :func:`infer_config` (``arch="auto"``): dim, depth,
patch size, image size, class count and head layout come from the tensor shapes, the head count from the preset
table or an explicit ``heads=``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import CheckpointError, UserError
from ..models import CRATEAlphaConfig, CRATEConfig, CRATEMAEConfig
from ..presets import PRESET_INFO, PRESETS, get_config, resolve_name
from ..registry import get_family
from .keys import KeyNamer, described, key_namer

__all__ = ["infer_alpha_config", "infer_config", "infer_mae_config", "recorded_preset", "resolve_config"]


def _need(state: Mapping[str, Tensor], key: str, ndim: int, where: str, name_in_file: KeyNamer | None) -> Tensor:
    if key not in state:
        raise CheckpointError(
            f"{where}tensor {described(key, name_in_file)} is missing, so the architecture cannot be read from "
            f"the shapes; the file is truncated or not a CRATE checkpoint"
        )
    if state[key].ndim != ndim:
        raise CheckpointError(
            f"{where}tensor {described(key, name_in_file)} has shape {tuple(state[key].shape)}, expected "
            f"{ndim} dimensions; the file is damaged or not a CRATE checkpoint"
        )
    return state[key]


def _split_patch_dim(patch_dim: int) -> tuple[int, int] | None:
    """(channels, patch side) with ``channels * side**2 == patch_dim``, colour images first."""
    for channels in (3, 1):
        side = math.isqrt(patch_dim // channels)
        if channels * side * side == patch_dim:
            return channels, side
    return None


def _depth(state: Mapping[str, Tensor], where: str, name_in_file: KeyNamer | None) -> int:
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(layers) + 1
    for i in range(depth):
        if i not in layers:
            key = f"blocks.{i}.ista.dictionary"
            raise CheckpointError(f"{where}every tensor of layer {i} is missing ({described(key, name_in_file)} ...)")
    return depth


def _head_count(dims: dict[str, Any], heads: int | None, presets: Mapping[str, CRATEConfig], source: str) -> int:
    """Heads from ``heads=``, the absence of an output projection (1 head), or the presets of the same shape."""
    dim, inner = dims["dim"], dims["inner_dim"]
    where = f"{source}: " if source else ""
    if heads is not None:
        if heads <= 0 or inner % heads:
            divisors = [h for h in range(1, inner + 1) if inner % h == 0][:12]
            raise CheckpointError(
                f"{where}heads={heads} does not divide the {inner}-wide subspace projection; choose one of {divisors}"
            )
        return heads
    if not dims["out_proj"] and inner == dim:
        return 1
    two_stage = dims["head_hidden_dim"] is not None
    same = {
        n: p.heads
        for n, p in presets.items()
        if (p.dim, p.depth, p.inner_dim, p.head_hidden_dim is not None) == (dim, dims["depth"], inner, two_stage)
    }
    if len(set(same.values())) == 1:
        return next(iter(same.values()))
    why = (
        f"presets of these shapes disagree ({', '.join(f'{n}: {h}' for n, h in sorted(same.items()))})"
        if same
        else f"no preset has dim {dim}, depth {dims['depth']} and a {inner}-wide projection"
    )
    examples = [f"{h}x{inner // h}" for h in (1, 2, 3, 4, 6, 8, 12, 16) if inner % h == 0 and inner // h >= 8][-4:]
    raise CheckpointError(
        f"{source or 'the checkpoint'} does not record its architecture; pass arch= (a preset name such as 'crate_small') "
        f"or heads=N: shapes alone cannot tell the head count ({inner} projection columns fit "
        f"{' or '.join(examples)} heads x width) and {why}"
    )


def infer_config(
    state: Mapping[str, Tensor],
    heads: int | None = None,
    presets: Mapping[str, CRATEConfig] | None = None,
    source: str = "",
    name_in_file: KeyNamer | None = None,
) -> CRATEConfig:
    """The configuration a state_dict (our key layout) was built with, read from its tensor shapes.

    dim, depth, channels, patch size, image size (square), class count and head layout (one or two stages) come
    from the shapes; the head count from ``heads`` or from the presets with the same dim, depth, projection width
    and head layout (``presets``: the registry by default); pooling is the class token, as in every released
    model. Raises :class:`CheckpointError` naming the key when a
    tensor it needs is missing or malformed, and when the head count is ambiguous.
    """
    if presets is None:  # the CRATE presets (other families' configurations have other fields)
        presets = {n: c for n, c in PRESETS.items() if isinstance(c, CRATEConfig)}
    where = f"{source}: " if source else ""
    pos = _need(state, "pos_embed", 3, where, name_in_file)
    proj = _need(state, "patch_embed.proj.weight", 2, where, name_in_file)
    # The emergence paper's ablations: MHSA instead of MSSA (timm's attn.qkv), an MLP or nothing instead of ISTA.
    attention = "mhsa" if "blocks.0.attn.qkv.weight" in state else "mssa"
    if attention == "mssa":
        qkv = _need(state, "blocks.0.mssa.subspace_proj.weight", 2, where, name_in_file)
        inner, out_proj = qkv.shape[0], "blocks.0.mssa.out_proj.weight" in state
    else:
        qkv = _need(state, "blocks.0.attn.qkv.weight", 2, where, name_in_file)
        inner, out_proj = qkv.shape[0] // 3, True
    feedforward = (
        "ista" if "blocks.0.ista.dictionary" in state else "mlp" if "blocks.0.mlp.fc1.weight" in state else "none"
    )
    dim, num_patches = pos.shape[2], pos.shape[1] - 1
    split = _split_patch_dim(proj.shape[1])
    grid = math.isqrt(max(num_patches, 0))
    if split is None or grid * grid != num_patches or num_patches < 1:
        raise CheckpointError(
            f"{where}cannot read a square patch grid from {described('pos_embed', name_in_file)} "
            f"{tuple(pos.shape)} and {described('patch_embed.proj.weight', name_in_file)} {tuple(proj.shape)}; "
            f"pass arch= a CRATEConfig with the image and patch size"
        )
    channels, patch = split
    dims = {
        "dim": dim,
        "depth": _depth(state, where, name_in_file),
        "inner_dim": inner,
        "out_proj": out_proj,
        "head_hidden_dim": state["pre_logits.weight"].shape[0] if "pre_logits.weight" in state else None,
    }
    n_heads = _head_count(dims, heads, presets, source)
    extra: dict[str, Any] = {"attn_kind": attention, "feedforward": feedforward}
    if feedforward == "mlp":
        extra["mlp_ratio"] = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
    cfg = CRATEConfig(
        **extra,
        image_size=grid * patch,
        patch_size=patch,
        channels=channels,
        dim=dim,
        depth=dims["depth"],
        heads=n_heads,
        dim_head=dims["inner_dim"] // n_heads,
        head_hidden_dim=dims["head_hidden_dim"],
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
    )
    match = next((n for n, p in presets.items() if p == cfg), None)
    return cfg.replace(name=match)


def infer_alpha_config(
    state: Mapping[str, Tensor],
    heads: int | None = None,
    presets: Mapping[str, Any] | None = None,
    source: str = "",
    name_in_file: KeyNamer | None = None,
) -> CRATEAlphaConfig:
    """A CRATE-alpha configuration from the tensor shapes of a state_dict in our key layout.

    dim, channels and patch size from the convolutional stem, the (square) image size from ``pos_embed``, depth
    from the block indices, the dictionary ratio from ``D``, the class count from the head; the head count from
    ``heads`` or from the CRATE-alpha presets of the same dim, depth and projection width (U is
    ``(heads * dim_head, dim)``: its shape cannot tell 12 heads of 64 from 6 of 128).
    """
    if presets is None:
        presets = {n: p.config for n, p in PRESET_INFO.items() if p.family == "crate_alpha"}
    where = f"{source}: " if source else ""
    pos = _need(state, "pos_embed", 3, where, name_in_file)
    stem = _need(state, "patch_embed.proj.weight", 4, where, name_in_file)
    qkv = _need(state, "blocks.0.mssa.subspace_proj.weight", 2, where, name_in_file)
    dictionary = _need(state, "blocks.0.ista.dictionary", 2, where, name_in_file)
    dim, channels, ph, pw = stem.shape
    grid = math.isqrt(max(pos.shape[1] - 1, 0))
    if grid * grid != pos.shape[1] - 1 or pos.shape[1] < 2:
        raise CheckpointError(
            f"{where}{described('pos_embed', name_in_file)} {tuple(pos.shape)} holds no square patch grid; pass "
            f"arch= a CRATEAlphaConfig with the image size"
        )
    dims = {
        "dim": dim,
        "depth": _depth(state, where, name_in_file),
        "inner_dim": qkv.shape[0],
        "out_proj": "blocks.0.mssa.out_proj.weight" in state,
        "head_hidden_dim": None,
    }
    n_heads = _head_count(dims, heads, presets, source)
    cfg = CRATEAlphaConfig(
        image_size=(grid * ph, grid * pw),
        patch_size=(ph, pw),
        channels=channels,
        dim=dim,
        depth=dims["depth"],
        heads=n_heads,
        dim_head=dims["inner_dim"] // n_heads,
        overcomplete=dictionary.shape[1] // dim,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
    )
    return cfg.replace(name=next((n for n, p in presets.items() if p == cfg), None))


def infer_mae_config(
    state: Mapping[str, Tensor], heads: int | None = None, source: str = "", name_in_file: KeyNamer | None = None
) -> CRATEMAEConfig:
    """A CRATE-MAE configuration from the tensor shapes (our key layout): width, depths, patch, channels and image
    size from the shapes; the head count from ``heads`` or from the official preset of the same width (the
    official presets differ in width, and their encoder and decoder have the same heads)."""
    where = f"{source}: " if source else ""
    pos = _need(state, "pos_embed", 3, where, name_in_file)
    proj = _need(state, "patch_embed.proj.weight", 4, where, name_in_file)
    qkv = _need(state, "blocks.0.mssa.subspace_proj.weight", 2, where, name_in_file)
    dec_qkv = _need(state, "decoder_blocks.0.mssa.subspace_proj.weight", 2, where, name_in_file)
    dim, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    grid = math.isqrt(max(pos.shape[1] - 1, 0))
    if grid * grid != pos.shape[1] - 1 or grid < 1 or proj.shape[2] != proj.shape[3]:
        raise CheckpointError(
            f"{where}cannot read a square patch grid from {described('pos_embed', name_in_file)} "
            f"{tuple(pos.shape)}; pass arch= a CRATEMAEConfig"
        )
    depths = [
        len({k.split(".")[1] for k in state if k.startswith(prefix)}) for prefix in ("blocks.", "decoder_blocks.")
    ]
    if heads is None:
        same = {p.heads for p in PRESETS.values() if isinstance(p, CRATEMAEConfig) and p.dim == dim}
        if len(same) != 1:
            raise CheckpointError(
                f"{source or 'the checkpoint'} does not record its architecture and no mae_crate_* "
                f"preset is {dim} wide; pass heads=N (or arch=)"
            )
        heads = same.pop()
    if qkv.shape[0] % heads or dec_qkv.shape[0] % heads:
        raise CheckpointError(f"{where}heads={heads} does not divide the {qkv.shape[0]}-wide subspace projection")
    cfg = CRATEMAEConfig(
        image_size=grid * patch,
        patch_size=patch,
        channels=channels,
        dim=dim,
        depth=depths[0],
        heads=heads,
        dim_head=qkv.shape[0] // heads,
        decoder_depth=depths[1],
        decoder_heads=heads,
        decoder_dim_head=dec_qkv.shape[0] // heads,
    )
    match = next((n for n, p in PRESETS.items() if p == cfg), None)
    return cfg.replace(name=match)


def _mae_args(cfg: Any, meta: Mapping[str, Any]) -> Any:
    """FAIR MAE's recorded ``args``: the loss target and mask ratio the model was trained with."""
    args = meta.get("args")
    if not isinstance(cfg, CRATEMAEConfig) or not isinstance(args, Mapping):
        return cfg
    changes = {k: args[k] for k in ("norm_pix_loss", "mask_ratio") if isinstance(args.get(k), (bool, float))}
    return cfg.replace(**changes) if changes else cfg


def _input_size(cfg: Any, meta: Mapping[str, Any]) -> Any:
    """The image size a DeiT/XCiT-style file's ``args`` record (``input_size``, official ToST's main.py), for a
    family that takes any size (ToST: any multiple of its patch)."""
    args = meta.get("args")
    size = args.get("input_size") if isinstance(args, Mapping) else None
    if get_family(meta.get("model_family", "crate")).shape_reader is None or not isinstance(size, int):
        return cfg
    return cfg.replace(image_size=size)


def _with_heads(cfg: CRATEConfig, heads: int, where: str) -> CRATEConfig:
    if heads <= 0 or cfg.inner_dim % heads:
        raise CheckpointError(f"{where}heads={heads} does not divide the {cfg.inner_dim}-wide subspace projection")
    return cfg.replace(heads=heads, dim_head=cfg.inner_dim // heads)


def recorded_preset(meta: Mapping[str, Any]) -> str | None:
    """The file's own ``arch`` entry when it names a preset (``CRATE_small`` of main.py)."""
    arch = meta.get("arch")
    if not isinstance(arch, str):
        return None
    try:
        return resolve_name(arch)
    except UserError:
        return None


def resolve_config(
    path: str | Path,
    state: Mapping[str, Tensor],
    stored: CRATEConfig | None,
    meta: Mapping[str, Any],
    arch: str | CRATEConfig | None = None,
    heads: int | None = None,
) -> CRATEConfig:
    """The configuration to build for a file: ``arch`` (a config, a preset name or ``"auto"``), else the
    file's stored config, else its ``arch`` entry, else the shapes (:func:`infer_config`)."""
    family = meta.get("model_family", "crate")
    where, namer = f"{path}: ", key_namer(meta, state, family)
    if arch == "auto" or (arch is None and stored is None and recorded_preset(meta) is None):
        reader = get_family(family).shape_reader
        if reader is not None:  # the family's own reader (its record)
            return _input_size(reader(state, heads), meta)
        if family == "crate_mae":
            return _mae_args(infer_mae_config(state, heads=heads, source=str(path), name_in_file=namer), meta)
        infer = infer_alpha_config if family == "crate_alpha" else infer_config
        return infer(state, heads=heads, source=str(path), name_in_file=namer)
    if arch is not None and not isinstance(arch, str):  # a configuration object of any family
        cfg = arch
    elif arch is not None:
        cfg = get_config(arch)
    else:
        cfg = stored if stored is not None else get_config(str(recorded_preset(meta)))
    if heads is not None and isinstance(cfg, CRATEMAEConfig):
        cfg = cfg.replace(
            heads=heads, dim_head=cfg.dim // heads, decoder_heads=heads, decoder_dim_head=cfg.dim // heads
        )
    elif heads is not None and get_family(family).shape_reader is None:  # (ToST's heads are in its shapes)
        cfg = _with_heads(cfg, heads, where)
    cfg = _input_size(_mae_args(cfg, meta), meta)
    if "head.weight" in state and cfg.num_classes != state["head.weight"].shape[0]:
        cfg = cfg.replace(num_classes=state["head.weight"].shape[0])
    return cfg
