"""``cratevit pca CKPT IMAGE...``: PCA of a layer's patch features across images, as RGB maps (Figure 5).

``--method paper`` (default) is the emergence paper's two-stage PCA of the ``key`` facet
(:func:`cratevit.analysis.facets.paper_pca`); ``--method whole`` is cratevit's first variant: one PCA of all
patches, components 1-3 as RGB."""

from __future__ import annotations

import argparse

from .attention import add_model_and_image_arguments

HELP = "PCA of a layer's patch-token features across images: RGB maps of the first components and a foreground mask"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_and_image_arguments(p)
    p.add_argument("--components", type=int, default=3, help="principal components to compute (the first 3 are shown)")
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
        type=float,
        default=0.4,
        help="paper: foreground where the first component, min-max scaled per image, exceeds this",
    )


def run(args: argparse.Namespace) -> int:
    import json

    import numpy as np
    import torch
    from PIL import Image

    from ..analysis.facets import facet_features, paper_pca
    from ..analysis.images import prepare
    from ..analysis.segmentation import model_geometry
    from ..analysis.visualize import first_component_foreground, pca_figure, pca_maps, save_figure, upsample
    from ..errors import UserError
    from ..registry import layer_label
    from .attention import fail_if_skipped, has_random_weights, load_for_images, normalization, read_images, unique_stem

    if args.components < 1:
        raise UserError(f"--components must be at least 1, got {args.components}")
    facet = args.facet or ("key" if args.method == "paper" else "token")
    model, spec, files = load_for_images(args)
    mean, std = normalization(args, spec)
    size, patch = model_geometry(model)
    readable, images, skipped = read_images(args, files)
    if not readable:
        fail_if_skipped(skipped, len(files), args.out)
    preps, feats = [], []
    for image in images:
        prep = prepare(image, size, patch, args.resize, args.size, mean, std)
        preps.append(prep)
        feats.append(facet_features(model, prep.tensor[None], args.layer, facet, args.decoder)[0])  # rows cols dim
    if args.method == "paper":
        paper = paper_pca(feats, args.fg_threshold, args.components)
        rgbs, scores_list, fgs = paper.rgb, [p[..., None] for p in paper.first], paper.foreground
        ratios = paper.explained_variance_ratio
    else:
        result = pca_maps(feats, args.components)
        rgbs, scores_list = result.rgb, result.scores
        fgs = [first_component_foreground(s[..., 0]) for s in result.scores]
        ratios = result.explained_variance_ratio
    args.out.mkdir(parents=True, exist_ok=True)
    records, used, shown = [], set(), []
    for path, image, prep, rgb, scores, fg in zip(readable, images, preps, rgbs, scores_list, fgs, strict=True):
        rgb_up = upsample(torch.from_numpy(rgb).float().permute(2, 0, 1), prep.original_size).permute(1, 2, 0).numpy()
        fg_up = upsample(torch.from_numpy(fg).float(), prep.original_size).numpy() > 0.5
        folder = args.out / unique_stem(path, used)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / "image.png")
        Image.fromarray((rgb_up * 255).round().astype(np.uint8), mode="RGB").save(folder / "pca.png")
        Image.fromarray((fg_up * 255).astype(np.uint8), mode="L").save(folder / "foreground.png")
        np.save(folder / "pca-scores.npy", scores)
        shown.append((path.name, image, rgb_up, fg_up))
        records.append(
            {
                "image": str(path),
                "folder": str(folder),
                "preprocessing": prep.how,
                "input_size": list(prep.input_size),
                "grid": list(rgb.shape[:2]),
                "foreground_fraction": float(fg.mean()),
            }
        )
        print(f"{path}: {prep.how} -> {folder}")
    save_figure(
        pca_figure(
            shown,
            f"PCA ({args.method}) of {layer_label(model, args.layer)} {facet} features",
            has_random_weights(spec),
        ),
        args.out / "pca-grid",
    )
    info = {
        "checkpoint": spec,
        "layer": args.layer,
        "method": args.method,
        "facet": facet,
        "explained_variance_ratio": [float(v) for v in ratios],
        "rgb": "components 1-3 of the foreground PCA, min-max scaled per image over its foreground; background black"
        if args.method == "paper"
        else "components 1-3 as red, green, blue, min-max scaled jointly over all images",
        "foreground": f"first component (fitted over all images), min-max scaled per image, above {args.fg_threshold}, "
        "holes filled (sign chosen so that most border patches are background)"
        if args.method == "paper"
        else "first component above its mean over the image (sign chosen so that most border patches are background)",
        "mean": mean,
        "std": std,
        "images": records,
        "skipped": skipped,
    }
    (args.out / "pca.json").write_text(json.dumps(info, indent=2))
    fail_if_skipped(skipped, len(files), args.out / "pca.json")
    return 0
