"""Reading and writing CRATE weights: every released CRATE checkpoint family loads with one call.

Families, recognised from the file's own structure (``meta["family"]`` after :func:`read_checkpoint`):

* ``cratevit``: ``torch.save`` of ``{"format": "cratevit", "config": {...}, "model": state_dict, ...}``;
* ``cratevit-safetensors``: our ``.safetensors`` export (the config is kept in the file's metadata);
* ``reference``: ImageNet-1K training checkpoints of the original ``main.py``: ``{"state_dict", "epoch",
  "arch", "best_acc1", "optimizer", "scheduler"}`` with ``module.`` prefixed keys;
* ``reference-finetune``: checkpoints of the original ``finetune.py``: ``{"model", "optimizer", "scaler"}``, keys
  prefixed ``module.`` (DataParallel);
* ``emergence-demo``: the emergence-demo models (``CRATE_base_demo``, ``CRATE_small_21k``, ``CRATE_base_21k``,
  ``CRATE_base_768``): weights under ``"model"``, keys without prefix; ``CRATE_base_demo`` has a two-stage head,
  ``mlp_head`` = LayerNorm -> Linear(768, 768), then ``head`` = Linear(768, 21842), no activation between;
* ``reference-state-dict`` / ``cratevit-state-dict``: a bare state_dict in either key layout.

Every file is read with ``torch.load(weights_only=True)`` (or safetensors): loading a checkpoint never runs code.
Loading is strict: every tensor of the file is used and none of the model's is missing; errors name the key in
our layout and in the file's.

One converter maps the reference key layout to ours (:func:`from_reference_keys`) and back
(:func:`to_reference_keys`). Files that do not record their architecture are read with :func:`infer_config`
(``arch="auto"``): dim, depth, patch size, image size, class count and head layout come from the tensor shapes,
the head count from the preset table or an explicit ``heads=``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .model import CRATE, CRATEConfig

__all__ = [
    "FAMILIES",
    "FORMAT",
    "CheckpointError",
    "atomic_save",
    "from_reference_keys",
    "infer_config",
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

FAMILIES: dict[str, str] = {
    "cratevit": "cratevit checkpoint: format tag, configuration, weights",
    "cratevit-safetensors": "cratevit .safetensors export (configuration in the metadata)",
    "cratevit-state-dict": "bare state_dict in the cratevit key layout",
    "reference": "original main.py (ImageNet-1K training): state_dict with module. keys, epoch, arch, optimizer",
    "reference-finetune": "original finetune.py: model with module. keys, optimizer, scaler",
    "emergence-demo": "model without prefix: the emergence-demo weights (CRATE_base_demo, CRATE_*_21k, CRATE_base_768)",
    "reference-state-dict": "bare state_dict in the reference key layout",
}

KeyNamer = Callable[[str], str]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------- key conversion
# (reference regex, our template); applied to keys without the "module." prefix. The head rules depend on the
# head layout: one stage (mlp_head = LN -> Linear(dim, classes)) or the demo's two stages (mlp_head = LN ->
# Linear(dim, hidden), head = Linear(hidden, classes)).
_REFERENCE_BODY: list[tuple[str, str]] = [
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
]
_REFERENCE_HEAD_ONE_STAGE = [(r"mlp_head\.1\.(weight|bias)", r"head.\1")]
_REFERENCE_HEAD_TWO_STAGE = [(r"mlp_head\.1\.(weight|bias)", r"pre_logits.\1"), (r"head\.(weight|bias)", r"head.\1")]
_OURS_BODY: list[tuple[str, str]] = [
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
]
_OURS_HEAD_ONE_STAGE = [(r"head\.(weight|bias)", r"mlp_head.1.\1")]
_OURS_HEAD_TWO_STAGE = [(r"pre_logits\.(weight|bias)", r"mlp_head.1.\1"), (r"head\.(weight|bias)", r"head.\1")]


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, template in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key)
    return None


def _convert(state: Mapping[str, Tensor], rules: list[tuple[str, str]], what: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = _rename(key, rules)
        if new is None:
            raise CheckpointError(f"unexpected key {key!r} in a {what} state_dict: this is not a CRATE checkpoint")
        out[new] = value
    return out


def strip_prefix(state: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items()}


def is_reference_state(state: Mapping[str, Any]) -> bool:
    return any(k.removeprefix("module.").startswith(("transformer.layers.", "to_patch_embedding.")) for k in state)


def _reference_rules(two_stage: bool) -> list[tuple[str, str]]:
    return _REFERENCE_BODY + (_REFERENCE_HEAD_TWO_STAGE if two_stage else _REFERENCE_HEAD_ONE_STAGE)


def _ours_rules(two_stage: bool) -> list[tuple[str, str]]:
    return _OURS_BODY + (_OURS_HEAD_TWO_STAGE if two_stage else _OURS_HEAD_ONE_STAGE)


def from_reference_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Reference key layout (``transformer.layers.3.1.fn.weight``, optional ``module.``) -> ours.

    A separate ``head.*`` next to ``mlp_head.*`` marks the demo's two-stage head: ``mlp_head.1`` becomes
    ``pre_logits`` and ``head`` stays ``head``.
    """
    state = strip_prefix(state)
    return _convert(state, _reference_rules("head.weight" in state), "reference CRATE")


