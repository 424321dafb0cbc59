"""Transfer-learning datasets through torchvision: CIFAR-10, CIFAR-100, Flowers-102, Oxford-IIIT Pet.

Files are looked for under ``--data-dir`` in torchvision's own layout; if absent they are downloaded when
``download`` is allowed and the network answers. Otherwise one error says where to put which files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..errors import UserError, require

__all__ = ["TRANSFER", "TransferSpec", "make_transfer"]


class TransferSpec:
    """How to build one transfer dataset with torchvision, and where its files live."""

    def __init__(
        self,
        cls_name: str,
        num_classes: int,
        splits: tuple[dict[str, Any], dict[str, Any]],
        layout: str,
        requires: tuple[str, str] | None = None,
    ):
        self.cls_name = cls_name
        self.num_classes = num_classes
        self.splits = splits  # (train kwargs, val kwargs)
        self.layout = layout  # what the user must put under --data-dir
        self.requires = requires  # (module, cratevit extra) torchvision needs to read the files

    def build(self, root: Path, train: bool, transform: Callable | None, download: bool) -> Dataset:
        import torchvision.datasets as tvd

        cls = getattr(tvd, self.cls_name)
        kwargs = self.splits[0 if train else 1]
        return cls(str(root), transform=transform, download=download, **kwargs)


TRANSFER: dict[str, TransferSpec] = {
    "cifar10": TransferSpec(
        "CIFAR10",
        10,
        ({"train": True}, {"train": False}),
        "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) from cifar-10-python.tar.gz",
    ),
    "cifar100": TransferSpec(
        "CIFAR100",
        100,
        ({"train": True}, {"train": False}),
        "cifar-100-python/ (train, test, meta) from cifar-100-python.tar.gz",
    ),
    "flower": TransferSpec(
        "Flowers102",
        102,
        ({"split": "train"}, {"split": "test"}),
        "flowers-102/ (jpg/image_*.jpg, imagelabels.mat, setid.mat)",
        requires=("scipy", "flowers"),  # torchvision reads the .mat label files with scipy
    ),
    "pets": TransferSpec(
        "OxfordIIITPet",
        37,
        ({"split": "trainval"}, {"split": "test"}),
        "oxford-iiit-pet/ (images/*.jpg, annotations/trainval.txt, annotations/test.txt)",
    ),
}
"""The transfer data sets ``--data`` accepts (torchvision's), by name."""


def make_transfer(
    name: str, data_dir: str | Path | None, train: bool, transform: Callable | None, download: bool = True
) -> Dataset:
    """The torchvision dataset ``name`` read from ``data_dir``; downloads if absent and allowed."""
    spec = TRANSFER[name]
    if spec.requires:
        require(*spec.requires, what=f"--data {name}")
    if data_dir is None:
        raise UserError(f"--data {name} needs --data-dir DIR: the folder that holds (or will hold) {spec.layout}")
    root = Path(data_dir).expanduser()
    try:
        return spec.build(root, train, transform, download=False)
    except RuntimeError:
        pass  # files absent (torchvision's "Dataset not found or corrupted")
    reason = "downloading is off (--no-download)"
    if download:
        try:
            return spec.build(root, train, transform, download=True)
        except Exception as e:  # URLError, OSError, HTTP errors, checksum mismatch: all mean "no usable files"
            reason = f"the download failed ({type(e).__name__}: {str(e).strip()[:120]})"
    raise FileNotFoundError(
        f"{spec.cls_name} files not found in {root} and {reason}; put {spec.layout} into {root}, "
        f"or run once with network access to download them there"
    )
