"""CRATE-alpha's configuration from the tensor shapes of a state_dict in our key layout."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from torch import Tensor

from .alpha_presets import ALPHA_PRESETS
from .models.crate_alpha import CRATEAlphaConfig

__all__ = ["infer_alpha_config"]


def _shape(state: Mapping[str, Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"a CRATE-alpha state_dict needs {key!r}; it is missing")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise ValueError(f"{key} has shape {shape}; a CRATE-alpha file has a {ndim}-d tensor there")
    return shape


def infer_alpha_config(state: Mapping[str, Tensor], heads: int | None = None) -> CRATEAlphaConfig:
    """Dim, depth, patch and image size, dictionary ratio and class count from the shapes; the head count from
    ``heads=`` or from the preset of the same dim/depth (the shapes cannot tell it: U is ``(heads * dim_head, dim)``).
    """
    dim, channels, ph, pw = _shape(state, "patch_embed.proj.weight", 4)
    _, tokens, _ = _shape(state, "pos_embed", 3)
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise ValueError(f"pos_embed holds {tokens - 1} patch positions, not a square grid; pass image_size")
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise ValueError("no blocks.* tensors: this is not a CRATE-alpha state_dict")
    inner, _ = _shape(state, "blocks.0.mssa.subspace_proj.weight", 2)
    _, code_dim = _shape(state, "blocks.0.ista.dictionary", 2)
    num_classes = _shape(state, "head.weight", 2)[0] if "head.weight" in state else 0
    if heads is None:
        same = {c.heads for c in ALPHA_PRESETS.values() if (c.dim, c.depth, c.inner_dim) == (dim, depth, inner)}
        if len(same) != 1:
            raise ValueError(
                f"cannot tell the head count of a {dim}-dim, {depth}-layer CRATE-alpha from its shapes "
                f"(U has {inner} rows); pass heads="
            )
        heads = same.pop()
    if inner % heads:
        raise ValueError(f"heads={heads} does not divide the {inner} rows of U; pass the right heads=")
    return CRATEAlphaConfig(
        image_size=(grid * ph, grid * pw), patch_size=(ph, pw), num_classes=num_classes, dim=dim, depth=depth,
        heads=heads, dim_head=inner // heads, channels=channels, overcomplete=code_dim // dim,
    )  # fmt: skip
