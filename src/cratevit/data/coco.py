"""COCO-format instance data: RLE masks and boxes (through pycocotools), folders of images with an annotation
file, and the class-agnostic form that object discovery is scored against (every category becomes one
"foreground" category).

pycocotools is an optional dependency: ``pip install 'cratevit[coco]'``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError, require

__all__ = [
    "FOREGROUND",
    "CocoImage",
    "class_agnostic",
    "decode_mask",
    "encode_mask",
    "load_annotations",
    "mask_annotation",
    "read_coco_folder",
]

FOREGROUND = {"id": 1, "name": "foreground", "supercategory": "foreground"}
"""The one category of class-agnostic results and ground truth."""


def mask_api() -> Any:
    """``pycocotools.mask``, or a one-line UserError naming the extra to install."""
    require("pycocotools", "coco", "COCO masks and AP")
    from pycocotools import mask

    return mask


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A bool (H, W) mask as COCO run-length encoding, ``counts`` as text (JSON-ready)."""
    rle = mask_api().encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def decode_mask(rle: dict[str, Any]) -> np.ndarray:
    """COCO run-length encoding (``counts`` as text or bytes) -> bool (H, W)."""
    rle = dict(rle)
    if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    return mask_api().decode(rle).astype(bool)


def mask_annotation(
    mask: np.ndarray, image_id: int, category_id: int = 1, ann_id: int | None = None, score: float | None = None
) -> dict[str, Any]:
    """One COCO instance (ground truth, or a result when ``score`` is given): RLE mask, its box
    ``[x, y, width, height]`` and area."""
    api = mask_api()
    rle = encode_mask(mask)
    raw = dict(rle, counts=rle["counts"].encode("ascii"))
    ann: dict[str, Any] = {
        "image_id": int(image_id),
        "category_id": int(category_id),
        "segmentation": rle,
        "area": float(api.area(raw)),
        "bbox": [float(v) for v in api.toBbox(raw)],
        "iscrowd": 0,
    }
    if ann_id is not None:
        ann["id"] = int(ann_id)
    if score is not None:
        ann["score"] = float(score)
    return ann


def class_agnostic(gt: dict[str, Any]) -> dict[str, Any]:
    """A copy of a COCO ground truth with every annotation in the one ``foreground`` category (crowd regions
    stay crowd regions, so they are ignored as COCOeval ignores them)."""
    out = copy.deepcopy(gt)
    out["categories"] = [dict(FOREGROUND)]
    for ann in out.get("annotations", []):
        ann["category_id"] = FOREGROUND["id"]
    return out


def load_annotations(path: str | Path) -> dict[str, Any]:
    """Read a COCO instances file, with a one-line error when it is not one."""
    path = Path(path)
    try:
        gt = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable COCO annotation file ({e})") from None
    missing = [k for k in ("images", "annotations") if k not in gt]
    if missing or not isinstance(gt.get("images"), list):
        raise UserError(
            f"{path}: not a COCO instances file (missing {missing or ['images']}); expected the "
            "'images', 'annotations' and 'categories' lists of e.g. instances_val2017.json"
        )
    gt.setdefault("categories", [])
    return gt


@dataclass
class CocoImage:
    """One image of a COCO-format folder: its id, file and size."""

    id: int
    path: Path
    width: int
    height: int


def read_coco_folder(folder: str | Path, annotations: str | Path | None = None) -> tuple[list[CocoImage], Path]:
    """The images of a COCO-format folder and its annotation file.

    ``folder`` holds the images (directly or in ``images/``); ``annotations`` defaults to
    ``folder/annotations.json`` (the layout :func:`cratevit.data.multishapes.export_coco` writes). For COCO
    val2017: ``folder=val2017``, ``annotations=annotations/instances_val2017.json``.
    """
    folder = Path(folder)
    ann_path = Path(annotations) if annotations is not None else folder / "annotations.json"
    if not ann_path.is_file():
        raise FileNotFoundError(f"no COCO annotation file at {ann_path}: pass --annotations FILE")
    gt = load_annotations(ann_path)
    base = folder / "images" if (folder / "images").is_dir() else folder
    images = [
        CocoImage(int(im["id"]), base / im["file_name"], int(im["width"]), int(im["height"])) for im in gt["images"]
    ]
    missing = [im.path for im in images if not im.path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of {ann_path} are not in {base}, e.g. {missing[0]}")
    return images, ann_path
