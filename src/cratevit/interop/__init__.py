"""cratevit and the other libraries: timm registration (:mod:`.timm_models`), Hugging Face Hub save/load/push
(:mod:`.hub`) and export to safetensors, Hugging Face folders and ONNX (:mod:`.export`).

Importing :mod:`.hub` attaches ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` to the model classes;
importing :mod:`.timm_models` registers every preset with timm (:mod:`cratevit` does both when they are needed).
The names below are imported on first use, so that importing one submodule does not import timm.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    **dict.fromkeys(("attach_hub_methods", "from_pretrained", "push_to_hub", "save_pretrained"), ".hub"),
    **dict.fromkeys(("checkpoint_filter_fn", "register_timm_models"), ".timm_models"),
}

__all__ = [
    "attach_hub_methods",
    "checkpoint_filter_fn",
    "from_pretrained",
    "push_to_hub",
    "register_timm_models",
    "save_pretrained",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'cratevit.interop' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)
