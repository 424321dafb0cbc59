"""``cratevit attention CKPT IMAGE...``: per-head [CLS] attention maps, DINO-style masks, overlays (Figure 4)."""

from __future__ import annotations

import argparse

from ._args import MAX_PIXELS, add_threads_argument, apply_threads, has_random_weights, probability
from ._images import (
    add_model_and_image_arguments,
    fail_if_skipped,
    load_for_images,
    normalization,
    read_images,
)

__all__ = ["HELP", "MAX_PIXELS", "add_arguments", "has_random_weights", "run"]

HELP = "per-head [CLS] attention maps of images: heat maps, top-mass masks, overlays and a head grid (Figure 4)"
"""The command's one-line description in ``cratevit --help``."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Declare ``cratevit attention``'s options on its sub-parser."""
    add_model_and_image_arguments(p)
    p.add_argument(
        "--threshold", type=probability, default=0.6, help="fraction of each head's attention mass the mask keeps"
    )
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    """Run ``cratevit attention`` on parsed arguments; the exit status."""
    apply_threads(args)
    import json

    from ..analysis.head_maps import write_head_maps

    model, spec, files, layer = load_for_images(args)
    mean, std = normalization(args, spec)
    args.output.mkdir(parents=True, exist_ok=True)
    readable, images, skipped = read_images(args, files)
    records = write_head_maps(
        model,
        readable,
        images,
        args.output,
        layer,
        args.threshold,
        args.resize,
        args.size,
        mean,
        std,
        args.decoder,
        has_random_weights(spec),
        log=lambda line: print(line, flush=True),
    )
    info = {
        "checkpoint": spec,
        "layer": layer,
        "layer_numbering": "block index, 0-based (blocks.0 .. blocks.L-1)",
        "decoder": args.decoder,
        "threshold": args.threshold,
        "mean": mean,
        "std": std,
        "maps": "class-token attention to each patch, upsampled (nearest) to the image size",
        "images": records,
        "skipped": skipped,
    }
    (args.output / "attention.json").write_text(json.dumps(info, indent=2))
    fail_if_skipped(skipped, len(files), args.output / "attention.json")
    return 0
