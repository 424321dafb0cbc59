"""``cratevit pca CKPT IMAGE...``: PCA of a layer's patch features across images, as RGB maps (Figure 5).

``--method paper`` (default) is the emergence paper's two-stage PCA of the ``key`` facet
(:func:`cratevit.analysis.facets.paper_pca`); ``--method whole`` is cratevit's first variant: one PCA of all
patches, components 1-3 as RGB."""

from __future__ import annotations

import argparse

from ._args import add_threads_argument, apply_threads, has_random_weights, positive_int, probability
from ._images import (
    add_model_and_image_arguments,
    fail_if_skipped,
    load_for_images,
    normalization,
    read_images,
)

HELP = "PCA of a layer's patch-token features across images: RGB maps of the first components and a foreground mask"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_and_image_arguments(p)
    p.add_argument(
        "--components", type=positive_int, default=3, help="principal components to compute (the first 3 are shown)"
    )
    p.add_argument(
        "--method",
        choices=("paper", "whole"),
        default="paper",
        help="paper: background removed by thresholding the first component (fitted jointly), then a PCA of the "
        "foreground patches as RGB; whole: one PCA of all patches as RGB",
    )
    p.add_argument(
        "--facet",
        choices=("key", "attn", "token", "code"),
        default=None,
        help="features: key = U_k^T LN(Z^l) of all heads, attn = Z^{l+1/2}, token = the layer output, "
        "code = the sparse code (CRATE: = token; CRATE-alpha: its overcomplete code); default key (paper), token (whole)",
    )
    p.add_argument(
        "--fg-threshold",
        type=probability,
        default=0.4,
        help="paper: foreground where the first component, min-max scaled per image, exceeds this",
    )
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    import json

    from ..analysis.pca_maps import write_pca_maps

    facet = args.facet or ("key" if args.method == "paper" else "token")
    model, spec, files, layer = load_for_images(args)
    mean, std = normalization(args, spec)
    readable, images, skipped = read_images(args, files)
    if not readable:
        fail_if_skipped(skipped, len(files), args.output)
    result = write_pca_maps(
        model,
        readable,
        images,
        args.output,
        layer,
        facet,
        args.method,
        args.components,
        args.fg_threshold,
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
        "method": args.method,
        "facet": facet,
        "explained_variance_ratio": result.explained_variance_ratio,
        "rgb": result.rgb,
        "foreground": result.foreground,
        "mean": mean,
        "std": std,
        "images": result.records,
        "skipped": skipped,
    }
    (args.output / "pca.json").write_text(json.dumps(info, indent=2))
    fail_if_skipped(skipped, len(files), args.output / "pca.json")
    return 0
