"""The procedurally generated shapes dataset."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cratevit.data.shapes import CLASSES, NUM_CLASSES, ShapesDataset, render


def test_items_are_images_labels_and_masks() -> None:
    ds = ShapesDataset("train", size=24, image_size=48, seed=3)
    assert len(ds) == 24 and NUM_CLASSES == len(CLASSES) == 6
    labels = []
    for i in range(len(ds)):
        img, label = ds[i]
        mask = ds.mask(i)
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (48, 48)
        assert mask.dtype == bool and mask.shape == (48, 48)
        assert 0.03 < mask.mean() < 0.6  # an object, not the whole image
        labels.append(label)
    assert sorted(set(labels)) == list(range(NUM_CLASSES)) and labels == ds.targets


def test_deterministic_and_splits_differ() -> None:
    a, b = ShapesDataset("val", 5, 32, seed=0), ShapesDataset("val", 5, 32, seed=0)
    assert np.array_equal(np.asarray(a[2][0]), np.asarray(b[2][0])) and np.array_equal(a.mask(2), b.mask(2))
    c = ShapesDataset("train", 5, 32, seed=0)
    d = ShapesDataset("val", 5, 32, seed=1)
    assert not np.array_equal(np.asarray(a[2][0]), np.asarray(c[2][0]))
    assert not np.array_equal(np.asarray(a[2][0]), np.asarray(d[2][0]))


def test_object_pixels_differ_from_background() -> None:
    """The object is visible: its mean colour is far from the background's."""
    dists = []
    for i in range(30):
        img, _, mask = render(0, "train", i, 64)
        x = img.astype(float) / 255
        dists.append(np.linalg.norm(x[mask].mean(0) - x[~mask].mean(0)))
    assert np.median(dists) > 0.2


def test_same_label_same_shape_class_across_scales() -> None:
    """Masks of one class have the same area ratio to their bounding box whatever the scale (up to pixels)."""
    ratios = {}
    for i in range(60):
        _, label, mask = render(0, "train", i, 96)
        ys, xs = np.nonzero(mask)
        ratios.setdefault(CLASSES[label], []).append(mask.sum() / np.pi / max(np.ptp(ys), np.ptp(xs)) ** 2 * 4)
    assert np.mean(ratios["circle"]) == pytest.approx(1.0, abs=0.1)
    assert np.mean(ratios["ring"]) < 0.8 and np.mean(ratios["cross"]) < 0.75


def test_transform_and_errors() -> None:
    ds = ShapesDataset("test", 3, 16, transform=lambda im: np.asarray(im).shape)
    assert ds[0] == ((16, 16, 3), 0)
    with pytest.raises(ValueError, match="unknown shapes split 'dev'"):
        ShapesDataset("dev", 3, 16)
    with pytest.raises(IndexError, match="out of range"):
        ds.mask(3)
    with pytest.raises(ValueError, match="image_size >= 8"):
        ShapesDataset("train", 3, 4)
