"""scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes), upscaled, with a fixed held-out split.

The data ships inside scikit-learn, so ``cratevit train`` works offline with nothing to download.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import UserError

__all__ = ["CLASSES", "DigitsDataset"]

CLASSES = [str(i) for i in range(10)]
"""The class names, ``"0"`` ... ``"9"``."""
HELD_OUT = 0.2  # fraction kept for validation (stratified, always the same images)
SPLIT_SEED = 0


def _load(split: str, image_size: int) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "val"):
        raise UserError(f"digits split must be 'train' or 'val', got {split!r}")
    x, y = load_digits(return_X_y=True)
    idx_train, idx_val = train_test_split(range(len(y)), test_size=HELD_OUT, random_state=SPLIT_SEED, stratify=y)
    idx = idx_train if split == "train" else idx_val
    images = torch.tensor(x[idx], dtype=torch.float32).view(-1, 1, 8, 8) / 16.0  # b 1 8 8 in [0, 1]
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp_(0, 1), torch.tensor(y[idx], dtype=torch.long)


class DigitsDataset(Dataset):
    """``(image, label)`` with ``image`` a (1, S, S) float tensor in [0, 1] before ``transform``."""

    def __init__(self, split: str, image_size: int = 32, transform=None) -> None:
        self.images, self.targets = _load(split, image_size)
        self.transform = transform
        self.classes = CLASSES

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
