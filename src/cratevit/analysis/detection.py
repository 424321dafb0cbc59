"""Class-agnostic COCO detection metrics (AP, AP50, AP75 of boxes and masks) with pycocotools' COCOeval.

The ground truth is made class-agnostic (:func:`cratevit.data.coco.class_agnostic`) and every result is counted
as a "foreground" detection, which is how unsupervised object discovery (MaskCut, CutLER) is scored.
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

from ..data.coco import FOREGROUND, class_agnostic, mask_api
from ..errors import UserError

__all__ = ["coco_ap"]

METRICS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100")


def _coco(dataset: dict[str, Any]) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_ap(
    gt: dict[str, Any], results: list[dict[str, Any]], iou_types: tuple[str, ...] = ("bbox", "segm")
) -> dict[str, dict[str, float]]:
    """``{"bbox": {"AP": .., "AP50": .., ...}, "segm": {...}}`` in [0, 1] for ``results`` (COCO result dicts
    with ``image_id``, ``bbox`` and/or ``segmentation`` and ``score``) against the ground truth ``gt``.

    Results on images absent from ``gt`` are an error; no results at all score 0.
    """
    mask_api()  # a clear ImportError when pycocotools is missing
    from pycocotools.cocoeval import COCOeval

    gt = class_agnostic(gt)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    image_ids = {int(im["id"]) for im in gt["images"]}
    stray = sorted({int(r["image_id"]) for r in results} - image_ids)
    if stray:
        raise UserError(f"{len(stray)} result image id(s) are not in the ground truth, e.g. {stray[0]}")
    for ann in gt["annotations"]:  # COCOeval reads the area; COCO files have it, hand-made ones may not
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    out: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm"):
            raise UserError(f"unknown IoU type {iou_type!r}; use 'bbox' or 'segm'")
        key = "bbox" if iou_type == "bbox" else "segmentation"
        dets = [dict(copy.deepcopy(r), category_id=FOREGROUND["id"]) for r in results if key in r]
        if iou_type == "segm":  # loadRes derives boxes from masks, and wants no stale box next to them
            for d in dets:
                d.pop("bbox", None)
        else:
            for d in dets:
                d.pop("segmentation", None)
        if not dets:
            out[iou_type] = dict.fromkeys(METRICS, 0.0)
            continue
        coco_gt = _coco(gt)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(dets)
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # COCOeval writes -1 where a metric has no ground truth (e.g. no large objects): NaN there
        out[iou_type] = {
            name: float(v) if v >= 0 else float("nan")
            for name, v in zip(METRICS, ev.stats[: len(METRICS)], strict=True)
        }
    return out
