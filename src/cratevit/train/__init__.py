"""Training: the run configuration and recipes (:mod:`.config`), the loop (:mod:`.engine`) and its room: what it
builds (:mod:`.build`), the run state and ``--resume`` (:mod:`.state`), the run directory, lock and signals
(:mod:`.rundir`), logs, curves and progress (:mod:`.logs`), the objectives (:mod:`.objectives`), the memory
estimate (:mod:`.memory`) and the multi-process helpers (:mod:`.distributed`).

The names below are imported on first use, so that ``cratevit train --help`` (which reads the defaults from
:mod:`.config`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    **dict.fromkeys(("COMMAND_BASES", "RECIPES", "TrainConfig", "base_config", "resolve_config"), ".config"),
    **dict.fromkeys(("Trainer", "train"), ".engine"),
    **dict.fromkeys(("Resume", "load_run_config", "read_resume_checkpoint"), ".state"),
}

__all__ = [
    "COMMAND_BASES",
    "RECIPES",
    "Resume",
    "TrainConfig",
    "Trainer",
    "base_config",
    "load_run_config",
    "read_resume_checkpoint",
    "resolve_config",
    "train",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'cratevit.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)
