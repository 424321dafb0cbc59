"""Which configuration to build for a file: its stored config, its ``arch`` entry, or its tensor shapes.

Files that do not record their architecture are read with :func:`read_config` (``arch="auto"``): the family
record's shape reader (at the end of its model file) reads what the shapes tell, then this module does, for every
family alike, what needs the presets: a head count the shapes cannot tell comes from ``heads=`` or from the
family's presets that share the record's ``head_facts``, and the configuration is named after the preset it equals.
A file's recorded training ``args`` set the fields the record's ``file_args`` names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import CheckpointError, UserError
from ..models import CRATEAlphaConfig, CRATEConfig, CRATEMAEConfig, Family, ShapeError
from ..presets import PRESET_INFO, get_config, resolve_name
from ..registry import family_for, get_family
from .keys import KeyNamer, described, key_namer

__all__ = [
    "family_presets",
    "infer_alpha_config",
    "infer_config",
    "infer_mae_config",
    "read_config",
    "recorded_preset",
    "resolve_config",
]


def family_presets(family: str) -> dict[str, Any]:
    """The registered presets of one family, name -> configuration."""
    return {n: p.config for n, p in PRESET_INFO.items() if p.family == family}


def _worded(err: ShapeError, where: str, name_in_file: KeyNamer | None) -> CheckpointError:
    """A shape reader's error with the file's path and the file's own names of the tensors."""
    return CheckpointError(where + err.worded(lambda key: described(key, name_in_file)))


