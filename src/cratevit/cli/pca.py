"""``cratevit pca CKPT IMAGE...``: PCA of a layer's patch features across images, as RGB maps (Figure 5)."""

from __future__ import annotations

import argparse

from .attention import add_model_and_image_arguments

HELP = "PCA of a layer's patch-token features across images: RGB maps of the first components and a foreground mask"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_and_image_arguments(p)
    p.add_argument("--components", type=int, default=3, help="principal components to compute (the first 3 are shown)")


def run(args: argparse.Namespace) -> int:
    import json

    import numpy as np
    import torch
    from PIL import Image

    from ..analysis.images import prepare
    from ..analysis.segmentation import model_geometry, patch_features
    from ..analysis.visualize import first_component_foreground, pca_figure, pca_maps, save_figure, upsample
    from ..errors import UserError
    from .attention import fail_if_skipped, load_for_images, normalization, read_images, unique_stem

    if args.components < 1:
        raise UserError(f"--components must be at least 1, got {args.components}")
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
        feats.append(patch_features(model, prep.tensor[None], args.layer, args.decoder)[0])  # rows cols dim
    result = pca_maps(feats, args.components)
    args.out.mkdir(parents=True, exist_ok=True)
    records, used, shown = [], set(), []
    for path, image, prep, rgb, scores in zip(readable, images, preps, result.rgb, result.scores, strict=True):
        rgb_up = upsample(torch.from_numpy(rgb).float().permute(2, 0, 1), prep.original_size).permute(1, 2, 0).numpy()
        fg = first_component_foreground(scores[..., 0])
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
        pca_figure(shown, f"PCA of layer {args.layer % len(model.blocks)} patch features"), args.out / "pca-grid"
    )
    info = {
        "checkpoint": spec,
        "layer": args.layer,
        "features": "patch tokens of the layer's output Z^{l+1}",
        "explained_variance_ratio": [float(v) for v in result.explained_variance_ratio],
        "rgb": "components 1-3 as red, green, blue, min-max scaled jointly over all images",
        "foreground": "first component above its mean over the image (sign chosen so that most border patches are background)",
        "mean": mean,
        "std": std,
        "images": records,
        "skipped": skipped,
    }
    (args.out / "pca.json").write_text(json.dumps(info, indent=2))
    fail_if_skipped(skipped, len(files), args.out / "pca.json")
    return 0
