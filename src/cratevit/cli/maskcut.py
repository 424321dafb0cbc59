"""``cratevit maskcut CKPT IMAGE...|--data DIR``: MaskCut object masks from a layer's key features, written as
COCO-format results with overlays; scored with class-agnostic COCO AP when the data has annotations."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._args import (
    add_arch_heads_arguments,
    add_layer_argument,
    add_normalization_arguments,
    add_output_argument,
    add_seed_argument,
    add_threads_argument,
    apply_threads,
    positive_int,
    progress,
    say_random_weights,
    unit_float,
)
from ._images import check_layer

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
    add_output_argument(p, "output folder", required=True)
    p.add_argument(
        "--size",
        type=positive_int,
        default=480,
        help="input size (images resized to size x size, positional embedding interpolated); "
        "multishapes: 48 unless given",
    )
    add_layer_argument(p)
    p.add_argument("--facet", choices=("key", "attn", "token", "code"), default="key", help="features of the graph")
    p.add_argument("--tau", type=unit_float, default=0.15, help="affinity threshold on the features' cosine")
    p.add_argument("--rounds", "-N", type=positive_int, default=3, help="normalised cuts per image (masks at most)")
    p.add_argument(
        "--solver",
        choices=("auto", "dense", "lanczos"),
        default="auto",
        help="eigen solver: dense = scipy eigh(D-A, D) as CutLER; lanczos: the same vector, much faster",
    )
    p.add_argument("--num-images", type=positive_int, default=None, help="only the first N images")
    p.add_argument("--num-scenes", type=positive_int, default=100, help="multishapes: scenes to export (val split)")
    p.add_argument("--no-overlays", action="store_true", help="do not write overlay images")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="the checkpoint's architecture with freshly initialised weights (seeded by --seed)",
    )
    add_seed_argument(p, "seed of --random-init")
    add_arch_heads_arguments(p)
    add_normalization_arguments(p)
    add_threads_argument(p)


def _images(args: argparse.Namespace, spec_given: bool) -> tuple[list[Any], Path | None]:
    """(CocoImage list, annotation file or None)."""
    from ..analysis.images import find_images
    from ..data.coco import CocoImage, read_coco_folder
    from ..errors import UserError

    if args.data is not None:
        if args.data == "multishapes":
            from ..data.multishapes import MultiShapesDataset, export_coco

            export_coco(MultiShapesDataset("val", args.num_scenes, 48), args.output / "multishapes")
            images, ann = read_coco_folder(args.output / "multishapes")
        else:
            images, ann = read_coco_folder(args.data, args.annotations)
        return images[: args.num_images], ann
    files: list[Path] = []
    for item in map(Path, args.inputs[1:] if spec_given else args.inputs):
        files.extend(find_images(item) if item.is_dir() else [item])
    if not files:
        raise UserError("give images (cratevit maskcut CKPT IMAGE...) or --data DIR")
    from ..analysis.images import image_size

    return [CocoImage(i, path, *image_size(path)) for i, path in enumerate(files[: args.num_images], start=1)], None


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    from ..analysis.discovery import DiscoveryConfig, discover_objects
    from ..analysis.maskcut import set_input_size
    from ..data.coco import mask_api
    from ._images import normalization

    mask_api()  # a one-line error naming the extra when pycocotools is missing
    model, spec = _load(args)
    mean, std = normalization(args, spec)
    set_input_size(model, (args.size, args.size))
    images, ann_path = _images(args, True)
    cfg = DiscoveryConfig(
        args.size, args.layer, args.facet, args.tau, args.rounds, args.solver, mean, std, not args.no_overlays
    )
    provenance = {"checkpoint": spec, "random_init": args.random_init, "data": args.data}
    summary = discover_objects(
        model, images, args.output, cfg, ann_path, provenance, lambda xs: progress(xs, len(xs), "maskcut images")
    )
    for kind, ap in summary.get("ap", {}).items():
        print(f"{kind}: AP {100 * ap['AP']:.1f}  AP50 {100 * ap['AP50']:.1f}  AP75 {100 * ap['AP75']:.1f}")
    print(
        f"{summary['masks']} masks on {summary['images']} images, {summary['seconds_per_image']['median']:.2f} s per "
        f"image (median, {args.size} px, {summary['torch_threads']} threads) -> {args.output / 'results.json'}"
    )
    return 0


def _load(args: argparse.Namespace) -> tuple[Any, str]:
    """The model (``--random-init``: its architecture re-initialised), its name; checks --layer and --size."""
    from ..analysis.segmentation import load_vision_model, random_copy
    from ..errors import UserError
    from ..registry import layer_count

    if not args.inputs:
        raise UserError("give a checkpoint (or preset): cratevit maskcut CKPT IMAGE... or CKPT --data DIR")
    spec = args.inputs[0]
    if args.data == "multishapes" and args.size == 480:
        args.size = 48  # the scenes' own size: objects as large (in tokens) as in training on shapes
    model = load_vision_model(spec, arch=args.arch, heads=args.heads).eval()
    if args.random_init:
        model = random_copy(model, args.seed).eval()
        print(f"{spec}: its architecture with random weights seeded with {args.seed} (--random-init)", flush=True)
    else:
        say_random_weights(spec)
    layer = check_layer(args.layer, layer_count(model))
    print(f"{spec}: {args.facet} features of layer {layer} (block index, 0-based)", flush=True)
    patch = model.config.patch_size if hasattr(model, "config") else tuple(model.patch_embed.patch_size)
    if args.size % patch[0] or args.size % patch[1]:
        raise UserError(f"--size {args.size} is not a multiple of the patch size {patch[0]}x{patch[1]}")
    return model, spec
