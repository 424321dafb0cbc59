"""What the commands that look at image files share (``attention``, ``pca``): ``[CKPT] IMAGE...`` with
``--checkpoint``, the model loaded with its ``--layer`` checked, images read with the unreadable ones skipped, the
normalisation, and the per-image output folders."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._args import (
    add_arch_heads_arguments,
    add_layer_argument,
    add_max_pixels_argument,
    add_normalization_arguments,
    add_output_argument,
    positive_int,
    say_random_weights,
)


def add_model_and_image_arguments(p: argparse.ArgumentParser) -> None:
    """``[CKPT] IMAGE...``, ``--checkpoint``, ``--arch/--heads``, ``-o``, ``--layer``, sizes and normalisation."""
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="[CKPT] IMAGE",
        help="a checkpoint file (or a preset name: random weights) followed by image files or folders; "
        "without the checkpoint when --checkpoint is given",
    )
    p.add_argument("--checkpoint", default=None, metavar="FILE", help="the checkpoint (instead of the first input)")
    add_arch_heads_arguments(p)
    add_output_argument(p, "output folder", required=True)
    add_layer_argument(p)
    p.add_argument("--decoder", action="store_true", help="a CRATE-MAE's decoder layer (default: its encoder)")
    p.add_argument(
        "--resize",
        choices=("keep-aspect", "model"),
        default="keep-aspect",
        help="keep-aspect: scale the shorter side to --size and interpolate the positional embedding; "
        "model: resize to the model's training size",
    )
    p.add_argument(
        "--size", type=positive_int, default=None, help="shorter side for keep-aspect (default: the model's size)"
    )
    add_max_pixels_argument(p)
    add_normalization_arguments(p)


def split_inputs(args: argparse.Namespace) -> tuple[str, list[Path]]:
    """(checkpoint or preset, image files) from ``[CKPT] IMAGE...`` / ``--checkpoint``; folders are expanded."""
    from ..analysis.images import find_images
    from ..errors import UserError

    inputs = list(args.inputs)
    if args.checkpoint is None:
        if len(inputs) < 2:
            raise UserError("give a checkpoint (or preset) and at least one image: cratevit COMMAND CKPT IMAGE...")
        spec = inputs.pop(0)
    else:
        spec = args.checkpoint
    files: list[Path] = []
    for item in map(Path, inputs):
        files.extend(find_images(item) if item.is_dir() else [item])
    return spec, files


def load_for_images(args: argparse.Namespace) -> tuple[Any, str, list[Path], int]:
    """(model, checkpoint, image files, 0-based layer); says "random weights" for a preset. CRATE interpolates its
    positional embedding for other sizes; a timm ViT (a ``cratevit train --arch vit_...`` checkpoint) and a
    CRATE-MAE (a fixed sine-cosine table) get their training size (``--resize model``)."""
    from ..analysis.segmentation import load_vision_model
    from ..errors import UserError
    from ..registry import is_family_model, layer_count, layer_description

    spec, files = split_inputs(args)
    model = load_vision_model(spec, arch=args.arch, heads=args.heads).eval()
    say_random_weights(spec)
    is_mae = hasattr(model, "decoder_blocks")
    if is_mae:
        if args.resize != "model":
            print(f"{spec}: a CRATE-MAE; images are resized to its training size (--resize model)")
        args.resize = "model"
    elif args.decoder:
        raise UserError(f"--decoder needs a CRATE-MAE; {spec} holds a {type(model).__name__}")
    elif is_family_model(model):
        model.dynamic_img_size = True
    elif args.resize != "model":
        print(f"{spec}: a timm model; images are resized to its training size (--resize model)")
        args.resize = "model"
    depth = len(model.decoder_blocks) if args.decoder else layer_count(model)  # ToST: + its class-attention blocks
    layer = check_layer(args.layer, depth)
    part = "decoder layer" if args.decoder else "layer"
    note = "" if args.decoder else layer_description(model, layer)
    print(f"{spec}: {part} {layer} (block index, 0-based, of {depth}){note}", flush=True)
    return model, spec, files, layer


def check_layer(layer: int, depth: int) -> int:
    """``--layer`` as a 0-based block index in ``0..depth-1`` (negative counts from the end), or one line."""
    from ..errors import UserError

    if not -depth <= layer < depth:
        raise UserError(
            f"--layer {layer} is out of range for a {depth}-layer model; use a block index 0..{depth - 1} (0-based) "
            f"or -1 for the last"
        )
    return layer % depth


def normalization(args: argparse.Namespace, spec: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``--mean``/``--std``, else what the checkpoint was trained with (ImageNet's by default)."""
    from ..analysis import input_normalization

    mean, std = input_normalization(spec)
    return tuple(args.mean or mean), tuple(args.std or std)


def read_images(args: argparse.Namespace, files: list) -> tuple[list, list, list[dict[str, str]]]:
    """(readable files, their images, skipped files with the reason): an unreadable file among several is
    skipped with a warning naming it (the command finishes the rest, then exits non-zero); a single one is an
    error."""
    from ..analysis.images import load_image
    from ..errors import UserError

    limit = args.max_pixels or None
    good, images, skipped = [], [], []
    for path in files:
        try:
            images.append(load_image(path, limit))
            good.append(path)
        except (UserError, FileNotFoundError, PermissionError) as e:
            if len(files) == 1:
                raise
            print(f"cratevit: warning: skipping {path}: {e}", file=sys.stderr, flush=True)
            skipped.append({"image": str(path), "error": str(e)})
    return good, images, skipped


def fail_if_skipped(skipped: list[dict[str, str]], total: int, summary: Path) -> None:
    """Exit non-zero at the end when some files were skipped (after the others and the summary were written)."""
    from ..errors import UserError

    if skipped and len(skipped) == total:
        raise UserError(f"none of the {total} images could be read (first: {skipped[0]['error']})")
    if skipped:
        names = ", ".join(s["image"] for s in skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        raise UserError(
            f"{len(skipped)} of {total} images could not be read ({names}); the other {total - len(skipped)} "
            f"are done and listed in {summary}"
        )
