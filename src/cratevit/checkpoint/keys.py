"""Key tables: how each architecture family's weights are named in the reference layout and in ours.

One table per family (:data:`KEY_TABLES`), written once as (reference name, our name) pairs with placeholders;
both directions are derived from it. ``{i}`` stands for a layer index, ``{p}`` for ``weight`` or ``bias``.
The head rules depend on the head layout: one stage (``mlp_head`` = LN -> Linear(dim, classes)) or the
emergence demo's two stages (``mlp_head`` = LN -> Linear(dim, hidden), ``head`` = Linear(hidden, classes)).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..errors import CheckpointError

__all__ = [
    "KEY_TABLES",
    "KeyTable",
    "from_reference_keys",
    "is_reference_state",
    "key_namer",
    "state_family",
    "strip_prefix",
    "to_reference_keys",
]

KeyNamer = Callable[[str], str]
Rule = tuple[str, str]  # (pattern, template) for re.fullmatch / re.sub

_PLACEHOLDERS = {
    "i": r"(?P<i>\d+)",
    "p": r"(?P<p>weight|bias)",
    "b": r"(?P<b>weight|bias|running_mean|running_var|num_batches_tracked)",  # a BatchNorm's tensors
}


@dataclass(frozen=True)
class KeyTable:
    """(reference name, our name) pairs of one family; both directions are derived."""

    body: tuple[tuple[str, str], ...]
    reference_markers: tuple[str, ...]  # key prefixes only the reference layout has
    head_one_stage: tuple[tuple[str, str], ...] = ()  # families without head variants put the head in ``body``
    head_two_stage: tuple[tuple[str, str], ...] = ()
    two_stage_reference_key: str = "\0"  # present in a reference state_dict with a two-stage head ("\0": never)
    two_stage_our_key: str = "\0"  # present in our state_dict with a two-stage head
    reference_unused: tuple[str, ...] = ()  # tensors the reference model holds but its forward pass never reads

    def rules(self, to_ours: bool, two_stage: bool) -> list[Rule]:
        pairs = self.body + (self.head_two_stage if two_stage else self.head_one_stage)
        return [_rule(src, dst) if to_ours else _rule(dst, src) for src, dst in pairs]


def _rule(source: str, target: str) -> Rule:
    pattern = re.escape(source).replace(r"\{", "{").replace(r"\}", "}").format(**_PLACEHOLDERS)
    template = target.replace("{i}", r"\g<i>").replace("{p}", r"\g<p>").replace("{b}", r"\g<b>")
    return pattern, template


CRATE_KEYS = KeyTable(
    body=(
        ("pos_embedding", "pos_embed"),
        ("cls_token", "cls_token"),
        ("to_patch_embedding.1.{p}", "patch_embed.norm_in.{p}"),
        ("to_patch_embedding.2.{p}", "patch_embed.proj.{p}"),
        ("to_patch_embedding.3.{p}", "patch_embed.norm_out.{p}"),
        ("transformer.layers.{i}.0.norm.{p}", "blocks.{i}.norm1.{p}"),
        ("transformer.layers.{i}.0.fn.qkv.weight", "blocks.{i}.mssa.subspace_proj.weight"),
        ("transformer.layers.{i}.0.fn.to_out.0.{p}", "blocks.{i}.mssa.out_proj.{p}"),
        ("transformer.layers.{i}.1.norm.{p}", "blocks.{i}.norm2.{p}"),
        ("transformer.layers.{i}.1.fn.weight", "blocks.{i}.ista.dictionary"),
        ("mlp_head.0.{p}", "fc_norm.{p}"),
    ),
    head_one_stage=(("mlp_head.1.{p}", "head.{p}"),),
    head_two_stage=(("mlp_head.1.{p}", "pre_logits.{p}"), ("head.{p}", "head.{p}")),
    reference_markers=("transformer.layers.", "to_patch_embedding."),
    two_stage_reference_key="head.weight",
    two_stage_our_key="pre_logits.weight",
)

# CRATE-alpha: the released PyTorch files (Hub UCSC-VLAA/CRATE-alpha, torch/*.pth) are plain state_dicts of the
# official torch_inference/model/crate_alpha.py. Every tensor keeps its shape (D and D1 are (dim, 4 dim) in both).
CRATE_ALPHA_KEYS = KeyTable(
    body=(
        ("conv1.{p}", "patch_embed.proj.{p}"),
        ("cls_token", "cls_token"),
        ("pos_embedding", "pos_embed"),
        ("transformer.layers.{i}.0.norm.{p}", "blocks.{i}.norm1.{p}"),
        ("transformer.layers.{i}.0.fn.qkv.weight", "blocks.{i}.mssa.subspace_proj.weight"),
        ("transformer.layers.{i}.0.fn.to_out.0.weight", "blocks.{i}.mssa.out_proj.weight"),
        ("transformer.layers.{i}.1.norm.{p}", "blocks.{i}.norm2.{p}"),
        ("transformer.layers.{i}.1.fn.D", "blocks.{i}.ista.dictionary"),
        ("transformer.layers.{i}.1.fn.D1", "blocks.{i}.ista.decoder"),
        ("mlp_head.0.{p}", "fc_norm.{p}"),
    ),
    head_one_stage=(("mlp_head.1.{p}", "head.{p}"),),
    head_two_stage=(),
    reference_markers=("conv1.", "transformer.layers."),
    two_stage_reference_key="",
    two_stage_our_key="",
)

# CRATE-MAE as released (model/crate_ae/ of the CRATE repository, trained with FAIR's MAE code): timm's conv
# PatchEmbed, encoder blocks ``[PreNorm(Attention), PreNorm(ISTA)]``, decoder blocks ``[PreNorm(D x), PreNorm(Attention)]``.
# The official forward pass adds ``decoder_pos_embed`` to the encoder's input and never applies ``pos_embed`` or
# ``decoder_embed``: those are checked to be there and dropped.
CRATE_MAE_KEYS = KeyTable(
    body=(
        ("patch_embed.proj.{p}", "patch_embed.proj.{p}"),
        ("cls_token", "cls_token"),
        ("mask_token", "mask_token"),
        ("decoder_pos_embed", "pos_embed"),
        ("blocks.{i}.layers.0.0.norm.{p}", "blocks.{i}.norm1.{p}"),
        ("blocks.{i}.layers.0.0.fn.qkv.weight", "blocks.{i}.mssa.subspace_proj.weight"),
        ("blocks.{i}.layers.0.0.fn.to_out.0.{p}", "blocks.{i}.mssa.out_proj.{p}"),
        ("blocks.{i}.layers.0.1.norm.{p}", "blocks.{i}.norm2.{p}"),
        ("blocks.{i}.layers.0.1.fn.weight", "blocks.{i}.ista.dictionary"),
        ("norm.{p}", "norm.{p}"),
        ("decoder_blocks.{i}.layers.0.0.norm.{p}", "decoder_blocks.{i}.norm1.{p}"),
        ("decoder_blocks.{i}.layers.0.0.fn.weight", "decoder_blocks.{i}.dictionary"),
        ("decoder_blocks.{i}.layers.0.1.norm.{p}", "decoder_blocks.{i}.norm2.{p}"),
        ("decoder_blocks.{i}.layers.0.1.fn.qkv.weight", "decoder_blocks.{i}.mssa.subspace_proj.weight"),
        ("decoder_blocks.{i}.layers.0.1.fn.to_out.0.{p}", "decoder_blocks.{i}.mssa.out_proj.{p}"),
        ("decoder_norm.{p}", "decoder_norm.{p}"),
        ("decoder_pred.{p}", "decoder_pred.{p}"),
    ),
    reference_markers=("blocks.0.layers.0.", "decoder_blocks.0.layers.0."),
    reference_unused=("pos_embed", "decoder_embed.weight", "decoder_embed.bias"),
)

# ToST as its official code names it (tost_vision/tost.py; DeiT/XCiT-style main.py saves ``model``): the stem is a
# Sequential of (conv, BatchNorm) pairs with GELUs between, so stage s is ``proj.{2s}`` (up to patch 64 here); the
# TSSA layer is ``attn`` (``qkv`` = U, ``temp`` = tau, ``to_out.0``), LayerScale ``gamma1``/``gamma2``; the
# class-attention blocks are ``cls_attn_blocks`` with ``attn.proj`` as their output projection.
TOST_KEYS = KeyTable(
    body=(
        ("cls_token", "cls_token"),
        *(
            pair
            for s in range(6)
            for pair in (
                (f"patch_embed.proj.{2 * s}.0.weight", f"patch_embed.stages.{s}.conv.weight"),
                (f"patch_embed.proj.{2 * s}.1.{{b}}", f"patch_embed.stages.{s}.norm.{{b}}"),
            )
        ),
        ("pos_embeder.token_projection.{p}", "pos_embed.proj.{p}"),
        ("blocks.{i}.norm1.{p}", "blocks.{i}.norm1.{p}"),
        ("blocks.{i}.attn.qkv.{p}", "blocks.{i}.tssa.subspace_proj.{p}"),
        ("blocks.{i}.attn.temp", "blocks.{i}.tssa.temperature"),
        ("blocks.{i}.attn.to_out.0.{p}", "blocks.{i}.tssa.out_proj.{p}"),
        ("blocks.{i}.gamma1", "blocks.{i}.gamma_attn"),
        ("blocks.{i}.norm2.{p}", "blocks.{i}.norm2.{p}"),
        ("blocks.{i}.mlp.fc1.{p}", "blocks.{i}.mlp.fc1.{p}"),
        ("blocks.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.fc2.{p}"),
        ("blocks.{i}.gamma2", "blocks.{i}.gamma_mlp"),
        ("cls_attn_blocks.{i}.norm1.{p}", "class_blocks.{i}.norm1.{p}"),
        ("cls_attn_blocks.{i}.attn.qkv.{p}", "class_blocks.{i}.attn.qkv.{p}"),
        ("cls_attn_blocks.{i}.attn.proj.{p}", "class_blocks.{i}.attn.out_proj.{p}"),
        ("cls_attn_blocks.{i}.gamma1", "class_blocks.{i}.gamma_attn"),
        ("cls_attn_blocks.{i}.norm2.{p}", "class_blocks.{i}.norm2.{p}"),
        ("cls_attn_blocks.{i}.mlp.fc1.{p}", "class_blocks.{i}.mlp.fc1.{p}"),
        ("cls_attn_blocks.{i}.mlp.fc2.{p}", "class_blocks.{i}.mlp.fc2.{p}"),
        ("cls_attn_blocks.{i}.gamma2", "class_blocks.{i}.gamma_mlp"),
        ("norm.{p}", "norm.{p}"),
        ("head.{p}", "head.{p}"),
    ),
    reference_markers=("cls_attn_blocks.", "pos_embeder."),
)

KEY_TABLES: dict[str, KeyTable] = {
    "crate": CRATE_KEYS,
    "crate_alpha": CRATE_ALPHA_KEYS,
    "crate_mae": CRATE_MAE_KEYS,
    "tost": TOST_KEYS,
}
"""Family name -> its :class:`KeyTable` of (reference name, cratevit name) pairs."""


def _covers(table: KeyTable, keys: list[str], to_ours: bool) -> bool:
    if to_ours:  # tensors the reference model holds but never reads (they are dropped when read)
        keys = [k for k in keys if k not in table.reference_unused]
    two_stage = (table.two_stage_reference_key if to_ours else table.two_stage_our_key) in keys
    rules = table.rules(to_ours, two_stage)
    return bool(keys) and all(rename(k, rules) is not None for k in keys)


def state_family(state: Mapping[str, Any]) -> tuple[str, str]:
    """(architecture family, key layout ``"reference"`` or ``"cratevit"``) of a state_dict: the first family whose
    key table names every key, in either layout. Files no table covers count as CRATE (its errors then name
    the keys that do not fit)."""
    keys = [k.removeprefix("module.") for k in state]
    for layout, to_ours in (("cratevit", False), ("reference", True)):
        for family, table in KEY_TABLES.items():
            if _covers(table, keys, to_ours):
                return family, layout
    return "crate", "reference" if is_reference_state(state) else "cratevit"


def _table(family: str) -> KeyTable:
    try:
        return KEY_TABLES[family]
    except KeyError:
        raise CheckpointError(f"no key table for architecture family {family!r}; known: {sorted(KEY_TABLES)}") from None


def rename(key: str, rules: list[Rule]) -> str | None:
    for pattern, template in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key)
    return None


def _convert(state: Mapping[str, Tensor], rules: list[Rule], what: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = rename(key, rules)
        if new is None:
            raise CheckpointError(f"unexpected key {key!r} in a {what} state_dict: this is not a CRATE checkpoint")
        out[new] = value
    return out


def strip_prefix(state: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """The state dict without the DDP ``module.`` prefix (or another ``prefix``) on its keys."""
    return {k.removeprefix(prefix): v for k, v in state.items()}


def is_reference_state(state: Mapping[str, Any], family: str = "crate") -> bool:
    """Whether a state dict uses the reference code's key names for that family."""
    markers = _table(family).reference_markers
    return any(k.removeprefix("module.").startswith(markers) for k in state)


