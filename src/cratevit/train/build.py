"""Building what a run trains: the model (a cratevit preset, a timm model, a checkpoint's own model, or a
classifier from a CRATE-MAE's encoder), its data loaders, optimiser, schedule and objective.

The engine asks the registry what a family is (:func:`trains_as_autoencoder`); an autoencoder's encoder becomes a
classifier by its family's conversion (``registry.to_classifier``, in :func:`classifier_from_autoencoder`).
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import CheckpointError, checkpoint_dict, create_model, is_reference_state, load_file, load_into
from ..checkpoint import load_model as load_any_model
from ..data import DataInfo, EpochSampler, SeededDataset, build_datasets, build_eval_dataset, collate_skip
from ..errors import UserError
from ..presets import get_config, list_models, resolve_name
from ..registry import families, get_family, is_family_model, to_classifier
from .config import TrainConfig
from .distributed import DistInfo
from .objectives import Objective, make_objective
from .rundir import ignore_stop_signals

__all__ = [
    "DUMMY_VAL_STEPS_PER_BATCH",
    "Loaders",
    "build_loaders",
    "build_model",
    "build_optimisation",
    "checkpoint_payload",
    "classifier_from_autoencoder",
    "is_crate_arch",
    "load_pretrained",
    "model_from_checkpoint",
    "model_image_size",
    "trains_as_autoencoder",
]

DUMMY_VAL_STEPS_PER_BATCH = 10
"""``--dummy`` validates one batch per this many training steps (at most 1,000 images)."""


# --------------------------------------------------------------------------------------------------- families
def trains_as_autoencoder(family: str) -> bool:
    """Whether a family trains by masked autoencoding rather than by classification (its record's
    ``objective``: CRATE-MAE is the one such family today)."""
    return get_family(family).objective == "masked_autoencoding"


def _autoencoder_file(path: str) -> bool:
    """Whether a checkpoint file holds an autoencoder family (ours or a foreign layout), peeking with mmap."""
    try:
        obj = load_file(path, mmap=True) if Path(path).suffix != ".safetensors" else None
    except CheckpointError:
        return False  # the loader reports unreadable files
    if not isinstance(obj, dict):
        return False
    family = obj.get("model_family")
    if family in families():
        return trains_as_autoencoder(family)
    weights = obj.get("model", obj)
    return isinstance(weights, dict) and any(
        trains_as_autoencoder(name) and is_reference_state(weights, name) for name in families()
    )


def classifier_from_autoencoder(cfg: TrainConfig, num_classes: int) -> nn.Module | None:
    """For a classification run whose ``--pretrained`` file is an autoencoder (a CRATE-MAE): a classifier built
    from its encoder (``--arch`` does not apply: the encoder fixes the architecture). None for any other file."""
    if cfg.objective != "classification" or not cfg.pretrained or not _autoencoder_file(cfg.pretrained):
        return None
    return to_classifier(load_any_model(cfg.pretrained), num_classes)


# --------------------------------------------------------------------------------------------------- model
def is_crate_arch(arch: str) -> bool:
    """Whether ``arch`` names a cratevit preset (rather than a timm model)."""
    try:
        resolve_name(arch)
    except UserError:
        return False
    return True


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """A cratevit preset or a timm model, with the class count and optional size overrides."""
    if is_crate_arch(cfg.arch):
        known = {f.name for f in fields(get_config(cfg.arch))}
        unknown = sorted(set(cfg.model_kwargs or {}) - known)
        if unknown:
            raise UserError(f"--model-kwargs: unknown {cfg.arch} option(s) {unknown}; its options: {sorted(known)}")
        num_classes = None if cfg.objective == "mae" else num_classes  # an autoencoder has no classifier
        try:
            return create_model(
                cfg.arch,
                num_classes=num_classes,
                image_size=cfg.image_size,
                patch_size=cfg.patch_size,
                **(cfg.model_kwargs or {}),
            )
        except (TypeError, ValueError) as e:  # a value of the wrong type or out of range in --model-kwargs
            if not cfg.model_kwargs:
                raise
            raise UserError(
                f"cannot build {cfg.arch} with --model-kwargs {json.dumps(cfg.model_kwargs)}: {e}"
            ) from None
    import timm

    if not timm.is_model(cfg.arch):
        raise UserError(
            f"unknown --arch {cfg.arch!r}: not a cratevit preset ({', '.join(list_models())}) "
            f"nor a timm model name (see timm.list_models())"
        )
    kwargs: dict[str, Any] = {**(cfg.model_kwargs or {}), "num_classes": num_classes}
    if cfg.image_size is not None:
        kwargs["img_size"] = cfg.image_size
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    try:
        return timm.create_model(cfg.arch, pretrained=False, **kwargs)
    except TypeError as e:
        raise UserError(f"timm model {cfg.arch!r} does not accept {sorted(kwargs)}: {e}") from None


def model_from_checkpoint(state: dict[str, Any], cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The model a training checkpoint holds, built from the configuration it records (random weights: the
    caller loads them). A timm model is rebuilt from its name and the run's options."""
    if state.get("format") == "timm" or "model_family" not in state:
        return build_model(cfg, num_classes)
    family = get_family(state["model_family"])
    return family.build(family.config_cls.from_dict(dict(state["config"])))


def model_image_size(model: nn.Module) -> int:
    """The input side (pixels) a model expects: a cratevit family's config, else timm's patch embedding or config."""
    if is_family_model(model):
        return model.config.image_size[0]
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    return int(model.pretrained_cfg["input_size"][-1])


