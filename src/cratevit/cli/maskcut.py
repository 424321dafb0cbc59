"""``cratevit maskcut CKPT IMAGE...|--data DIR``: MaskCut object masks from a layer's key features, written as
COCO-format results with overlays; scored with class-agnostic COCO AP when the data has annotations."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "MaskCut object discovery (N normalised cuts of the key-feature graph): COCO results, overlays, AP"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="[CKPT] IMAGE",
        help="a checkpoint (or preset / timm name) and image files or folders; with --data, the checkpoint alone",
    )
    p.add_argument(
        "--data",
        default=None,
        help="a COCO-format folder (images + annotations.json, or --annotations), or 'multishapes' (the "
        "built-in 2-4 object scenes, exported under -o as a COCO folder)",
    )
    p.add_argument(
        "--annotations",
        default=None,
        metavar="FILE",
        help="COCO annotation file of --data (e.g. annotations/instances_val2017.json)",
    )
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--size",
        type=int,
        default=480,
        help="input size (images resized to size x size, positional embedding interpolated); "
        "multishapes: 48 unless given",
    )
    p.add_argument("--layer", type=int, default=-1, help="layer of the features (0-based, -1: last)")
    p.add_argument("--facet", choices=("key", "attn", "token", "code"), default="key", help="features of the graph")
    p.add_argument("--tau", type=float, default=0.15, help="affinity threshold on the features' cosine")
    p.add_argument("--rounds", "-N", type=int, default=3, help="normalised cuts per image (masks at most)")
    p.add_argument(
        "--solver",
        choices=("auto", "dense", "lanczos"),
        default="auto",
        help="eigen solver: dense = scipy eigh(D-A, D) as CutLER; lanczos: the same vector, much faster",
    )
    p.add_argument("--num-images", type=int, default=None, help="only the first N images")
    p.add_argument("--num-scenes", type=int, default=100, help="multishapes: scenes to export (val split)")
    p.add_argument("--no-overlays", action="store_true", help="do not write overlay images")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="the checkpoint's architecture with freshly initialised weights (seeded by --seed)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init")
    p.add_argument("--arch", default=None, help="preset of a checkpoint that does not record its architecture")
    p.add_argument("--heads", type=int, default=None, help="head count, where the file's shapes cannot tell it")
    p.add_argument(
        "--mean", type=float, nargs=3, default=None, help="normalisation mean (default: the training data's)"
    )
    p.add_argument("--std", type=float, nargs=3, default=None, help="normalisation std (default: the training data's)")


def _images(args: argparse.Namespace, spec_given: bool) -> tuple[list[Any], Path | None]:
    """(CocoImage list, annotation file or None)."""
    from ..analysis.images import find_images
    from ..data.coco import CocoImage, read_coco_folder
    from ..errors import UserError

    if args.data is not None:
        if args.data == "multishapes":
            from ..data.multishapes import MultiShapesDataset, export_coco

            export_coco(MultiShapesDataset("val", args.num_scenes, 48), args.out / "multishapes")
            images, ann = read_coco_folder(args.out / "multishapes")
        else:
            images, ann = read_coco_folder(args.data, args.annotations)
        return images[: args.num_images], ann
    files: list[Path] = []
    for item in map(Path, args.inputs[1:] if spec_given else args.inputs):
        files.extend(find_images(item) if item.is_dir() else [item])
    if not files:
        raise UserError("give images (cratevit maskcut CKPT IMAGE...) or --data DIR")
    from PIL import Image

    out = []
    for i, path in enumerate(files[: args.num_images], start=1):
        if not path.is_file():
            raise FileNotFoundError(f"no image at {path}")
        with Image.open(path) as im:
            out.append(CocoImage(i, path, im.width, im.height))
    return out, None


def run(args: argparse.Namespace) -> int:
    import json
    import statistics
    import time

    import torch

    from ..analysis import input_normalization
    from ..analysis.detection import coco_ap
    from ..analysis.images import load_image
    from ..analysis.maskcut import maskcut_image, overlay_masks, results_for_image, set_input_size
    from ..analysis.segmentation import load_vision_model
    from ..data.coco import load_annotations, mask_api
    from ..errors import UserError
    from ..registry import layer_count

    mask_api()  # a one-line error naming the extra when pycocotools is missing
    if not args.inputs:
        raise UserError("give a checkpoint (or preset): cratevit maskcut CKPT IMAGE... or CKPT --data DIR")
    if args.rounds < 1 or not 0 <= args.tau < 1:
        raise UserError(f"need --rounds >= 1 and 0 <= --tau < 1, got {args.rounds} and {args.tau}")
    spec = args.inputs[0]
    if args.data == "multishapes" and args.size == 480:
        args.size = 48  # the scenes' own size: objects as large (in tokens) as in training on shapes
    model = load_vision_model(spec, arch=args.arch, heads=args.heads).eval()
    if args.random_init:
        from .segeval import _random_copy

        model = _random_copy(model, args.seed).eval()
    depth = layer_count(model)
    if not -depth <= args.layer < depth:
        raise UserError(f"--layer {args.layer} is out of range for a {depth}-layer model; use 0..{depth - 1} or -1")
    patch = model.config.patch_size if hasattr(model, "config") else tuple(model.patch_embed.patch_size)
    if args.size % patch[0] or args.size % patch[1]:
        raise UserError(f"--size {args.size} is not a multiple of the patch size {patch[0]}x{patch[1]}")
    set_input_size(model, (args.size, args.size))
    mean, std = input_normalization(spec)
    mean, std = tuple(args.mean or mean), tuple(args.std or std)
    args.out.mkdir(parents=True, exist_ok=True)
    images, ann_path = _images(args, True)
    if not args.no_overlays:
        (args.out / "overlays").mkdir(exist_ok=True)
    results, seconds, per_image = [], [], []
    threads = torch.get_num_threads()
    for im in images:
        image = load_image(im.path)
        start = time.perf_counter()
        masks = maskcut_image(
            model, image, args.size, args.layer, args.facet, args.tau, args.rounds, mean, std, args.solver
        )
        seconds.append(time.perf_counter() - start)
        results += results_for_image(masks, im.id)
        per_image.append({"image_id": im.id, "file": str(im.path), "masks": len(masks), "seconds": seconds[-1]})
        if not args.no_overlays:
            overlay_masks(image, [m.mask for m in masks]).save(
                args.out / "overlays" / f"{im.id:06d}-{im.path.stem}.png"
            )
    (args.out / "results.json").write_text(json.dumps(results))
    summary: dict[str, Any] = {
        "checkpoint": spec,
        "random_init": args.random_init,
        "data": args.data,
        "annotations": str(ann_path) if ann_path else None,
        "images": len(images),
        "masks": len(results),
        "input_size": args.size,
        "layer": args.layer,
        "facet": args.facet,
        "tau": args.tau,
        "rounds": args.rounds,
        "solver": args.solver,
        "crf": False,
        "mean": mean,
        "std": std,
        "torch_threads": threads,
        "seconds_per_image": {"mean": statistics.fmean(seconds), "median": statistics.median(seconds)},
        "score": "(N - round) / N: the first cut scores highest",
    }
    if ann_path is not None:
        gt = load_annotations(ann_path)
        gt["images"] = [g for g in gt["images"] if int(g["id"]) in {im.id for im in images}]
        kept = {int(g["id"]) for g in gt["images"]}
        gt["annotations"] = [a for a in gt["annotations"] if int(a["image_id"]) in kept]
        summary["ap"] = coco_ap(gt, results)
        for kind in ("bbox", "segm"):
            ap = summary["ap"][kind]
            print(f"{kind}: AP {100 * ap['AP']:.1f}  AP50 {100 * ap['AP50']:.1f}  AP75 {100 * ap['AP75']:.1f}")
    (args.out / "maskcut.json").write_text(json.dumps({**summary, "per_image": per_image}, indent=2))
    print(
        f"{len(results)} masks on {len(images)} images, {summary['seconds_per_image']['median']:.2f} s per image "
        f"(median, {args.size} px, {threads} threads) -> {args.out / 'results.json'}"
    )
    return 0
