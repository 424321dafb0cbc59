"""COCO-format instance data: RLE masks and boxes (through pycocotools), folders of images with an annotation
file, and the class-agnostic form that object discovery is scored against (every category becomes one
"foreground" category).

pycocotools is an optional dependency: ``pip install 'cratevit[coco]'``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError, require

__all__ = [
    "FOREGROUND",
    "CocoImage",
    "check_annotations",
    "check_results",
    "class_agnostic",
    "decode_mask",
    "encode_mask",
    "load_annotations",
    "load_results",
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
    """Read a COCO instances file, with a one-line error when it is not one (unreadable, not JSON, or JSON of the
    wrong shape: see :func:`check_annotations`)."""
    path = Path(path)
    gt = _read_json(path, "COCO annotation file")
    check_annotations(gt, path)
    gt.setdefault("categories", [])
    return gt


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Read a COCO results file (a list of detections), with a one-line error when it is not one (see
    :func:`check_results`)."""
    path = Path(path)
    results = _read_json(path, "COCO results file")
    check_results(results, path)
    return results


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        raise UserError(f"{path}: not a readable {what} ({e})") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _box_problem(box: Any) -> str | None:
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
        return f"'bbox' must be [x, y, width, height] of 4 finite numbers, got {json.dumps(box)[:60]}"
    if box[2] < 0 or box[3] < 0:
        return f"'bbox' has a negative width or height: {box}"
    return None


def _segmentation_problem(seg: Any) -> str | None:
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v >= 0 for v in size)):
            return f"RLE 'segmentation' needs 'size': [height, width], got {json.dumps(size)[:60]}"
        if not isinstance(counts, (str, list)):
            return "RLE 'segmentation' needs 'counts' (a string or a list of run lengths)"
        return None
    if isinstance(seg, list) and all(isinstance(p, list) and all(_is_number(v) for v in p) for p in seg):
        return None  # polygons
    return f"'segmentation' must be RLE {{size, counts}} or a list of polygons, got {json.dumps(seg)[:60]}"


def _problem(path: Path, what: str, index: int, problem: str) -> UserError:
    return UserError(f"{path}: {what} {index}: {problem}; fix the file (COCO format: cocodataset.org/#format-data)")


def check_annotations(gt: Any, path: str | Path = "the ground truth") -> None:
    """A COCO instances file's shape: ``images`` (each with an integer ``id``), ``annotations`` (each with an
    integer ``id`` and ``image_id``, a ``bbox`` [x, y, w, h] of finite numbers, an optional ``segmentation``) and
    an optional ``categories`` list. Raises one :class:`UserError` naming the first bad record and field."""
    path = Path(path)
    if (
        not isinstance(gt, dict)
        or not isinstance(gt.get("images"), list)
        or not isinstance(gt.get("annotations"), list)
    ):
        got = type(gt).__name__ if not isinstance(gt, dict) else f"keys {sorted(gt)[:6]}"
        raise UserError(
            f"{path}: not a COCO instances file (got {got}); expected an object with the 'images', 'annotations' "
            "and 'categories' lists of e.g. instances_val2017.json"
        )
    if not isinstance(gt.get("categories", []), list):
        raise UserError(f"{path}: 'categories' must be a list")
    for i, im in enumerate(gt["images"]):
        if not isinstance(im, dict) or not _is_int(im.get("id")):
            raise _problem(path, "image", i, f"needs an integer 'id', got {json.dumps(im)[:80]}")
    for i, ann in enumerate(gt["annotations"]):
        if not isinstance(ann, dict):
            raise _problem(path, "annotation", i, f"must be an object, got {json.dumps(ann)[:60]}")
        for key in ("id", "image_id"):
            if not _is_int(ann.get(key)):
                raise _problem(path, "annotation", i, f"needs an integer {key!r}, got {json.dumps(ann.get(key))}")
        problem = _box_problem(ann.get("bbox"))
        if problem is None and "segmentation" in ann:
            problem = _segmentation_problem(ann["segmentation"])
        if problem is None and "area" in ann and not _is_number(ann["area"]):
            problem = f"'area' must be a finite number, got {json.dumps(ann['area'])}"
        if problem is not None:
            raise _problem(path, "annotation", i, problem)


def check_results(results: Any, path: str | Path = "the results") -> None:
    """A COCO results list's shape: each detection an object with an integer ``image_id``, a finite ``score`` and
    a ``bbox`` [x, y, w, h] and/or an RLE ``segmentation``. A NaN score is refused (it would rank as any other
    and report a meaningless AP). Raises one :class:`UserError` naming the first bad detection and field."""
    path = Path(path)
    if not isinstance(results, list):
        raise UserError(
            f"{path}: COCO results are a JSON list of detections {{image_id, bbox and/or segmentation, score}}, "
            f"got {type(results).__name__}"
        )
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise _problem(path, "detection", i, f"must be an object, got {json.dumps(r)[:60]}")
        if not _is_int(r.get("image_id")):
            raise _problem(path, "detection", i, f"needs an integer 'image_id', got {json.dumps(r.get('image_id'))}")
        score = r.get("score")
        if not _is_number(score):
            raise _problem(path, "detection", i, f"needs a finite number 'score', got {json.dumps(score)}")
        if "bbox" not in r and "segmentation" not in r:
            raise _problem(path, "detection", i, "needs a 'bbox' or a 'segmentation'")
        problem = _box_problem(r["bbox"]) if "bbox" in r else None
        if problem is None and "segmentation" in r:
            problem = _segmentation_problem(r["segmentation"])
        if problem is not None:
            raise _problem(path, "detection", i, problem)


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
    for i, im in enumerate(gt["images"]):
        if not (isinstance(im.get("file_name"), str) and _is_int(im.get("width")) and _is_int(im.get("height"))):
            raise _problem(ann_path, "image", i, "needs 'file_name' (text), 'width' and 'height' (integers)")
    images = [
        CocoImage(int(im["id"]), base / im["file_name"], int(im["width"]), int(im["height"])) for im in gt["images"]
    ]
    missing = [im.path for im in images if not im.path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of {ann_path} are not in {base}, e.g. {missing[0]}")
    return images, ann_path
