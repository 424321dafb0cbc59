"""Reading a configuration off the tensor shapes of a bare state dict (our key layout): the parts every family's
shape reader shares.

A family record's ``shape_reader(state, heads)`` returns a :class:`ShapeReading`: the configuration the shapes
tell, and whether they told its head count. For the white-box backbone they cannot always: MSSA's projection
``U`` is ``(heads * dim_head, dim)``, so 12 heads of 64 and 6 of 128 have the same shapes. The reader then leaves
one head of the whole width, and :mod:`cratevit.checkpoint.infer` (above the presets) takes the head count from
the presets that share the record's ``head_facts`` (or asks for ``heads=``), and names the configuration after
the preset it equals; this file knows nothing of presets.

A tensor a reader needs that is missing or malformed raises :class:`ShapeError`, which names the tensor by our key;
the checkpoint layer words it with the file's own name for it and the file's path.

This file imports torch alone.
"""

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..errors import CheckpointError

__all__ = [
    "ShapeError",
    "ShapeReading",
    "backbone_head_facts",
    "backbone_heads",
    "backbone_with_heads",
    "class_count",
    "head_split",
    "layer_count",
    "need",
    "split_patch_dim",
    "square_grid",
]


class ShapeError(CheckpointError):
    """A bare state dict whose shapes cannot be read. ``template`` names the tensors it is about as ``{0}``,
    ``{1}`` ...; ``keys`` are their names in our layout (the message names them so until :meth:`worded`)."""

    def __init__(self, template: str, *keys: str) -> None:
        self.template, self.keys = template, keys
        super().__init__(template.format(*keys))

    def worded(self, name: Callable[[str], str]) -> str:
        """The message with each tensor named by ``name(our key)`` (e.g. ``"pos_embed (pos_embedding in the file)"``)."""
        return self.template.format(*(name(k) for k in self.keys))


@dataclass(frozen=True)
class ShapeReading:
    """What a state dict's shapes tell: ``config``, and ``heads_read`` False where they cannot split the attention's
    projection width into heads (``config`` then holds one head of the whole width, for the caller to split)."""

    config: Any
    heads_read: bool = True


def need(state: Mapping[str, Tensor], key: str, ndim: int) -> Tensor:
    """``state[key]``, checked to be there with ``ndim`` dimensions (a :class:`ShapeError` naming it otherwise)."""
    if key not in state:
        raise ShapeError(
            "tensor {0} is missing, so the architecture cannot be read from the shapes; the file is truncated or "
            "not a CRATE checkpoint",
            key,
        )
    if state[key].ndim != ndim:
        raise ShapeError(
            f"tensor {{0}} has shape {tuple(state[key].shape)}, expected {ndim} dimensions; the file is damaged or "
            "not a CRATE checkpoint",
            key,
        )
    return state[key]


def layer_count(state: Mapping[str, Tensor], prefix: str = "blocks", probe: str = "ista.dictionary") -> int:
    """How many layers ``{prefix}.{i}.*`` the state dict holds; a :class:`ShapeError` naming the first missing one
    (by its tensor ``{prefix}.{i}.{probe}``) when the indices have a gap."""
    layers = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    depth = max(layers) + 1 if layers else 0
    for i in range(depth):
        if i not in layers:
            raise ShapeError(f"every tensor of layer {i} is missing ({{0}} ...)", f"{prefix}.{i}.{probe}")
    return depth


def split_patch_dim(patch_dim: int) -> tuple[int, int] | None:
    """(channels, patch side) with ``channels * side**2 == patch_dim``, colour images first; None if neither fits."""
    for channels in (3, 1):
        side = math.isqrt(patch_dim // channels)
        if channels * side * side == patch_dim:
            return channels, side
    return None


def square_grid(pos_embed: Tensor) -> int | None:
    """The side of the square patch grid of a positional table ``(1, 1 + side**2, dim)``; None if it is not one."""
    patches = pos_embed.shape[1] - 1
    side = math.isqrt(max(patches, 0))
    return side if patches >= 1 and side * side == patches else None


def backbone_heads(dim: int, inner: int, out_proj: bool, heads: int | None) -> int | None:
    """The head count of a white-box attention whose projection is ``inner`` wide: ``heads`` when given (it must
    divide ``inner``), 1 when there is no output projection and ``inner == dim`` (a single head is the identity's
    width), None when the shapes cannot tell."""
    if heads is not None:
        if heads <= 0 or inner % heads:
            divisors = [h for h in range(1, inner + 1) if inner % h == 0][:12]
            raise ShapeError(
                f"heads={heads} does not divide the {inner}-wide subspace projection; choose one of {divisors}"
            )
        return heads
    if not out_proj and inner == dim:
        return 1
    return None


def head_split(inner: int, heads: int | None) -> dict[str, int]:
    """The configuration fields ``heads`` and ``dim_head`` of an ``inner``-wide projection: ``heads`` heads, or one
    head of the whole width when the head count is not known (the caller splits it later)."""
    n = heads or 1
    return {"heads": n, "dim_head": inner // n}


def class_count(state: Mapping[str, Tensor]) -> int:
    """The classifier's output width, from ``head.weight`` (0: no classifier)."""
    return state["head.weight"].shape[0] if "head.weight" in state else 0


def backbone_with_heads(cfg: Any, heads: int) -> Any:
    """A backbone configuration with its projection width ``heads * dim_head`` split into ``heads`` heads."""
    inner = cfg.heads * cfg.dim_head
    if heads <= 0 or inner % heads:
        raise ShapeError(f"heads={heads} does not divide the {inner}-wide subspace projection")
    return cfg.replace(heads=heads, dim_head=inner // heads)


def backbone_head_facts(cfg: Any) -> tuple[str, ...]:
    """What presets must share with a backbone configuration to lend it their head count: width, depth, projection
    width and head layout, in words (the error that finds none names them)."""
    facts = (f"dim {cfg.dim}", f"depth {cfg.depth}", f"a {cfg.heads * cfg.dim_head}-wide projection")
    return facts + (("a two-stage head",) if getattr(cfg, "head_hidden_dim", None) else ())