def to_reference_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our key layout -> the reference layout (without ``module.``), for export."""
    return _convert(state, _ours_rules("pre_logits.weight" in state), "cratevit")


def _key_namer(meta: Mapping[str, Any], two_stage: bool) -> KeyNamer:
    """Our key -> the name the same tensor has in the file (for error messages)."""
    if meta.get("layout") != "reference":
        return lambda key: key
    prefix, rules = str(meta.get("key_prefix", "")), _ours_rules(two_stage)
    return lambda key: prefix + (_rename(key, rules) or key)


def _described(key: str, name_in_file: KeyNamer | None) -> str:
    name = name_in_file(key) if name_in_file else key
    return key if name == key else f"{key} ({name} in the file)"


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
        if "Unsupported global" in str(e) or "GLOBAL " in str(e):  # a class or function the file wants to import
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
    return {"layout": "reference" if is_reference_state(weights) else "cratevit", "key_prefix": prefix}


def _to_ours(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return from_reference_keys(weights) if is_reference_state(weights) else strip_prefix(weights)


def _weights_entry(obj: Mapping[str, Any], path: Path) -> tuple[str, str, Mapping[str, Tensor]]:
    """(family, entry name or '', weights) of a checkpoint dict, told apart by the file's own structure."""
    if isinstance(obj.get("state_dict"), Mapping):
        weights = _tensors(obj["state_dict"], path, "state_dict")
        return ("reference" if is_reference_state(weights) else "cratevit-state-dict"), "state_dict", weights
    if isinstance(obj.get("model"), Mapping):
        weights = _tensors(obj["model"], path, "model")
        if not is_reference_state(weights):
            return "cratevit-state-dict", "model", weights
        prefixed = _layout(weights)["key_prefix"] == "module."
        return ("reference-finetune" if prefixed else "emergence-demo"), "model", weights
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        family = "reference-state-dict" if is_reference_state(obj) else "cratevit-state-dict"
        return family, "", obj
    raise CheckpointError(
        f"{path} is not a CRATE checkpoint: expected a cratevit checkpoint, a reference checkpoint with "
        f"'state_dict' or 'model', or a bare state_dict; found keys {sorted(map(str, obj))[:8]}"
    )


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], CRATEConfig | None, dict[str, Any]]:
    """Read any supported file -> (state_dict in our key layout, stored config or None, the rest of the file).

    The returned ``meta`` dict holds what else the file carried (``epoch``, ``arch``, ``optimizer`` ...),
    ``"family"`` (a key of :data:`FAMILIES`), ``"layout"`` (``"reference"`` or ``"cratevit"``: the file's key
    layout) and ``"key_prefix"`` (``"module."`` or ``""``).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state, meta = _read_safetensors(path)
        cfg = CRATEConfig.from_dict(json.loads(meta["config"])) if "config" in meta else None
        rest = {k: v for k, v in meta.items() if k != "config"}
        return _to_ours(state), cfg, {"family": "cratevit-safetensors", **rest, **_layout(state)}
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state_dict")
    if obj.get("format") == FORMAT:
        meta = {k: v for k, v in obj.items() if k not in ("model", "config")}
        cfg = CRATEConfig.from_dict(dict(obj["config"]))
        return dict(obj["model"]), cfg, {"family": "cratevit", **meta, "layout": "cratevit", "key_prefix": ""}
    family, entry, weights = _weights_entry(obj, path)
    meta = {k: v for k, v in obj.items() if entry and k != entry}
    return _to_ours(weights), None, {"family": family, **meta, **_layout(weights)}


# --------------------------------------------------------------------------------------------- arch="auto"
def _need(state: Mapping[str, Tensor], key: str, ndim: int, where: str, name_in_file: KeyNamer | None) -> Tensor:
    if key not in state:
        raise CheckpointError(
            f"{where}tensor {_described(key, name_in_file)} is missing, so the architecture cannot be read from "
            f"the shapes; the file is truncated or not a CRATE checkpoint"
        )
    if state[key].ndim != ndim:
        raise CheckpointError(
            f"{where}tensor {_described(key, name_in_file)} has shape {tuple(state[key].shape)}, expected "
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
            raise CheckpointError(f"{where}every tensor of layer {i} is missing ({_described(key, name_in_file)} ...)")
    return depth


def _head_count(dims: dict[str, Any], heads: int | None, presets: Mapping[str, CRATEConfig], source: str) -> int:
    """Heads from ``heads=``, the absence of an output projection (1 head), or the presets of the same shape."""
    dim, inner = dims["dim"], dims["inner_dim"]
    where = f"{source}: " if source else ""
    if heads is not None:
        if heads <= 0 or inner % heads:
            divisors = [h for h in range(1, inner + 1) if inner % h == 0][:12]
            raise CheckpointError(f"{where}heads={heads} does not divide the {inner}-wide subspace projection; "
                                  f"choose one of {divisors}")  # fmt: skip
        return heads
    if not dims["out_proj"] and inner == dim:
        return 1
    two_stage = dims["head_hidden_dim"] is not None
    same = {n: p.heads for n, p in presets.items()
            if (p.dim, p.depth, p.inner_dim, p.head_hidden_dim is not None) == (dim, dims["depth"], inner, two_stage)}  # fmt: skip
    if len(set(same.values())) == 1:
        return next(iter(same.values()))
    why = (f"presets of these shapes disagree ({', '.join(f'{n}: {h}' for n, h in sorted(same.items()))})" if same
           else f"no preset has dim {dim}, depth {dims['depth']} and a {inner}-wide projection")  # fmt: skip
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
    from .presets import PRESETS

    where = f"{source}: " if source else ""
    pos = _need(state, "pos_embed", 3, where, name_in_file)
    proj = _need(state, "patch_embed.proj.weight", 2, where, name_in_file)
    qkv = _need(state, "blocks.0.mssa.subspace_proj.weight", 2, where, name_in_file)
    dim, num_patches = pos.shape[2], pos.shape[1] - 1
    split = _split_patch_dim(proj.shape[1])
    grid = math.isqrt(max(num_patches, 0))
    if split is None or grid * grid != num_patches or num_patches < 1:
        raise CheckpointError(
            f"{where}cannot read a square patch grid from {_described('pos_embed', name_in_file)} "
            f"{tuple(pos.shape)} and {_described('patch_embed.proj.weight', name_in_file)} {tuple(proj.shape)}; "
            f"pass arch= a CRATEConfig with the image and patch size"
        )
    channels, patch = split
    dims = {
        "dim": dim,
        "depth": _depth(state, where, name_in_file),
        "inner_dim": qkv.shape[0],
        "out_proj": "blocks.0.mssa.out_proj.weight" in state,
        "head_hidden_dim": state["pre_logits.weight"].shape[0] if "pre_logits.weight" in state else None,
    }
    n_heads = _head_count(dims, heads, PRESETS if presets is None else presets, source)
    cfg = CRATEConfig(
        image_size=grid * patch, patch_size=patch, channels=channels, dim=dim, depth=dims["depth"], heads=n_heads,
        dim_head=dims["inner_dim"] // n_heads, head_hidden_dim=dims["head_hidden_dim"],
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
    )  # fmt: skip
    match = next((n for n, p in (PRESETS if presets is None else presets).items() if p == cfg), None)
    return cfg.replace(name=match)


# --------------------------------------------------------------------------------------------- loading
def load_state_dict_strict(
    model: CRATE,
    state: Mapping[str, Tensor],
    drop_head: bool = False,
    source: str = "",
    name_in_file: KeyNamer | None = None,
    hint: str | None = None,
) -> None:
    """Load ``state`` (our key layout) into ``model``: every key used, none missing, every shape equal.

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
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             + (f" ({name_in_file(k)} in the file)" if name_in_file and name_in_file(k) != k else "")
             for k in state if k in own and state[k].shape != own[k].shape]  # fmt: skip
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
        hint = hint or ("the checkpoint is for another architecture; build the matching preset, or load it with "
                        "load_checkpoint(path, arch='auto')" if not drop_head
                        else "the checkpoint body does not match this architecture")  # fmt: skip
        only_head = not missing and not unexpected and all(w.split(":")[0] in HEAD_KEYS for w in wrong)
        if only_head:
            hint = "the classifier has another class count; pass drop_head=True (or num_classes=) to re-initialise it"
        where = f"{source}: " if source else ""
        raise CheckpointError(f"{where}checkpoint does not fit the model ({'; '.join(parts)}); {hint}")
    with torch.no_grad():
        model.load_state_dict(state, strict=not drop_head)


