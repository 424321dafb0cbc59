"""Preprocessing recipes (torchvision transforms v2) for the datasets the engine trains on.

The normalisation values come from :mod:`cratevit.presets` (``DATA_PREPROCESSING``), the one source of truth.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from ..presets import IMAGENET, IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "digits_eval",
    "digits_train",
    "imagenet_eval",
    "imagenet_train",
    "transfer_eval",
    "transfer_train",
]

CROP_PCT = IMAGENET.crop_pct  # 224 / 256: validation images are resized to 256 and centre-cropped to 224


def _to_tensor(mean: tuple[float, ...], std: tuple[float, ...]) -> list[v2.Transform]:
    return [v2.ToImage(), v2.RGB(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def _erase(erase_prob: float) -> list[v2.Transform]:
    """The original finetune.py's RandomErasing(p) on the normalised tensor (nothing at p = 0)."""
    return [v2.RandomErasing(p=erase_prob)] if erase_prob > 0 else []


def imagenet_train(
    size: int,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    randaug: bool = False,
    randaug_n: int = 2,
    randaug_m: int = 9,
    erase_prob: float = 0.0,
) -> v2.Compose:
    """Reference ImageNet training recipe: RandomResizedCrop + horizontal flip (+ RandAugment, + RandomErasing)."""
    aug = [v2.RandAugment(num_ops=randaug_n, magnitude=randaug_m)] if randaug else []
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, antialias=True),
            v2.RandomHorizontalFlip(),
            *aug,
            *_to_tensor(mean, std),
            *_erase(erase_prob),
        ]
    )


def imagenet_eval(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    """Reference ImageNet validation recipe: Resize(size / 0.875) + CenterCrop(size)."""
    return v2.Compose([v2.Resize(round(size / CROP_PCT), antialias=True), v2.CenterCrop(size), *_to_tensor(mean, std)])


def transfer_train(
    size: int,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    randaug: bool = False,
    randaug_n: int = 2,
    randaug_m: int = 14,
    erase_prob: float = 0.0,
) -> v2.Compose:
    """Fine-tuning recipe: resize to the model's size, padded random crop, flip, RandAugment(n, m) if asked
    (the original finetune.py's 2, 14 by default), RandomErasing(p) after normalisation if asked."""
    aug = [v2.RandAugment(num_ops=randaug_n, magnitude=randaug_m)] if randaug else []
    return v2.Compose(
        [
            v2.Resize((size, size), antialias=True),
            v2.RandomCrop(size, padding=size // 8),
            v2.RandomHorizontalFlip(),
            *aug,
            *_to_tensor(mean, std),
            *_erase(erase_prob),
        ]
    )


def transfer_eval(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    """Evaluation transform of the transfer data sets: resize to ``size x size``, then to a normalised tensor."""
    return v2.Compose([v2.Resize((size, size), antialias=True), *_to_tensor(mean, std)])


def digits_train(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    """Random shift of the (already upscaled) digit by up to 1/8 of its size, then 3 channels and normalisation.

    (A padded random crop costs ~0.1 ms per image here; RandomAffine's resampling costs 100x more.)
    """
    return v2.Compose([v2.RandomCrop(size, padding=size // 8), v2.RGB(), v2.Normalize(mean, std)])


def digits_eval(mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    """Evaluation transform of the digits: 3 channels, then normalisation by ``mean`` and ``std``."""
    return v2.Compose([v2.RGB(), v2.Normalize(mean, std)])
