"""``cratevit detect-eval --gt FILE --results FILE``: class-agnostic COCO AP/AP50/AP75 of boxes and masks."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._args import add_output_argument

HELP = "class-agnostic COCO AP, AP50, AP75 of detections (boxes and masks) with pycocotools"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gt",
        required=True,
        type=Path,
        help="COCO ground truth (e.g. annotations/instances_val2017.json), made class-agnostic",
    )
    p.add_argument(
        "--results",
        required=True,
        type=Path,
        help="COCO results: a list of {image_id, bbox and/or segmentation (RLE), score} (results.json "
        "of cratevit maskcut)",
    )
    add_output_argument(p, "write the figures as JSON to this file")
    p.add_argument(
        "--only-result-images",
        action="store_true",
        help="score only the images that have results (e.g. a MaskCut run on the first N images)",
    )


def run(args: argparse.Namespace) -> int:
    import json

    from ..analysis.detection import coco_ap
    from ..data.coco import load_annotations, load_results, mask_api

    mask_api()  # a one-line error naming the extra when pycocotools is missing
    gt = load_annotations(args.gt)
    results = load_results(args.results)
    if args.only_result_images:
        ids = {int(r["image_id"]) for r in results}
        gt["images"] = [im for im in gt["images"] if int(im["id"]) in ids]
        gt["annotations"] = [a for a in gt["annotations"] if int(a["image_id"]) in ids]
    scores = coco_ap(gt, results)
    print(f"{len(results)} detections, {len(gt['images'])} images, {len(gt['annotations'])} ground-truth objects")
    print("| | AP | AP50 | AP75 |\n|---|---|---|---|")
    for kind, s in scores.items():
        print(f"| {kind} | {100 * s['AP']:.1f} | {100 * s['AP50']:.1f} | {100 * s['AP75']:.1f} |")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"gt": str(args.gt), "results": str(args.results), **scores}, indent=2))
    return 0