def load_pretrained(model: nn.Module, path: str) -> None:
    """Start from a checkpoint's weights, replacing the classifier when the class count differs."""
    if is_family_model(model):
        load_into(model, path, drop_head=True)
        return
    try:
        obj = load_file(path)
    except CheckpointError as e:
        raise CheckpointError(f"--pretrained {path}: {str(e)[:300]}") from None
    state = dict(obj.get("model", obj.get("state_dict", obj)))
    own = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    head = {k for k in state if k in own and state[k].shape != own[k].shape and k.startswith(("head.", "fc."))}
    for k in head:
        state[k] = own[k]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"--pretrained {path} does not fit {type(model).__name__}: {str(e)[:300]}") from None


def checkpoint_payload(model: nn.Module, arch: str, **extra: Any) -> dict[str, Any]:
    """Our checkpoint layout for a family model; the same keys with the timm name for timm models."""
    if is_family_model(model):
        return checkpoint_dict(model, arch=arch, **extra)
    return {"format": "timm", "arch": arch, "model": model.state_dict(), **extra}


# --------------------------------------------------------------------------------------------------- data
class Loaders:
    """The training and validation loaders of a run and their samplers."""

    def __init__(self, train: Any, val: Any, train_sampler: EpochSampler, val_sampler: EpochSampler) -> None:
        self.train, self.val, self.train_sampler, self.val_sampler = train, val, train_sampler, val_sampler


def build_loaders(
    cfg: TrainConfig, info: DataInfo, image_size: int, dist: DistInfo, local_batch: int, evaluate_only: bool
) -> Loaders:
    """The training and validation loaders and their samplers, sharded over the ranks (``evaluate_only``: the
    validation split alone)."""
    if evaluate_only:  # the validation split alone (a folder may be the val folder itself)
        train_ds, val_ds = None, build_eval_dataset(info, image_size, cfg.data_dir, cfg.download, cfg.seed)
    else:
        augment = {"randaug_n": cfg.randaug_n, "erase_prob": cfg.erase_prob}
        if info.kind != "folder" or cfg.randaug_m != 14:  # ImageNet keeps torchvision's magnitude 9
            augment["randaug_m"] = cfg.randaug_m
        train_ds, val_ds = build_datasets(info, image_size, cfg.data_dir, cfg.randaug, cfg.download, cfg.seed, augment)
    if info.kind == "dummy" and not evaluate_only:  # a loop benchmark: validation sized to the run
        steps = min(cfg.steps_per_epoch or math.inf, len(train_ds) // cfg.batch_size)
        n = min(len(val_ds), cfg.batch_size * max(1, math.ceil(steps / DUMMY_VAL_STEPS_PER_BATCH)))
        val_ds = torch.utils.data.Subset(val_ds, range(n))
    if train_ds is not None and len(train_ds) < cfg.batch_size:
        raise UserError(
            f"the training set has {len(train_ds)} images, fewer than --batch-size {cfg.batch_size}; "
            f"lower the batch size"
        )
    train_sampler = EpochSampler(len(train_ds or val_ds), cfg.seed, True, dist.rank, dist.world_size)
    val_sampler = EpochSampler(len(val_ds), cfg.seed, False, dist.rank, dist.world_size, pad=False)
    common = {
        "num_workers": cfg.workers,
        "collate_fn": collate_skip,
        "worker_init_fn": ignore_stop_signals,
        "pin_memory": dist.device.type == "cuda",
        "persistent_workers": False,
    }
    # Each loader draws its workers' base seed from its own generator, not from the global RNG: creating an
    # iterator after --resume restored the RNG state must not shift the dropout masks of the next steps.
    # (Augmentation does not depend on it: SeededDataset seeds every sample.)
    train = torch.utils.data.DataLoader(
        SeededDataset(train_ds if train_ds is not None else val_ds),
        batch_size=local_batch,
        sampler=train_sampler,
        drop_last=train_ds is not None,
        generator=torch.Generator().manual_seed(cfg.seed),
        **common,
    )
    val = torch.utils.data.DataLoader(
        SeededDataset(val_ds),
        batch_size=local_batch,
        sampler=val_sampler,
        generator=torch.Generator().manual_seed(cfg.seed),
        **common,
    )
    return Loaders(train, val, train_sampler, val_sampler)


# --------------------------------------------------------------------------------------------------- optimisation
def build_optimisation(
    cfg: TrainConfig, model: nn.Module, steps_per_epoch: int, num_classes: int, dist: DistInfo
) -> tuple[Any, Any, Any, Objective]:
    """(optimiser, per-step cosine schedule with warmup, fp16 gradient scaler, objective)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    extra = {"betas": tuple(cfg.betas)} if cfg.betas else {}
    try:
        optimizer = create_optimizer_v2(
            model, opt=cfg.optimizer.lower(), lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, **extra
        )
    except (AssertionError, ValueError) as e:
        raise UserError(f"--optimizer {cfg.optimizer!r}: {e}; try lion, adamw or sgd") from None
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.lr * 0.01,
        min_lr=cfg.min_lr,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
    # what is optimised: the only difference between train/finetune and pretrain (cratevit.train.objectives)
    options = {"label_smoothing": cfg.label_smoothing, "mixup": cfg.mixup, "cutmix": cfg.cutmix}
    objective = make_objective(cfg.objective, model, num_classes, options, cfg.seed, dist.rank)
    return optimizer, scheduler, scaler, objective
