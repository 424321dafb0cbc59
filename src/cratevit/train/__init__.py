"""Training: the run configuration and recipes (:mod:`.config`), the engine (:mod:`.engine`) and the
multi-process helpers (:mod:`.distributed`)."""

from .config import COMMAND_BASES, RECIPES, TrainConfig, base_config, resolve_config
from .engine import Trainer, load_run_config, read_resume_checkpoint, train

__all__ = [
    "COMMAND_BASES",
    "RECIPES",
    "TrainConfig",
    "Trainer",
    "base_config",
    "load_run_config",
    "read_resume_checkpoint",
    "resolve_config",
    "train",
]
