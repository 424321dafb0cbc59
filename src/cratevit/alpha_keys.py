"""CRATE-alpha's official key layout <-> ours: one table, both directions derived from it.

``{i}`` stands for a layer index. The official names are those of the released PyTorch files on the Hugging Face
Hub (``UCSC-VLAA/CRATE-alpha``, ``torch/*.pth``), which are plain state_dicts of ``torch_inference/model/
crate_alpha.py``. Every tensor keeps its shape: conversion is renaming only, so a round trip is bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

__all__ = ["ALPHA_KEY_TABLE", "from_alpha_reference_keys", "is_alpha_reference_state", "to_alpha_reference_keys"]

ALPHA_KEY_TABLE: tuple[tuple[str, str], ...] = (
    # (official, ours)
    ("conv1.weight", "patch_embed.proj.weight"),
    ("conv1.bias", "patch_embed.proj.bias"),
    ("cls_token", "cls_token"),
    ("pos_embedding", "pos_embed"),
    ("transformer.layers.{i}.0.norm.weight", "blocks.{i}.norm1.weight"),
    ("transformer.layers.{i}.0.norm.bias", "blocks.{i}.norm1.bias"),
    ("transformer.layers.{i}.0.fn.qkv.weight", "blocks.{i}.mssa.subspace_proj.weight"),
    ("transformer.layers.{i}.0.fn.to_out.0.weight", "blocks.{i}.mssa.out_proj.weight"),
    ("transformer.layers.{i}.1.norm.weight", "blocks.{i}.norm2.weight"),
    ("transformer.layers.{i}.1.norm.bias", "blocks.{i}.norm2.bias"),
    ("transformer.layers.{i}.1.fn.D", "blocks.{i}.ista.dictionary"),
    ("transformer.layers.{i}.1.fn.D1", "blocks.{i}.ista.decoder"),
    ("mlp_head.0.weight", "fc_norm.weight"),
    ("mlp_head.0.bias", "fc_norm.bias"),
    ("mlp_head.1.weight", "head.weight"),
    ("mlp_head.1.bias", "head.bias"),
)


def _compile(direction: int) -> list[tuple[re.Pattern[str], str]]:
    rules = []
    for pair in ALPHA_KEY_TABLE:
        source, target = pair[direction], pair[1 - direction]
        pattern = re.escape(source).replace(re.escape("{i}"), r"(?P<i>\d+)")
        rules.append((re.compile(pattern), target))
    return rules


_TO_OURS = _compile(0)
_TO_OFFICIAL = _compile(1)


def _rename(state: Mapping[str, Tensor], rules: list[tuple[re.Pattern[str], str]], what: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for pattern, template in rules:
            m = pattern.fullmatch(key)
            if m:
                out[template.replace("{i}", m.groupdict().get("i") or "")] = value
                break
        else:
            raise KeyError(f"unexpected key {key!r} in a {what} CRATE-alpha state_dict")
    return out


def from_alpha_reference_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official names (``transformer.layers.3.1.fn.D``, optional ``module.``) -> ours (``blocks.3.ista.dictionary``)."""
    return _rename({k.removeprefix("module."): v for k, v in state.items()}, _TO_OURS, "official")


def to_alpha_reference_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our names -> the official ones (for export)."""
    return _rename(state, _TO_OFFICIAL, "cratevit")


def is_alpha_reference_state(state: Mapping[str, object]) -> bool:
    """Whether a state_dict has the official CRATE-alpha layout (a convolutional stem and the ``fn.D1`` decoder)."""
    keys = {k.removeprefix("module.") for k in state}
    return "conv1.weight" in keys and any(k.endswith(".1.fn.D1") for k in keys)