def _namer(state: Mapping[str, Tensor], meta: Mapping[str, Any]) -> KeyNamer:
    return _key_namer(meta, two_stage="pre_logits.weight" in state)


def load_into(model: CRATE, path: str | Path, drop_head: bool = False) -> dict[str, Any]:
    """Load the weights of ``path`` into ``model`` strictly; returns the file's other contents."""
    state, _, meta = read_checkpoint(path)
    load_state_dict_strict(model, state, drop_head=drop_head, source=str(path), name_in_file=_namer(state, meta))
    return meta


def _with_heads(cfg: CRATEConfig, heads: int, where: str) -> CRATEConfig:
    if heads <= 0 or cfg.inner_dim % heads:
        raise CheckpointError(f"{where}heads={heads} does not divide the {cfg.inner_dim}-wide subspace projection")
    return cfg.replace(heads=heads, dim_head=cfg.inner_dim // heads)


def _recorded_preset(meta: Mapping[str, Any]) -> str | None:
    """The file's own ``arch`` entry when it names a preset (``CRATE_small`` of main.py)."""
    from .presets import resolve_name

    arch = meta.get("arch")
    if not isinstance(arch, str):
        return None
    try:
        return resolve_name(arch)
    except ValueError:
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
    from .presets import get_config

    where, namer = f"{path}: ", _namer(state, meta)
    if arch == "auto" or (arch is None and stored is None and _recorded_preset(meta) is None):
        return infer_config(state, heads=heads, source=str(path), name_in_file=namer)
    if isinstance(arch, CRATEConfig):
        cfg = arch
    elif arch is not None:
        cfg = get_config(arch)
    else:
        cfg = stored if stored is not None else get_config(str(_recorded_preset(meta)))
    if heads is not None:
        cfg = _with_heads(cfg, heads, where)
    if "head.weight" in state and cfg.num_classes != state["head.weight"].shape[0]:
        cfg = cfg.replace(num_classes=state["head.weight"].shape[0])
    return cfg


def _misfit_hint(arch: str | CRATEConfig | None, stored: CRATEConfig | None, meta: Mapping[str, Any]) -> str | None:
    """What a strict-load misfit means, given where the configuration came from (None: the default advice)."""
    if arch is not None and arch != "auto":
        return None
    if arch is None and stored is None and _recorded_preset(meta) is not None:
        return (f"the file's arch entry {meta['arch']!r} does not fit its tensors: the file is damaged, or load it "
                f"with load_checkpoint(path, arch='auto') to read the architecture from the shapes")  # fmt: skip
    return "the file is damaged or incomplete: its tensors do not match the architecture it describes"


def load_checkpoint(
    path: str | Path, arch: str | CRATEConfig | None = None, heads: int | None = None, **overrides: Any
) -> CRATE:
    """Build the model a checkpoint describes and load its weights strictly; any family of :data:`FAMILIES`.

    ``arch``: a preset name, a :class:`CRATEConfig`, or ``"auto"`` (read the architecture from the tensor
    shapes). By default the file's stored configuration is used, else its ``arch`` entry, else ``"auto"``.
    ``heads`` gives the head count where shapes cannot (6 heads of 128 and 12 of 64 have the same tensors).
    ``overrides`` change the configuration (e.g. ``dynamic_img_size=True``).
    """
    state, stored, meta = read_checkpoint(path)
    cfg = resolve_config(path, state, stored, meta, arch=arch, heads=heads)
    if overrides:
        cfg = cfg.replace(**overrides)
    model = CRATE(config=cfg)
    hint = _misfit_hint(arch, stored, meta)
    load_state_dict_strict(model, state, source=str(path), name_in_file=_namer(state, meta), hint=hint)
    warn_non_finite(state, path)
    return model


def non_finite_keys(state: Mapping[str, Tensor]) -> list[str]:
    """The floating-point tensors that hold NaN or infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]


def warn_non_finite(state: Mapping[str, Tensor], path: str | Path) -> list[str]:
    """Warn (once, one line) when a checkpoint's weights hold NaN or infinity: its outputs will be NaN."""
    bad = non_finite_keys(state)
    if bad:
        import warnings

        from .cli import CratevitWarning

        warnings.warn(f"{path} holds non-finite weights (NaN or infinity in {len(bad)} of {len(state)} tensors, "
                      f"e.g. {bad[0]}): the model's outputs will not be numbers; use an earlier checkpoint",
                      CratevitWarning, stacklevel=3)  # fmt: skip
    return bad


# --------------------------------------------------------------------------------------------- writing
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
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "config": json.dumps(model.config.to_dict())})
    return path
