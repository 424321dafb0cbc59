"""ImageNet-style folders (``train/`` and ``val/``, one sub-folder per class) with up-front layout checks.

Unreadable images (corrupt or truncated files) do not stop an epoch: :func:`load_image` returns ``None`` and
the engine skips, reports and counts them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import UserError

__all__ = ["SafeImageFolder", "check_image_folder", "load_image"]


def load_image(path: str) -> Image.Image | None:
    """The image as 8-bit RGB (16-bit and float images scaled to their range, as ``cratevit attention`` does), or
    ``None`` (with a warning naming the file) if it cannot be decoded or has more pixels than PIL's limit."""
    from .decode import MAX_PIXELS, check_size, to_rgb

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            check_size(image, path, MAX_PIXELS)
            image.load()  # the full decode, so truncated files fail here
            return to_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        print(f"warning: skipping unreadable image {path} ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        return None


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _has_image(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMG_EXTENSIONS for p in folder.rglob("*"))


def check_image_folder(root: str | Path) -> list[str]:
    """Check ``root/train`` and ``root/val`` before any work starts; returns the class names."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(
            f"--data {root} does not exist; pass a folder with train/ and val/ class sub-folders, "
            f"or one of: digits, shapes, cifar10, cifar100, flower, pets"
        )
    if not root.is_dir():
        raise NotADirectoryError(f"--data {root} is a file; pass a folder holding train/ and val/ class sub-folders")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"{root} has no {split}/ folder; an image folder needs {root}/train/CLASS/*.jpg and "
                f"{root}/val/CLASS/*.jpg (the ImageNet layout)"
            )
    classes: dict[str, list[str]] = {}
    for split in ("train", "val"):
        split_dir = root / split
        dirs = _class_dirs(split_dir)
        if not dirs:
            raise FileNotFoundError(
                f"{split_dir} has no class sub-folders; put each class's images in {split_dir}/CLASS/"
            )
        empty = [d.name for d in dirs if not _has_image(d)]
        if empty:
            raise FileNotFoundError(
                f"class folder(s) {', '.join(empty[:5])} in {split_dir} hold no images "
                f"({', '.join(sorted(IMG_EXTENSIONS))}); add images or remove the folders"
            )
        classes[split] = [d.name for d in dirs]
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise UserError(
            f"train/ and val/ of {root} have different classes (only in train: {only_train[:5]}, only in val: "
            f"{only_val[:5]}); both need the same class sub-folders"
        )
    return classes["train"]


class SafeImageFolder(ImageFolder):
    """torchvision's ImageFolder whose loader returns ``None`` for unreadable files (and skips the transform)."""

    def __init__(self, root: str | Path, transform=None) -> None:
        super().__init__(str(root), transform=transform, loader=load_image)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = self.loader(path)
        if image is None:
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, target
