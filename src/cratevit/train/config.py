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

import math
import os
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    from ..data import DataInfo

__all__ = [
    "COMMAND_BASES",
    "MAE_RECIPE",
    "OBJECTIVES",
    "PRETRAIN_RECIPES",
    "RECIPES",
    "SAVE_EVERY_MINUTES",
    "TrainConfig",
    "base_config",
    "check_config",
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
    num_classes: int | None = None  # --dummy: its class count (default 1000); other data: checked against it
    randaug: bool = False
    randaug_n: int = 2  # RandAugment operations per image (the original finetune.py's --rand_aug_n)
    randaug_m: int = 14  # RandAugment magnitude (--rand_aug_m)
    erase_prob: float = 0.0  # RandomErasing probability after normalisation (--erase_prob)
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
    save_every: int | None = None  # write last.pt every N steps too (None: every SAVE_EVERY_MINUTES; 0: epoch ends)
    tensorboard: bool = False
    device: str = "auto"
    threads: int | None = None  # torch intra-op CPU threads (default: the recipe's, else torch's)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "the configuration") -> TrainConfig:
        """A configuration from a file's dict; unknown options and wrongly typed values are refused."""
        if not isinstance(d, dict):
            raise UserError(f"{source} holds a {type(d).__name__}, not a mapping of training options")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise UserError(f"unknown training option(s) {unknown} in {source}; known options: {sorted(known)}")
        for name, value in d.items():
            _check_type(name, str(known[name].type), value, source)
        return cls(**d)


_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "dict[str, Any]": (dict,),
    "list[float]": (list,),  # betas
}


def _check_type(name: str, annotation: str, value: Any, source: str) -> None:
    """A value read from a file has the field's type (a number for a float, None where allowed)."""
    optional = annotation.endswith(" | None")
    base = annotation.removesuffix(" | None")
    if value is None and optional:
        return
    ok = isinstance(value, _TYPES[base]) and (base == "bool" or not isinstance(value, bool))
    if not ok:
        want = {
            "dict[str, Any]": "a mapping",
            "str": "a string",
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
        }[base] + (" or null" if optional else "")
        raise UserError(f"option {name!r} in {source} must be {want}, got {value!r} ({type(value).__name__})")


SAVE_EVERY_MINUTES = 10.0
"""Without ``--save-every``, ``last.pt`` is also written within an epoch this often (minutes; a ``kill -9``
loses at most this much)."""

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
"""The training recipe of each kind of data (digits, shapes, folder, transfer, dummy); explicit options always win."""
RECIPES["dummy"] = {**RECIPES["folder"], "warmup_epochs": 0.0}  # a loop benchmark: a few steps at full --lr

MAE_RECIPE: dict[str, Any] = {
    "optimizer": "adamw",
    "betas": [0.9, 0.95],
    "blr": 1.5e-4,
    "epochs": 800,
    "batch_size": 4096,
    "warmup_epochs": 40.0,
}
"""The MAE pre-training recipe (He et al. 2022, FAIR's ``main_pretrain.py`` and ``PRETRAIN.md``; the CRATE-MAE
README trains with it): AdamW with betas (0.9, 0.95), base lr 1.5e-4 scaled by batch/256, weight decay 0.05,
cosine decay after a 40-epoch warmup, 800 epochs of batch 4096, no gradient clipping. The built-in data use it
with fewer, shorter epochs and a larger base lr (6e-3: lr 1.5e-3 at batch 64), so that a run takes minutes."""
PRETRAIN_RECIPES: dict[str, dict[str, Any]] = {
    "folder": {"arch": "mae_crate_base", **MAE_RECIPE},
    "transfer": {"arch": "mae_crate_base", **MAE_RECIPE, "epochs": 200, "batch_size": 256, "warmup_epochs": 10.0},
    "digits": {"arch": "mae_crate_digits", **MAE_RECIPE, "blr": 6e-3, "epochs": 30, "batch_size": 64,
               "warmup_epochs": 3.0, "workers": 0, "threads": 1},
    "shapes": {"arch": "mae_crate_shapes", **MAE_RECIPE, "blr": 6e-3, "epochs": 5, "batch_size": 64,
               "warmup_epochs": 1.0},
}  # fmt: skip
"""The MAE pre-training recipe of each kind of data (:data:`MAE_RECIPE`, scaled down for the built-in data);
explicit options always win."""
PRETRAIN_RECIPES["dummy"] = {**PRETRAIN_RECIPES["folder"], "warmup_epochs": 0.0}
OBJECTIVES = ("classification", "mae")
"""The values of ``--objective``: supervised ``classification`` or masked autoencoding (``mae``)."""