def from_reference_keys(state: Mapping[str, Tensor], family: str = "crate") -> dict[str, Tensor]:
    """Reference key layout (``transformer.layers.3.1.fn.weight``, optional ``module.``) -> ours.

    A separate ``head.*`` next to ``mlp_head.*`` marks the demo's two-stage head: ``mlp_head.1`` becomes
    ``pre_logits`` and ``head`` stays ``head``.
    """
    table = _table(family)
    state = strip_prefix(state)
    missing = [k for k in table.reference_unused if k not in state]
    if missing:
        raise CheckpointError(f"the {family} reference state_dict lacks {missing}; the file is truncated or damaged")
    state = {k: v for k, v in state.items() if k not in table.reference_unused}
    return _convert(state, table.rules(True, table.two_stage_reference_key in state), f"reference {family}")


def to_reference_keys(state: Mapping[str, Tensor], family: str = "crate") -> dict[str, Tensor]:
    """Our key layout -> the reference layout (without ``module.``), for export."""
    table = _table(family)
    return _convert(state, table.rules(False, table.two_stage_our_key in state), "cratevit")


def key_namer(meta: Mapping[str, Any], state: Mapping[str, Tensor], family: str = "crate") -> KeyNamer:
    """Our key -> the name the same tensor has in the file (for error messages)."""
    if meta.get("layout") != "reference":
        return lambda key: key
    table = _table(family)
    prefix, rules = str(meta.get("key_prefix", "")), table.rules(False, table.two_stage_our_key in state)
    return lambda key: prefix + (rename(key, rules) or key)


def described(key: str, name_in_file: KeyNamer | None) -> str:
    name = name_in_file(key) if name_in_file else key
    return key if name == key else f"{key} ({name} in the file)"
