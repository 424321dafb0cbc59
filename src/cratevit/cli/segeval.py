"""``cratevit segeval CKPT --data shapes``: coarse segmentation from [CLS] attention under three protocols (the
CRATE emergence paper's, DINO's, and cratevit's first one with its PCA masks); see :mod:`cratevit.segprotocols`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._args import (
    add_arch_heads_arguments,
    add_batch_size_argument,
    add_layer_argument,
    add_output_argument,
    add_seed_argument,
    add_threads_argument,
    apply_threads,
    positive_int,
    probability,
    progress,
    say_random_weights,
)
from ._images import check_layer

HELP = (
    "coarse segmentation from [CLS] attention (and PCA) against ground truth, under the paper's, DINO's and "
    "cratevit's protocols (built-in shapes / multi-shapes, or PASCAL VOC 2012)"
)


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
        help="'shapes' (built-in, one object, exact masks), 'multishapes' (2-4 objects of 6 classes, 48 px) "
        "or a PASCAL VOC 2012 folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)",
    )
    p.add_argument(
        "--protocol",
        action="append",
        choices=("paper", "dino", "cratevit"),
        default=None,
        help="protocol to report (repeat for several; default: all three): paper = token grid, top 60%% "
        "of entries, best head per class; dino = pixel Jaccard, 60%% of the mass, head-mean map and "
        "best head per image; cratevit = pixel IoU of the head-mean map, one fixed head, and PCA",
    )
    p.add_argument(
        "--threshold-kind",
        choices=("entries", "mass"),
        default="entries",
        help="paper protocol: keep the top --threshold of a head's entries, or of its attention mass",
    )
    add_output_argument(p, "output folder", required=True)
    p.add_argument("--split", default="val", help="shapes split (train/val/test) or VOC image list (val, train, ...)")
    p.add_argument(
        "--num-images", type=positive_int, default=300, help="number of images (VOC: the first N of the list)"
    )
    add_seed_argument(p, "seed of the shapes data and of --with-random")
    p.add_argument("--with-random", action="store_true", help="also score the first model at random initialisation")
    add_layer_argument(p, extra="; the paper's figures use -2")
    p.add_argument(
        "--threshold",
        type=probability,
        default=0.6,
        help="fraction the masks keep (of the entries or the mass, see --threshold-kind)",
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="CRATE input size for VOC images (positional embedding interpolated; default: the model's)",
    )
    add_arch_heads_arguments(p)
    add_batch_size_argument(p, 32)
    add_threads_argument(p)


def _samples(args: argparse.Namespace, image_size: int) -> Any:
    from ..analysis.segmentation import VOCSegmentationFolder, multishapes_samples, shapes_samples

    if args.data == "shapes":
        return shapes_samples(args.split, args.num_images, image_size, args.seed)
    if args.data == "multishapes":
        return multishapes_samples(args.split, args.num_images, MULTISHAPES_SIZE, args.seed)
    return VOCSegmentationFolder(args.data, args.split, limit=args.num_images)


MULTISHAPES_SIZE = 48


def _progress_over(samples: Any, limit: int, spec: str) -> Any:
    total = len(samples) if hasattr(samples, "__len__") else limit
    return progress(samples, total, f"{spec}: images")


def _flat(spec: str, args: argparse.Namespace, summary: dict[str, Any]) -> dict[str, Any]:
    """One model's summary: the cratevit protocol's figures at the top level (as the first segeval wrote them),
    the paper's and DINO's in their own entries."""
    cratevit = summary.pop("cratevit", {})
    return {"model": spec, "data": args.data, "split": args.split, **summary, **cratevit}


def _table(summaries: dict[str, dict[str, Any]], protocols: list[str]) -> list[str]:
    head, cols = ["model"], []
    if "paper" in protocols:
        head += ["paper mIoU (best head per class)", "paper mIoU (head mean)"]
        cols += [lambda s: s["paper"]["miou"], lambda s: s["paper"]["miou_head_mean"]]
    if "dino" in protocols:
        head += ["DINO J (head-mean map)", "DINO J (best head per object)"]
        cols += [lambda s: s["dino"]["jaccard_head_mean_map"], lambda s: s["dino"]["jaccard_best_head"]]
    if "cratevit" in protocols:
        head += ["mIoU attention (mean of heads)", "mIoU best head", "mIoU PCA"]
        cols += [lambda s: s["miou_attention"], lambda s: s["miou_best_head"], lambda s: s["miou_pca"]]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows += ["| " + " | ".join([s["model"]] + [f"{c(s):.3f}" for c in cols]) + " |" for s in summaries.values()]
    return rows


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    import json

    from ..analysis import input_normalization
    from ..analysis.segmentation import load_vision_model, random_copy
    from ..analysis.segprotocols import PROTOCOLS, evaluate_protocols

    protocols = [p for p in PROTOCOLS if p in (args.protocol or PROTOCOLS)]
    models = [(spec, load_vision_model(spec, arch=args.arch, heads=args.heads)) for spec in args.models]
    for spec in args.models:
        say_random_weights(spec)
    if args.with_random:
        models.append((f"{args.models[0]} (random init)", random_copy(models[0][1], args.seed)))
    args.output.mkdir(parents=True, exist_ok=True)
    summaries, per_image = {}, []
    for spec, model in models:
        size, patch, layer = _evaluation_geometry(model, args)
        mean, std = input_normalization(spec.removesuffix(" (random init)"))
        samples = _progress_over(_samples(args, size[0]), args.num_images, spec)
        result = evaluate_protocols(
            model.eval(), samples, size, patch, args.layer, args.threshold, args.threshold_kind, mean, std,
            protocols, args.batch_size,
        )  # fmt: skip
        summaries[spec] = summary = _flat(spec, args, result.summary())
        per_image += [{"model": spec, **row} for row in result.per_image()]
        print(f"{spec}: {_line(summary, protocols)} over {summary['num_images']} images, layer {layer} (0-based)")
    (args.output / "segeval.json").write_text(json.dumps(summaries, indent=2))
    _write_csv(args.output / "per_image.csv", per_image)
    table = _table(summaries, protocols)
    (args.output / "segeval.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


def _evaluation_geometry(model: Any, args: argparse.Namespace) -> tuple[tuple[int, int], tuple[int, int], int]:
    """(input size, patch size, 0-based layer) the model is evaluated at: VOC at ``--image-size`` (CRATE only),
    the multi-shapes scenes at their own 48 px; checks ``--layer``."""
    from ..analysis.segmentation import model_geometry
    from ..errors import UserError
    from ..registry import is_family_model, layer_count

    size, patch = model_geometry(model)
    layer = check_layer(args.layer, layer_count(model))
    if args.image_size is not None and args.data not in ("shapes", "multishapes"):
        if not is_family_model(model):
            raise UserError("--image-size works for CRATE models only (timm ViTs are evaluated at their size)")
        model.dynamic_img_size = True
        size = (args.image_size, args.image_size)
    if args.data == "multishapes" and tuple(size) != (MULTISHAPES_SIZE, MULTISHAPES_SIZE):
        from ..analysis.maskcut import set_input_size

        set_input_size(model, (MULTISHAPES_SIZE, MULTISHAPES_SIZE))  # the scenes' own size, same object scale
        size = (MULTISHAPES_SIZE, MULTISHAPES_SIZE)
    return size, patch, layer


def _line(summary: dict[str, Any], protocols: list[str]) -> str:
    """One model's figures under each protocol, for the terminal."""
    parts = []
    if "paper" in protocols:
        parts.append(f"paper mIoU {summary['paper']['miou']:.3f}")
    if "dino" in protocols:
        parts.append(
            f"DINO J {summary['dino']['jaccard_head_mean_map']:.3f} "
            f"(best head per object {summary['dino']['jaccard_best_head']:.3f})"
        )
    if "cratevit" in protocols:
        parts.append(
            f"attention {summary['miou_attention']:.3f}, best head {summary['miou_best_head']:.3f} "
            f"(head {summary['best_head']}), PCA {summary['miou_pca']:.3f}"
        )
    return "; ".join(parts)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