# (option, test, what it must be): every number a run takes; None (the recipe's or "off") always passes
_RANGES: list[tuple[str, Any, str]] = [
    ("epochs", lambda v: v >= 1, "a positive integer"),
    ("batch_size", lambda v: v >= 1, "a positive integer"),
    ("lr", lambda v: math.isfinite(v) and v > 0, "a positive number"),
    ("blr", lambda v: math.isfinite(v) and v > 0, "a positive number"),
    ("weight_decay", lambda v: math.isfinite(v) and v >= 0, "0 or more"),
    ("momentum", lambda v: 0 <= v <= 1, "between 0 and 1"),
    ("warmup_epochs", lambda v: math.isfinite(v) and v >= 0, "0 or more (epochs of linear warmup)"),
    ("min_lr", lambda v: math.isfinite(v) and v >= 0, "0 or more"),
    ("clip_grad", lambda v: math.isfinite(v) and v >= 0, "a positive max gradient norm, or 0 for no clipping"),
    ("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("mixup", lambda v: math.isfinite(v) and v >= 0, "a Beta alpha of 0 (off) or more"),
    ("cutmix", lambda v: math.isfinite(v) and v >= 0, "a Beta alpha of 0 (off) or more"),
    ("workers", lambda v: v >= 0, "0 (load in the main process) or more"),
    ("threads", lambda v: v >= 1, "a positive number of CPU threads"),
    ("steps_per_epoch", lambda v: v >= 1, "a positive number of steps"),
    ("save_every", lambda v: v >= 0, "a number of steps, or 0 to save at epoch ends only"),
    ("print_freq", lambda v: v >= 1, "a positive number of steps"),
    ("num_classes", lambda v: v >= 1, "a positive class count"),
    ("image_size", lambda v: v >= 1, "a positive number of pixels"),
    ("patch_size", lambda v: v >= 1, "a positive number of pixels"),
    ("randaug_n", lambda v: v >= 0, "0 or more RandAugment operations"),
    ("randaug_m", lambda v: v >= 0, "a RandAugment magnitude of 0 or more"),
]


def check_config(cfg: TrainConfig) -> None:
    """Refuse values that make no sense (a negative clip norm trains by gradient ascent), in one line each."""
    for name, ok, what in _RANGES:
        value = getattr(cfg, name)
        if value is not None and not ok(value):
            raise UserError(f"--{name.replace('_', '-')} must be {what}, got {value}")
    if cfg.amp not in ("none", "bf16", "fp16"):
        raise UserError(f"--amp must be none, bf16 or fp16, got {cfg.amp!r}")
    if not 0.0 <= cfg.erase_prob <= 1.0:
        raise UserError(f"--erase_prob must lie in [0, 1], got {cfg.erase_prob}")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise UserError(f"--mixup/--cutmix need an even batch size, got {cfg.batch_size}")


def resolve_config(cfg: TrainConfig, info: DataInfo) -> TrainConfig:
    """Fill the ``None`` fields from the data's recipe, check the values, and make the paths absolute (so that
    ``--resume`` from another working directory reads and writes the same files)."""
    if cfg.objective not in OBJECTIVES:
        raise UserError(f"unknown objective {cfg.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    recipe = dict((PRETRAIN_RECIPES if cfg.objective == "mae" else RECIPES)[info.kind])
    recipe.setdefault("workers", min(8, os.cpu_count() or 1))
    cfg = replace(cfg, **{k: v for k, v in recipe.items() if getattr(cfg, k) is None})
    if cfg.lr is None and cfg.blr is not None and cfg.batch_size:
        cfg = replace(cfg, lr=cfg.blr * cfg.batch_size / 256)
    check_config(cfg)
    if cfg.num_classes is not None and info.kind != "dummy" and cfg.num_classes != info.num_classes:
        raise UserError(
            f"--classes/--num-classes {cfg.num_classes} does not match {info.name}, which has {info.num_classes} "
            f"classes; leave it out (the head follows the data) or pass {info.num_classes}"
        )
    paths: dict[str, Any] = {}
    if cfg.output:
        paths["output"] = str(Path(cfg.output).absolute())
    if cfg.data_dir:
        paths["data_dir"] = str(Path(cfg.data_dir).absolute())
    if info.kind == "folder":
        paths["data"] = str(Path(cfg.data).absolute())
    if cfg.pretrained and Path(cfg.pretrained).exists():
        paths["pretrained"] = str(Path(cfg.pretrained).absolute())
    return replace(cfg, **paths)


# What each command starts from, before --config / --resume and the options given.
COMMAND_BASES: dict[str, dict[str, Any]] = {
    "train": {},
    "finetune": {"data": "cifar10"},
    "pretrain": {"objective": "mae", "clip_grad": None, "label_smoothing": 0.0},  # MAE clips no gradients
}
"""What each command (``train``, ``finetune``, ``pretrain``) starts from, before ``--config``/``--resume`` and the
options."""


def base_config(command: str) -> TrainConfig:
    """The :class:`TrainConfig` a command starts from (:data:`COMMAND_BASES`)."""
    return TrainConfig(**COMMAND_BASES[command])


def default_of(name: str) -> Any:
    """The :class:`TrainConfig` default of a field (for help texts)."""
    field = TrainConfig.__dataclass_fields__[name]
    return None if field.default is MISSING else field.default
