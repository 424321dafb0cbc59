"""A run's state on disk and how a run continues from it.

``--resume`` is ONE value, :class:`Resume`, built once from the checkpoint: its path, its run directory, the
checkpoint's contents and the configuration it records. The engine builds the model from the checkpoint's own
model configuration (not from ``--arch`` or ``--pretrained``: a fine-tune of a CRATE-MAE resumes after its
``--pretrained`` file is gone) and continues the run's counters, optimiser, schedule, random state and running
metrics window from it.

What may change on ``--resume``: options given on the command line beside it override the run's (e.g. more
``--epochs``); an edited ``config.json`` or a ``--config`` file is refused (one line saying which options differ
and how to pass them), and options that fix the architecture cannot change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, load_file
from ..errors import UserError
from .config import TrainConfig

__all__ = [
    "MODEL_OPTIONS",
    "Resume",
    "load_run_config",
    "read_resume_checkpoint",
    "resume_path",
    "rng_state",
    "set_rng_state",
]

MODEL_OPTIONS = ("arch", "image_size", "patch_size", "model_kwargs", "objective")
"""Options that fix the model a run trains: they cannot change on ``--resume`` (the checkpoint's model is
continued)."""


def resume_path(path: str | Path, option: str = "--resume") -> Path:
    """``--resume`` accepts a checkpoint file or a run directory (its ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"{option} {path}: no such checkpoint; pass a run directory or its last.pt")
    return path


def read_resume_checkpoint(path: str | Path, option: str = "--resume") -> dict[str, Any]:
    """A training checkpoint, read with ``weights_only=True``; ``option`` names the flag in messages."""
    path = resume_path(path, option)
    try:
        obj = load_file(path)
    except CheckpointError as e:  # corrupt, truncated, or not a checkpoint: one line
        raise UserError(f"{option} {e}") from None
    if not isinstance(obj, dict) or "train_config" not in obj or "optimizer" not in obj:
        raise UserError(
            f"{option} {path} is not a cratevit training checkpoint (no optimizer state); "
            f"use --pretrained to start from its weights instead"
        )
    return obj


def load_run_config(path: str | Path) -> TrainConfig:
    """The configuration of a run: from its ``config.json`` (or any YAML/JSON file), or from a checkpoint's
    ``train_config``."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"--config {path}: configuration file not found; pass a run's config.json")
    if path.suffix in (".json", ".yaml", ".yml"):
        import yaml  # JSON is YAML

        try:
            obj = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            reason = getattr(e, "problem", None) or type(e).__name__
            raise UserError(
                f"--config {path} is not valid YAML/JSON{at} ({reason}); fix the file or pass a run's config.json"
            ) from None
        return TrainConfig.from_dict(obj, source=f"--config {path}")
    return TrainConfig.from_dict(
        dict(read_resume_checkpoint(path, option="--config")["train_config"]), source=f"--config {path}"
    )


@dataclass(frozen=True)
class Resume:
    """The ``--resume`` checkpoint, read once: where it is, and what it holds."""

    path: Path  # the checkpoint file (absolute)
    state: dict[str, Any]  # its contents: weights, configurations, counters, optimiser, RNG, metrics window

    @classmethod
    def read(cls, spec: str | Path) -> Resume:
        """From ``--resume``: a run directory (its ``last.pt``) or a checkpoint file."""
        path = resume_path(spec).absolute()
        return cls(path, read_resume_checkpoint(path))

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    @property
    def config(self) -> TrainConfig:
        """The run's configuration as the checkpoint records it."""
        return TrainConfig.from_dict(dict(self.state["train_config"]), source=f"--resume {self.path}")

    def check_config_file(self) -> None:
        """Refuse a run directory whose ``config.json`` was edited since the checkpoint: the run would silently
        train with the checkpoint's values and then overwrite the file."""
        path = self.run_dir / "config.json"
        try:
            written = json.loads(path.read_text())
        except (OSError, ValueError):
            return  # missing or unreadable: the run writes it again
        changed = _differences(written, dict(self.state["train_config"]))
        if changed:
            raise UserError(
                f"--resume {self.run_dir}: {path.name} was edited since the checkpoint ({changed}); a resumed run "
                f"continues the checkpoint's configuration: give changed options on the command line beside "
                f"--resume (e.g. --epochs 60), or restore {path.name}"
            )

    def check_options(self, cfg: TrainConfig) -> None:
        """Options given beside ``--resume`` may not change the model the checkpoint holds."""
        before = self.config
        changed = [f"--{k.replace('_', '-')}" for k in MODEL_OPTIONS if getattr(cfg, k) != getattr(before, k)]
        if changed:
            raise UserError(
                f"--resume {self.run_dir}: {', '.join(changed)} cannot change on resume (the checkpoint holds "
                f"{before.arch}); leave {'it' if len(changed) == 1 else 'them'} out, or start a new run with "
                f"--pretrained {self.path}"
            )


def _differences(a: dict[str, Any], b: dict[str, Any], limit: int = 4) -> str:
    keys = sorted(k for k in {*a, *b} if a.get(k) != b.get(k))
    text = ", ".join(f"{k}: {b.get(k)!r} -> {a.get(k)!r}" for k in keys[:limit])
    return text + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def rng_state() -> dict[str, Any]:
    """Torch's CPU and CUDA random number generator states (for ``last.pt``)."""
    cuda = [s.cpu() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states of :func:`rng_state` (CUDA's only where both have it)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
