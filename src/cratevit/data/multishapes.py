"""Several shapes per image with instance masks: the built-in data for object discovery (MaskCut) and COCO AP.

Each image holds 2-4 objects (by default) drawn like the single-object shapes of :mod:`cratevit.data.shapes`
(class, colour, texture, rotation) on the same kind of cluttered background; objects may overlap, and a later
object hides the earlier ones, so every instance mask is the object's *visible* part. An object hidden for more
than 70% of its area is dropped from the scene's annotations (it is still drawn). Item ``i`` of a split is a pure
function of ``(seed, split, i)``.

:func:`export_coco` writes a split as a COCO-format folder (``images/`` and ``annotations.json`` with RLE masks,
boxes and the six shape categories), the layout ``cratevit maskcut --data`` and ``cratevit detect-eval`` read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from .shapes import CLASSES, SPLITS, _colour_far_from, _pattern, _shape_mask, _smooth_noise

__all__ = ["MultiShapesDataset", "Scene", "export_coco", "render_scene"]

MIN_VISIBLE = 0.3  # an instance keeps at least this fraction of its area visible, else it is not annotated


@dataclass
class Scene:
    """One image with its objects: class indices and visible instance masks (bool, H x W), in drawing order."""

    image: np.ndarray  # uint8 (H, W, 3)
    labels: list[int]
    masks: list[np.ndarray]


def _background(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    bg1, bg2 = rng.random(3), rng.random(3)
    mix = _smooth_noise(rng, size, int(rng.integers(2, 6))) if rng.random() < 0.5 else _pattern(rng, yy, xx, size)
    img = bg1 * (1 - mix[..., None]) + bg2 * mix[..., None]
    for _ in range(int(rng.integers(1, 4))):  # small distractor blobs
        cy, cx = rng.uniform(0, size, 2)
        img[np.hypot(yy - cy, xx - cx) <= rng.uniform(0.02, 0.04) * size] = rng.random(3)
    return img, [bg1, bg2]


def render_scene(
    seed: int,
    split: str,
    index: int,
    image_size: int = 48,
    objects: tuple[int, int] = (2, 4),
    radius: tuple[float, float] = (0.15, 0.26),
) -> Scene:
    """Item ``index`` of a split: ``objects`` (min, max) shapes of circumradius ``radius`` x image size."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if not 1 <= objects[0] <= objects[1]:
        raise UserError(f"objects must be (min, max) with 1 <= min <= max, got {objects}")
    rng = np.random.default_rng((seed, SPLITS.index(split), index, 7))  # 7: a stream apart from the shapes'
    size = image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    img, taken = _background(rng, yy, xx, size)
    owner = np.full((size, size), -1)  # which object each pixel shows
    labels, full_areas = [], []
    for k in range(int(rng.integers(objects[0], objects[1] + 1))):
        label = int(rng.integers(len(CLASSES)))
        r = rng.uniform(*radius) * size
        cy, cx = rng.uniform(r * 0.6, size - r * 0.6, 2)  # may touch the border a little
        theta = rng.uniform(0, 2 * np.pi)
        u = ((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / r
        v = (-(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)) / r
        mask = _shape_mask(CLASSES[label], u, v)
        fg1 = _colour_far_from(rng, taken)
        taken.append(fg1)
        fg2 = np.clip(fg1 + rng.uniform(-0.2, 0.2, 3), 0, 1)
        tex = _pattern(rng, yy, xx, size)[..., None]
        img = np.where(mask[..., None], fg1 * (1 - tex) + fg2 * tex, img)
        owner[mask] = k
        labels.append(label)
        full_areas.append(int(mask.sum()))
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    keep = [k for k in range(len(labels)) if full_areas[k] > 0 and (owner == k).sum() >= MIN_VISIBLE * full_areas[k]]
    return Scene((img * 255).round().astype(np.uint8), [labels[k] for k in keep], [owner == k for k in keep])


class MultiShapesDataset:
    """``size`` scenes of a split; ``scene(i)`` gives the image, the class indices and the instance masks."""

    classes = CLASSES

    def __init__(
        self,
        split: str = "val",
        size: int = 200,
        image_size: int = 48,
        seed: int = 0,
        objects: tuple[int, int] = (2, 4),
    ) -> None:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if size <= 0 or image_size < 16:
            raise UserError(f"multi-shapes needs size > 0 and image_size >= 16, got {size}, {image_size}")
        self.split, self.size, self.image_size, self.seed, self.objects = split, size, image_size, seed, objects

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> Scene:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} scenes")
        return render_scene(self.seed, self.split, index % self.size, self.image_size, self.objects)

    def __getitem__(self, index: int) -> tuple[Image.Image, Scene]:
        scene = self.scene(index)
        return Image.fromarray(scene.image, mode="RGB"), scene


def export_coco(dataset: MultiShapesDataset, folder: str | Path) -> Path:
    """Write ``folder/images/*.png`` and ``folder/annotations.json`` (COCO instances); returns the json path."""
    from .coco import mask_annotation

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(len(dataset)):
        image, scene = dataset[i]
        name = f"{dataset.split}-{i:05d}.png"
        image.save(folder / "images" / name)
        images.append({"id": i + 1, "file_name": name, "width": image.width, "height": image.height})
        for label, mask in zip(scene.labels, scene.masks, strict=True):
            annotations.append(
                mask_annotation(mask, image_id=i + 1, category_id=label + 1, ann_id=len(annotations) + 1)
            )
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]
    info = {
        "description": f"cratevit multi-shapes, split {dataset.split}, seed {dataset.seed}, "
        f"{dataset.image_size} px, {dataset.objects[0]}-{dataset.objects[1]} objects"
    }
    path = folder / "annotations.json"
    path.write_text(json.dumps({"info": info, "images": images, "annotations": annotations, "categories": categories}))
    return path
