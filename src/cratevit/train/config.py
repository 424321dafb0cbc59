"""What a training run is: :class:`TrainConfig`, the recipes of each kind of data, and each command's base.

This is the one place training defaults live:

* :class:`TrainConfig` field defaults (``None``: take the data's recipe);
* :data:`RECIPES`: per kind of data (digits, shapes, an image folder, transfer, dummy), the values of the
  ``None`` fields; explicit options always win;
* :data:`COMMAND_BASES`: what each command starts from (``cratevit finetune``: ``--data cifar10``).

The command-line options (:mod:`cratevit.cli.train`) carry no defaults of their own: an option not given leaves
the configuration's value (recipe, ``--config`` or ``--resume``), and its help text reads the default from here.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any

from ..data import DataInfo
from ..errors import UserError

__all__ = [
    "COMMAND_BASES",
    "MAE_RECIPE",
    "OBJECTIVES",
    "PRETRAIN_RECIPES",
    "RECIPES",
    "TrainConfig",
    "base_config",
    "default_of",
    "resolve_config",
]


@dataclass
class TrainConfig:
    """Everything that defines a training or fine-tuning run (``None``: take the data's recipe)."""

    # model
    arch: str | None = None  # a cratevit preset (crate_tiny, CRATE_small, ...) or any timm model name
    pretrained: str | None = None  # checkpoint to start from (reference or cratevit); its head is replaced
    image_size: int | None = None
    patch_size: int | None = None
    model_kwargs: dict[str, Any] | None = None  # more model options: CRATEConfig fields or timm kwargs
    objective: str = "classification"  # classification | mae (masked autoencoding: cratevit pretrain)
    # data
    data: str = "digits"  # digits | shapes | cifar10 | cifar100 | flower | pets | a folder with train/ and val/
    data_dir: str | None = None  # where the torchvision datasets live (or are downloaded to)
    dummy: bool = False  # synthetic data, for benchmarking the loop
    num_classes: int | None = None  # only for --dummy (default 1000)
    randaug: bool = False
    download: bool = True
    workers: int | None = None
    # optimisation
    epochs: int | None = None
    batch_size: int | None = None  # global batch: split evenly across torchrun processes
    optimizer: str | None = None  # any timm optimizer: lion, adamw, sgd, ...
    lr: float | None = None
    blr: float | None = None  # base learning rate: lr = blr * batch_size / 256 when --lr is not given (MAE)
    betas: list[float] | None = None  # Adam-type betas (default: the optimizer's)
    weight_decay: float = 0.05
    momentum: float = 0.9
    warmup_epochs: float | None = None
    min_lr: float = 0.0
    clip_grad: float | None = 1.0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    amp: str = "none"  # none | bf16 | fp16
    compile: bool = False
    grad_checkpointing: bool = False
    # run
    output: str | None = None
    seed: int = 0
    print_freq: int = 10
    steps_per_epoch: int | None = None  # cap on the training steps of each epoch (quick runs)
    tensorboard: bool = False
    device: str = "auto"
    threads: int | None = None  # torch intra-op CPU threads (default: the recipe's, else torch's)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown training option(s) {unknown}; known options: {sorted(known)}")
        return cls(**d)


# The recipe of each kind of data; explicit options always win.
RECIPES: dict[str, dict[str, Any]] = {
    "digits": {"arch": "crate_digits", "epochs": 30, "batch_size": 64, "optimizer": "adamw", "lr": 2e-3,
               "warmup_epochs": 2.0, "workers": 0, "threads": 1},
    "shapes": {"arch": "crate_nano", "epochs": 30, "batch_size": 64, "optimizer": "adamw", "lr": 1e-3,
               "warmup_epochs": 2.0},
    "folder": {"arch": "crate_tiny", "epochs": 200, "batch_size": 512, "optimizer": "lion", "lr": 2e-4,
               "warmup_epochs": 5.0},
    "transfer": {"arch": "crate_tiny", "epochs": 200, "batch_size": 256, "optimizer": "adamw", "lr": 5e-5,
                 "warmup_epochs": 5.0},
}  # fmt: skip
RECIPES["dummy"] = RECIPES["folder"]

# The MAE pre-training recipe (He et al. 2022, FAIR's main_pretrain.py and PRETRAIN.md; the CRATE-MAE README trains
# with it): AdamW with betas (0.9, 0.95), base lr 1.5e-4 scaled by batch/256, weight decay 0.05, cosine decay after
# a 40-epoch warmup, 800 epochs of batch 4096, no gradient clipping. The built-in data use it with fewer, shorter
# epochs and a larger base lr (6e-3: lr 1.5e-3 at batch 64), so that a run takes minutes.
MAE_RECIPE: dict[str, Any] = {
    "optimizer": "adamw",
    "betas": [0.9, 0.95],
    "blr": 1.5e-4,
    "epochs": 800,
    "batch_size": 4096,
    "warmup_epochs": 40.0,
}
PRETRAIN_RECIPES: dict[str, dict[str, Any]] = {
    "folder": {"arch": "mae_crate_base", **MAE_RECIPE},
    "transfer": {"arch": "mae_crate_base", **MAE_RECIPE, "epochs": 200, "batch_size": 256, "warmup_epochs": 10.0},
    "digits": {"arch": "mae_crate_digits", **MAE_RECIPE, "blr": 6e-3, "epochs": 30, "batch_size": 64,
               "warmup_epochs": 3.0, "workers": 0, "threads": 1},
    "shapes": {"arch": "mae_crate_shapes", **MAE_RECIPE, "blr": 6e-3, "epochs": 5, "batch_size": 64,
               "warmup_epochs": 1.0},
}  # fmt: skip
PRETRAIN_RECIPES["dummy"] = PRETRAIN_RECIPES["folder"]
OBJECTIVES = ("classification", "mae")


def resolve_config(cfg: TrainConfig, info: DataInfo) -> TrainConfig:
    """Fill the ``None`` fields from the data's recipe and check the values."""
    if cfg.objective not in OBJECTIVES:
        raise UserError(f"unknown objective {cfg.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    recipe = dict((PRETRAIN_RECIPES if cfg.objective == "mae" else RECIPES)[info.kind])
    recipe.setdefault("workers", min(8, os.cpu_count() or 1))
    cfg = replace(cfg, **{k: v for k, v in recipe.items() if getattr(cfg, k) is None})
    if cfg.lr is None and cfg.blr is not None and cfg.batch_size:
        cfg = replace(cfg, lr=cfg.blr * cfg.batch_size / 256)
    if cfg.epochs <= 0 or cfg.batch_size <= 0:
        raise UserError(f"--epochs and --batch-size must be positive, got {cfg.epochs} and {cfg.batch_size}")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    if cfg.amp not in ("none", "bf16", "fp16"):
        raise UserError(f"--amp must be none, bf16 or fp16, got {cfg.amp!r}")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise UserError(f"--mixup/--cutmix need an even batch size, got {cfg.batch_size}")
    return cfg


# What each command starts from, before --config / --resume and the options given.
COMMAND_BASES: dict[str, dict[str, Any]] = {
    "train": {},
    "finetune": {"data": "cifar10"},
    "pretrain": {"objective": "mae", "clip_grad": None, "label_smoothing": 0.0},  # MAE clips no gradients
}


def base_config(command: str) -> TrainConfig:
    return TrainConfig(**COMMAND_BASES[command])


def default_of(name: str) -> Any:
    """The :class:`TrainConfig` default of a field (for help texts)."""
    field = TrainConfig.__dataclass_fields__[name]
    return None if field.default is MISSING else field.default
