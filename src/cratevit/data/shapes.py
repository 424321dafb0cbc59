"""A procedurally generated classification dataset with ground-truth foreground masks.

Every image holds one object of a shape class (circle, square, triangle, star, cross, ring) with a random colour,
texture (solid, stripes, checks or noise), scale, rotation and position, on a cluttered textured background
(smooth colour noise or stripes, small distractor blobs and lines, pixel noise). Item ``i`` of a split is a pure
function of ``(seed, split, i)``: nothing is stored or downloaded, and the same arguments give the same images.

The classification task needs the object's shape, so a network that solves it has to find the object; the masks
measure how well its attention does (``cratevit segeval``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserError

__all__ = ["CLASSES", "NUM_CLASSES", "SPLITS", "ShapesDataset", "render"]

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
"""The shape classes, in label order."""
NUM_CLASSES = len(CLASSES)
"""The number of shape classes (6)."""
SPLITS = ("train", "val", "test")  # disjoint random streams
"""The splits, each a disjoint random stream of scenes."""


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in the object's own frame (unit circumradius)."""
    r = np.hypot(u, v)
    if kind == "circle":
        return r <= 1.0
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if kind == "triangle":
        normals = [np.deg2rad(a) for a in (90.0, 210.0, 330.0)]
        return np.all([u * np.cos(a) + v * np.sin(a) <= 0.5 for a in normals], axis=0)
    if kind == "star":
        phase = (np.arctan2(v, u) * 5 / (2 * np.pi)) % 1.0
        return r <= 0.4 + 0.6 * np.abs(2 * phase - 1)
    if kind == "cross":
        return ((np.abs(u) <= 0.28) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.28) & (np.abs(u) <= 0.95))
    if kind == "ring":
        return (r <= 1.0) & (r >= 0.55)
    raise UserError(f"unknown shape {kind!r}; known shapes: {', '.join(CLASSES)}")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Values in [0, 1] varying smoothly over the image (bicubic upsampling of a coarse random grid)."""
    coarse = Image.fromarray(rng.random((cells, cells)).astype(np.float32), mode="F")
    return np.clip(np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC)), 0.0, 1.0)


def _pattern(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """A texture in [0, 1]: solid, stripes, checks or smooth noise."""
    kind = rng.integers(4)
    if kind == 0:
        return np.zeros_like(yy)
    angle, period = rng.uniform(0, np.pi), rng.uniform(0.12, 0.3) * size
    if kind == 1:
        return 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    if kind == 2:
        return ((np.floor(xx / period * 2) + np.floor(yy / period * 2)) % 2).astype(np.float64)
    return _smooth_noise(rng, size, int(rng.integers(3, 7)))


def _colour_far_from(rng: np.random.Generator, others: list[np.ndarray], min_dist: float = 0.45) -> np.ndarray:
    for _ in range(100):
        c = rng.random(3)
        if all(np.linalg.norm(c - o) >= min_dist for o in others):
            return c
    return 1.0 - others[0]


def render(seed: int, split: str, index: int, image_size: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Item ``index`` of a split: (uint8 image HxWx3, label, bool mask HxW)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    rng = np.random.default_rng((seed, SPLITS.index(split), index))
    size = image_size
    label = index % NUM_CLASSES
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5

    # background: two colours mixed by a smooth or striped pattern, distractors, pixel noise
    bg1, bg2 = rng.random(3), rng.random(3)
    mix = _smooth_noise(rng, size, int(rng.integers(2, 6))) if rng.random() < 0.5 else _pattern(rng, yy, xx, size)
    img = bg1 * (1 - mix[..., None]) + bg2 * mix[..., None]
    for _ in range(int(rng.integers(1, 4))):
        colour = rng.random(3)
        cy, cx = rng.uniform(0, size, 2)
        if rng.random() < 0.5:  # a small blob
            blob = np.hypot(yy - cy, xx - cx) <= rng.uniform(0.03, 0.06) * size
        else:  # a thin line segment
            a, length = rng.uniform(0, np.pi), rng.uniform(0.15, 0.4) * size
            along = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
            across = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
            blob = (np.abs(along) <= length / 2) & (np.abs(across) <= max(0.5, 0.02 * size))
        img[blob] = colour

    # the object
    radius = rng.uniform(0.26, 0.42) * size
    cy, cx = rng.uniform(radius, size - radius, 2)
    theta = rng.uniform(0, 2 * np.pi)
    u = ((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / radius
    v = (-(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)) / radius
    mask = _shape_mask(CLASSES[label], u, v)
    fg1 = _colour_far_from(rng, [bg1, bg2])
    fg2 = np.clip(fg1 + rng.uniform(-0.25, 0.25, 3), 0, 1)
    tex = _pattern(rng, yy, xx, size)[..., None]
    obj = fg1 * (1 - tex) + fg2 * tex
    img = np.where(mask[..., None], obj, img)
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    return (img * 255).round().astype(np.uint8), label, mask


class ShapesDataset(Dataset):
    """``(PIL RGB image, label)`` pairs of shape classes; :meth:`mask` gives item ``i``'s foreground mask.

    ``split`` is ``"train"``, ``"val"`` or ``"test"`` (disjoint random streams); ``size`` items of
    ``image_size`` x ``image_size`` pixels; ``transform`` is applied to the PIL image.
    """

    classes = CLASSES

    def __init__(
        self,
        split: str = "train",
        size: int = 6000,
        image_size: int = 32,
        seed: int = 0,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise UserError(f"unknown shapes split {split!r}; choose one of {', '.join(SPLITS)}")
        if size <= 0 or image_size < 8:
            raise UserError(f"shapes needs size > 0 and image_size >= 8, got size={size}, image_size={image_size}")
        self.split, self.size, self.image_size, self.seed = split, int(size), int(image_size), int(seed)
        self.transform = transform
        self.targets = [i % NUM_CLASSES for i in range(self.size)]

    def __len__(self) -> int:
        return self.size

    def _check(self, index: int) -> int:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for a shapes dataset of {self.size} items")
        return index % self.size

    def sample(self, index: int) -> tuple[Image.Image, int, np.ndarray]:
        """(PIL image, label, bool mask) of item ``index``, without the transform."""
        img, label, mask = render(self.seed, self.split, self._check(index), self.image_size)
        return Image.fromarray(img, mode="RGB"), label, mask

    def mask(self, index: int) -> np.ndarray:
        """Ground-truth foreground mask of item ``index``: bool array (image_size, image_size)."""
        return self.sample(index)[2]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, label, _ = self.sample(index)
        return (self.transform(img) if self.transform is not None else img), label

    def __repr__(self) -> str:
        return (
            f"ShapesDataset(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
            f"seed={self.seed}, classes={list(CLASSES)})"
        )
