"""``cratevit segeval CKPT --data shapes``: mIoU of foreground masks from attention and PCA (emergence paper)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "mIoU of attention / PCA foreground masks against ground truth (built-in shapes data or PASCAL VOC 2012)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "models",
        nargs="+",
        metavar="CKPT",
        help="CRATE checkpoints or presets, timm ViT checkpoints from `cratevit train --arch vit_...`, "
        "or timm model names (random weights)",
    )
    p.add_argument(
        "--data",
        default="shapes",
        help="'shapes' (built-in, exact masks) or a PASCAL VOC 2012 folder (JPEGImages/, "
        "SegmentationClass/, ImageSets/Segmentation/)",
    )
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    p.add_argument("--split", default="val", help="shapes split (train/val/test) or VOC image list (val, train, ...)")
    p.add_argument("--num-images", type=int, default=300, help="number of images (VOC: the first N of the list)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shapes data and of --with-random")
    p.add_argument("--with-random", action="store_true", help="also score the first model at random initialisation")
    p.add_argument("--layer", type=int, default=-1, help="layer of the attention and features (0-based, -1: last)")
    p.add_argument("--threshold", type=float, default=0.6, help="fraction of attention mass the masks keep")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="CRATE input size for VOC images (positional embedding interpolated; default: the model's)",
    )
    p.add_argument("--arch", default=None, help="preset of CRATE checkpoints that do not record their architecture")
    p.add_argument(
        "--heads", type=int, default=None, help="head count, where the file's shapes cannot tell it (6x128 vs 12x64)"
    )
    p.add_argument("--batch-size", type=int, default=32)


def _samples(args: argparse.Namespace, image_size: int) -> Any:
    from ..analysis.segmentation import VOCSegmentationFolder, shapes_samples
    from ..errors import UserError

    if args.num_images <= 0:
        raise UserError(f"--num-images must be positive, got {args.num_images}")
    if args.data == "shapes":
        return shapes_samples(args.split, args.num_images, image_size, args.seed)
    return VOCSegmentationFolder(args.data, args.split, limit=args.num_images)


def _random_copy(model: Any, seed: int) -> Any:
    """The same architecture with freshly initialised weights (seeded)."""
    import copy

    import torch

    from ..registry import family_for, is_family_model

    torch.manual_seed(seed)
    if is_family_model(model):
        return family_for(model).build(model.config)
    fresh = copy.deepcopy(model)  # a timm ViT: re-run its own initialisation (which leaves norms alone)
    fresh.init_weights()
    for module in fresh.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.reset_parameters()
    return fresh


def run(args: argparse.Namespace) -> int:
    import csv
    import json

    from ..analysis import input_normalization
    from ..analysis.segmentation import evaluate, load_vision_model, model_geometry
    from ..errors import UserError
    from ..registry import is_family_model

    models = [(spec, load_vision_model(spec, arch=args.arch, heads=args.heads)) for spec in args.models]
    if args.with_random:
        models.append((f"{args.models[0]} (random init)", _random_copy(models[0][1], args.seed)))
    args.out.mkdir(parents=True, exist_ok=True)
    summaries, per_image = {}, []
    for spec, model in models:
        size, patch = model_geometry(model)
        depth = len(model.blocks)
        if not -depth <= args.layer < depth:
            raise UserError(f"--layer {args.layer} is out of range for {spec} ({depth} layers)")
        if args.image_size is not None and args.data != "shapes":
            if not is_family_model(model):
                raise UserError("--image-size works for CRATE models only (timm ViTs are evaluated at their size)")
            model.dynamic_img_size = True
            size = (args.image_size, args.image_size)
        mean, std = input_normalization(spec.removesuffix(" (random init)"))
        result = evaluate(
            model.eval(), _samples(args, size[0]), size, patch, args.layer, args.threshold, mean, std, args.batch_size
        )
        summary = {"model": spec, "data": args.data, "split": args.split, **result.summary()}
        summaries[spec] = summary
        per_image += [
            {"model": spec, **row, "iou_heads": " ".join(f"{v:.4f}" for v in row["iou_heads"])}
            for row in result.per_image()
        ]
        print(
            f"{spec}: mIoU attention {summary['miou_attention']:.3f}, best head {summary['miou_best_head']:.3f} "
            f"(head {summary['best_head']}), PCA {summary['miou_pca']:.3f} over {summary['num_images']} images"
        )
    (args.out / "segeval.json").write_text(json.dumps(summaries, indent=2))
    with (args.out / "per_image.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(per_image[0]))
        writer.writeheader()
        writer.writerows(per_image)
    table = ["| model | mIoU attention (mean of heads) | mIoU best head | mIoU PCA |", "|---|---|---|---|"]
    table += [
        f"| {s['model']} | {s['miou_attention']:.3f} | {s['miou_best_head']:.3f} | {s['miou_pca']:.3f} |"
        for s in summaries.values()
    ]
    (args.out / "segeval.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0