def _heads_from_presets(record: Family, cfg: Any, presets: Mapping[str, Any], source: str) -> int:
    """The head count the presets of the same shape facts agree on; a one-paragraph error when none or several."""
    facts = record.head_facts(cfg)
    same = {n: p.heads for n, p in presets.items() if record.head_facts(p) == facts}
    if len(set(same.values())) == 1:
        return next(iter(same.values()))
    inner = cfg.heads * cfg.dim_head
    why = (
        f"presets of these shapes disagree ({', '.join(f'{n}: {h}' for n, h in sorted(same.items()))})"
        if same
        else f"no preset has {', '.join(facts[:-1])}{' and ' if len(facts) > 1 else ''}{facts[-1]}"
        if facts
        else f"{record.name} has no presets"
    )
    examples = [f"{h}x{inner // h}" for h in (1, 2, 3, 4, 6, 8, 12, 16) if inner % h == 0 and inner // h >= 8][-4:]
    raise CheckpointError(
        f"{source or 'the checkpoint'} does not record its architecture; pass arch= (a preset name such as "
        f"{_example_preset(presets)!r}) or heads=N: shapes alone cannot tell the head count ({inner} projection "
        f"columns fit {' or '.join(examples)} heads x width) and {why}"
    )


def _example_preset(presets: Mapping[str, Any]) -> str:
    names = sorted(presets, key=lambda n: (n.endswith(("_debug", "_digits", "_shapes")), len(n), n))
    return names[0] if names else "crate_small"


def read_config(
    state: Mapping[str, Tensor],
    family: str = "crate",
    heads: int | None = None,
    presets: Mapping[str, Any] | None = None,
    source: str = "",
    name_in_file: KeyNamer | None = None,
) -> Any:
    """The configuration a state dict (our key layout) of ``family`` was built with, read from its tensor shapes.

    The family record's ``shape_reader`` reads what the shapes tell; a head count they cannot tell is ``heads`` or
    that of the presets (``presets``: the family's registered ones) sharing the record's ``head_facts``; the
    configuration is named after the preset it equals. Raises :class:`CheckpointError` naming the tensor (as the
    file names it, through ``name_in_file``) when one it needs is missing or malformed, and when the head count is
    ambiguous.
    """
    record = get_family(family)
    where = f"{source}: " if source else ""
    if record.shape_reader is None:
        raise CheckpointError(f"{where}{family} state dicts cannot be read from their shapes; pass arch=")
    if presets is None:
        presets = family_presets(family)
    try:
        reading = record.shape_reader(state, heads)
        cfg = reading.config
        if not reading.heads_read:
            if record.with_heads is None:
                raise CheckpointError(f"{where}the shapes cannot tell the {family} head count; pass arch=")
            cfg = record.with_heads(cfg, _heads_from_presets(record, cfg, presets, source))
    except ShapeError as err:
        raise _worded(err, where, name_in_file) from None
    return cfg.replace(name=next((n for n, p in presets.items() if p == cfg), None))


def infer_config(
    state: Mapping[str, Tensor],
    heads: int | None = None,
    presets: Mapping[str, CRATEConfig] | None = None,
    source: str = "",
    name_in_file: KeyNamer | None = None,
) -> CRATEConfig:
    """A CRATE configuration from the tensor shapes of a state dict in our key layout (:func:`read_config`): dim,
    depth, channels, patch size, image size (square), class count, head layout and ablation from the shapes; the
    head count from ``heads`` or from the presets with the same dim, depth, projection width and head layout
    (``presets``: CRATE's registered ones by default)."""
    return read_config(state, "crate", heads, presets, source, name_in_file)


def infer_alpha_config(
    state: Mapping[str, Tensor],
    heads: int | None = None,
    presets: Mapping[str, Any] | None = None,
    source: str = "",
    name_in_file: KeyNamer | None = None,
) -> CRATEAlphaConfig:
    """A CRATE-alpha configuration from the tensor shapes of a state dict in our key layout (:func:`read_config`);
    the head count from ``heads`` or from the CRATE-alpha presets of the same dim, depth and projection width."""
    return read_config(state, "crate_alpha", heads, presets, source, name_in_file)


def infer_mae_config(
    state: Mapping[str, Tensor], heads: int | None = None, source: str = "", name_in_file: KeyNamer | None = None
) -> CRATEMAEConfig:
    """A CRATE-MAE configuration from the tensor shapes (our key layout, :func:`read_config`); the head count from
    ``heads`` or from the official preset of the same width."""
    return read_config(state, "crate_mae", heads, None, source, name_in_file)


def _file_args(cfg: Any, meta: Mapping[str, Any]) -> Any:
    """The configuration with the fields a file's recorded training ``args`` set (the family record's
    ``file_args``: FAIR MAE's mask ratio and loss target, DeiT/XCiT's ``input_size`` for ToST)."""
    args = meta.get("args")
    if not isinstance(args, Mapping):
        return cfg
    names = family_for(cfg).file_args
    changes = {field: args[arg] for arg, field in names.items() if isinstance(args.get(arg), (bool, int, float))}
    return cfg.replace(**changes) if changes else cfg


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
    stored: Any | None,
    meta: Mapping[str, Any],
    arch: str | Any | None = None,
    heads: int | None = None,
) -> Any:
    """The configuration to build for a file: ``arch`` (a config, a preset name or ``"auto"``), else the
    file's stored config, else its ``arch`` entry, else the shapes (:func:`read_config`)."""
    family = meta.get("model_family", "crate")
    where, namer = f"{path}: ", key_namer(meta, state, family)
    if arch == "auto" or (arch is None and stored is None and recorded_preset(meta) is None):
        return _file_args(read_config(state, family, heads, source=str(path), name_in_file=namer), meta)
    if arch is not None and not isinstance(arch, str):  # a configuration object of any family
        cfg = arch
    elif arch is not None:
        cfg = get_config(arch)
    else:
        cfg = stored if stored is not None else get_config(str(recorded_preset(meta)))
    with_heads = family_for(cfg).with_heads
    if heads is not None and with_heads is not None:  # (None: the shapes hold the head count, as ToST's)
        try:
            cfg = with_heads(cfg, heads)
        except ShapeError as err:
            raise _worded(err, where, namer) from None
    cfg = _file_args(cfg, meta)
    if "head.weight" in state and cfg.num_classes != state["head.weight"].shape[0]:
        cfg = cfg.replace(num_classes=state["head.weight"].shape[0])
    return cfg
