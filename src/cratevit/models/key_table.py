"""Key tables: how a family's weights are named in a foreign layout (its official code's) and in ours.

A table is written once, as (foreign name, our name) pairs with placeholders, and kept in the family's record
(``Family.key_table``, at the end of its model file); both directions are derived from it. ``{i}`` stands for a
layer index, ``{p}`` for ``weight`` or ``bias``, ``{b}`` for a BatchNorm's tensors. A family whose foreign files
come with two head layouts (CRATE's one-stage ``mlp_head`` = LN -> Linear(dim, classes), or the emergence demo's
two stages ``mlp_head`` = LN -> Linear(dim, hidden), ``head`` = Linear(hidden, classes)) lists the head pairs apart;
a key only one of the layouts has tells them apart. Plain string data and regular expressions: no torch.

:mod:`cratevit.checkpoint.keys` converts whole state dicts with these tables (and tells which family and layout a
file has); this module only names the keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["KeyTable", "Rule", "rename"]

Renamer = Callable[[str], "str | None"]

Rule = tuple[str, str]
"""A renaming rule: (pattern, template) for ``re.fullmatch`` / ``re.sub``."""

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
        """The renaming rules of one direction (reference -> ours when ``to_ours``) and one head layout."""
        pairs = self.body + (self.head_two_stage if two_stage else self.head_one_stage)
        return [_rule(src, dst) if to_ours else _rule(dst, src) for src, dst in pairs]

    def renamer(self, to_ours: bool, two_stage: bool) -> Renamer:
        """``key -> its name in the other layout`` for one direction and head layout (None: no pair names it)."""
        rules = self.rules(to_ours, two_stage)
        return lambda key: rename(key, rules)


def _rule(source: str, target: str) -> Rule:
    pattern = re.escape(source).replace(r"\{", "{").replace(r"\}", "}").format(**_PLACEHOLDERS)
    template = target.replace("{i}", r"\g<i>").replace("{p}", r"\g<p>").replace("{b}", r"\g<b>")
    return pattern, template


def rename(key: str, rules: list[Rule]) -> str | None:
    """``key`` renamed by the first rule whose pattern matches it whole; None when no rule does."""
    for pattern, template in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key)
    return None
