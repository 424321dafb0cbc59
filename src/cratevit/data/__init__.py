"""Datasets for the training engine: one factory for every ``--data`` value.

* ``digits`` (default): scikit-learn's handwritten digits, upscaled, with a fixed held-out split;
* a folder with ``train/`` and ``val/`` class sub-folders (ImageNet layout), corrupt files skipped;
* ``cifar10``, ``cifar100``, ``flower``, ``pets``: torchvision's datasets under ``--data-dir``;
* ``shapes``: the procedurally generated shapes with masks (:mod:`cratevit.data.shapes`);
* ``--dummy``: synthetic images (torchvision ``FakeData``) for benchmarking the loop.

Every sample is loaded through :class:`SeededDataset` with a seed drawn by :class:`EpochSampler`, so the
augmentation of sample ``i`` in epoch ``e`` depends only on ``(seed, e, i)``: not on worker count, process count,
or whether the run was interrupted and resumed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from ..presets import data_preprocessing
from . import transforms as T

__all__ = [
    "Batch",
    "DataInfo",
    "EpochSampler",
    "SeededDataset",
    "build_datasets",
    "build_eval_dataset",
    "collate_skip",
    "data_info",
]

SHAPES_SIZES = {"train": 6000, "val": 1200}
DUMMY_SIZES = {"train": 10_000, "val": 1_000}


@dataclass(frozen=True)
class DataInfo:
    """What the model needs to know before the data is built."""

    kind: str  # "digits", "shapes", "folder", "transfer" or "dummy"
    name: str
    num_classes: int
    classes: tuple[str, ...] = ()


def data_info(data: str, dummy: bool = False, num_classes: int | None = None, evaluate_only: bool = False) -> DataInfo:
    """Resolve ``--data`` (and check a folder's layout) without loading any image. ``evaluate_only``: a folder
    needs its ``val/`` split only, or may itself be the validation folder (class sub-folders of images)."""
    from .transfer import TRANSFER

    if dummy:
        n = num_classes or 1000
        return DataInfo("dummy", "dummy", n, tuple(str(i) for i in range(n)))
    if data == "digits":
        from .digits import CLASSES

        return DataInfo("digits", data, len(CLASSES), tuple(CLASSES))
    if data == "shapes":
        from .shapes import CLASSES, NUM_CLASSES

        return DataInfo("shapes", data, NUM_CLASSES, tuple(CLASSES))
    if data in TRANSFER:
        return DataInfo("transfer", data, TRANSFER[data].num_classes)
    from .folder import check_image_folder

    classes = check_image_folder(data, evaluate_only=evaluate_only)
    return DataInfo("folder", str(Path(data)), len(classes), tuple(classes))


def build_datasets(
    info: DataInfo,
    image_size: int,
    data_dir: str | None = None,
    randaug: bool = False,
    download: bool = True,
    seed: int = 0,
    augment: dict[str, Any] | None = None,
) -> tuple[Dataset, Dataset]:
    """(train, val) datasets returning ``(image tensor, label)``, ``None`` for an unreadable file.

    Images are normalised with the data's own mean/std (:func:`cratevit.presets.data_preprocessing`)."""
    prep = data_preprocessing(info.kind)
    mean, std = prep.mean, prep.std
    aug = dict(augment or {})  # randaug_n, randaug_m, erase_prob (the original finetune.py's flags)
    if info.kind == "digits":
        from .digits import DigitsDataset

        return (
            DigitsDataset("train", image_size, T.digits_train(image_size, mean, std)),
            DigitsDataset("val", image_size, T.digits_eval(mean, std)),
        )
    if info.kind == "shapes":
        from .shapes import ShapesDataset

        make = ShapesDataset  # (split, size, image_size, seed, transform)
        return (
            make(
                "train",
                SHAPES_SIZES["train"],
                image_size,
                seed,
                T.transfer_train(image_size, mean, std, randaug, **aug),
            ),
            make("val", SHAPES_SIZES["val"], image_size, seed, T.transfer_eval(image_size, mean, std)),
        )
    if info.kind == "transfer":
        from .transfer import make_transfer

        train = make_transfer(
            info.name, data_dir, True, T.transfer_train(image_size, mean, std, randaug, **aug), download
        )
        return train, make_transfer(info.name, data_dir, False, T.transfer_eval(image_size, mean, std), download)
    if info.kind == "dummy":
        from torchvision.datasets import FakeData

        shape = (3, image_size, image_size)
        tf = T.transfer_eval(image_size, mean, std)
        return (
            FakeData(DUMMY_SIZES["train"], shape, info.num_classes, tf, random_offset=seed),
            FakeData(DUMMY_SIZES["val"], shape, info.num_classes, tf, random_offset=seed + 1),
        )
    from .folder import SafeImageFolder

    root = Path(info.name)
    return (
        SafeImageFolder(root / "train", T.imagenet_train(image_size, mean, std, randaug, **aug)),
        SafeImageFolder(root / "val", T.imagenet_eval(image_size, mean, std)),
    )


def build_eval_dataset(
    info: DataInfo, image_size: int, data_dir: str | None = None, download: bool = True, seed: int = 0
) -> Dataset:
    """The validation split alone (``--evaluate``): a folder's ``val/``, or the folder itself when it has none."""
    if info.kind != "folder":
        return build_datasets(info, image_size, data_dir, False, download, seed)[1]
    from .folder import SafeImageFolder

    prep = data_preprocessing(info.kind)
    root = Path(info.name)
    val = root / "val" if (root / "val").is_dir() else root
    return SafeImageFolder(val, T.imagenet_eval(image_size, prep.mean, prep.std))


# ------------------------------------------------------------------------------------ deterministic loading
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation (a fixed mix of the three numbers)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    return x % (1 << 63)


class EpochSampler(Sampler):
    """Yields ``(index, sample_seed)``: a permutation fixed by ``(seed, epoch)``, split across ``world_size``
    ranks by stride, so that batch ``k`` of all ranks together is batch ``k`` of one process with the global
    batch size. ``skip`` drops this rank's first samples (resuming mid-epoch)."""

    def __init__(
        self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1, pad: bool = True
    ) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad and self.world_size > 1:
            total = math.ceil(self.n / self.world_size) * self.world_size
            order += order[: total - self.n]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self._indices()[self.skip :]:
            yield i, sample_seed(self.seed, self.epoch, i)

    def __len__(self) -> int:
        return max(len(self._indices()) - self.skip, 0)


class SeededDataset(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is loaded and augmented under that seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA seeding (~ms)
            return self.dataset[index]


@dataclass
class Batch:
    """One batch of images and targets, with the count of unreadable files dropped from it."""

    images: Tensor
    targets: Tensor
    skipped: int  # unreadable files dropped from this batch


def collate_skip(items: list[Any]) -> Batch:
    """Stack ``(image, label)`` pairs, dropping ``None`` items (unreadable files) and counting them."""
    good = [it for it in items if it is not None]
    skipped = len(items) - len(good)
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images = torch.stack([torch.as_tensor(im) for im, _ in good])
    targets = torch.tensor([int(t) for _, t in good], dtype=torch.long)
    return Batch(images, targets, skipped)
