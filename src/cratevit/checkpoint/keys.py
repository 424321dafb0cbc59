"""Key layouts of checkpoint files: which family and layout a state dict has, and its keys in either layout.

Each family's key table (:class:`~cratevit.models.KeyTable`: (reference name, our name) pairs with placeholders)
lives in its record at the end of its model file (``Family.key_table``); this module asks the registry for them and
converts whole state dicts. :data:`KEY_TABLES` is a read-only view of the registered tables, by family name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import Tensor

from ..errors import CheckpointError
from ..models import KeyTable
from ..registry import families, get_family

__all__ = [
    "CRATE_ALPHA_KEYS",
    "CRATE_KEYS",
    "CRATE_MAE_KEYS",
    "KEY_TABLES",
    "TOST_KEYS",
    "KeyTable",
    "from_reference_keys",
    "is_reference_state",
    "key_namer",
    "state_family",
    "strip_prefix",
    "to_reference_keys",
]

KeyNamer = Callable[[str], str]


class _KeyTables(Mapping[str, KeyTable]):
    """Family name -> its :class:`KeyTable`, read from the registered family records each time (read-only: a family
    brings its table in its record)."""

    def _tables(self) -> dict[str, KeyTable]:
        return {name: f.key_table for name, f in families().items() if f.key_table is not None}

    def __getitem__(self, name: str) -> KeyTable:
        return self._tables()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tables())

    def __len__(self) -> int:
        return len(self._tables())

    def __repr__(self) -> str:
        return f"KEY_TABLES({sorted(self._tables())})"


KEY_TABLES: Mapping[str, KeyTable] = _KeyTables()
"""Family name -> its :class:`KeyTable` of (reference name, cratevit name) pairs: a read-only view of the registry
(each table is its family record's ``key_table``)."""

# The built-in families' tables under their former names (each is the record's ``key_table``).
CRATE_KEYS: KeyTable = get_family("crate").key_table
"""CRATE's key table (``cratevit.models.crate.CRATE_KEYS``, its record's ``key_table``)."""
CRATE_ALPHA_KEYS: KeyTable = get_family("crate_alpha").key_table
"""CRATE-alpha's key table (``cratevit.models.crate_alpha.CRATE_ALPHA_KEYS``, its record's ``key_table``)."""
CRATE_MAE_KEYS: KeyTable = get_family("crate_mae").key_table
"""CRATE-MAE's key table (``cratevit.models.crate_mae.CRATE_MAE_KEYS``, its record's ``key_table``)."""
TOST_KEYS: KeyTable = get_family("tost").key_table
"""ToST's key table (``cratevit.models.tost.TOST_KEYS``, its record's ``key_table``)."""


def _covers(table: KeyTable, keys: list[str], to_ours: bool) -> bool:
    if to_ours:  # tensors the reference model holds but never reads (they are dropped when read)
        keys = [k for k in keys if k not in table.reference_unused]
    two_stage = (table.two_stage_reference_key if to_ours else table.two_stage_our_key) in keys
    rename = table.renamer(to_ours, two_stage)
    return bool(keys) and all(rename(k) is not None for k in keys)


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


def _convert(state: Mapping[str, Tensor], rename: Callable[[str], str | None], what: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = rename(key)
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
    return _convert(state, table.renamer(True, table.two_stage_reference_key in state), f"reference {family}")


def to_reference_keys(state: Mapping[str, Tensor], family: str = "crate") -> dict[str, Tensor]:
    """Our key layout -> the reference layout (without ``module.``), for export."""
    table = _table(family)
    return _convert(state, table.renamer(False, table.two_stage_our_key in state), "cratevit")


def key_namer(meta: Mapping[str, Any], state: Mapping[str, Tensor], family: str = "crate") -> KeyNamer:
    """Our key -> the name the same tensor has in the file (for error messages)."""
    if meta.get("layout") != "reference":
        return lambda key: key
    table = _table(family)
    prefix, rename = str(meta.get("key_prefix", "")), table.renamer(False, table.two_stage_our_key in state)
    return lambda key: prefix + (rename(key) or key)


def described(key: str, name_in_file: KeyNamer | None) -> str:
    name = name_in_file(key) if name_in_file else key
    return key if name == key else f"{key} ({name} in the file)"
