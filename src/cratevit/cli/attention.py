"""``cratevit attention CKPT IMAGE...``: per-head [CLS] attention maps, DINO-style masks, overlays (Figure 4)."""

from __future__ import annotations

import argparse

from ._args import MAX_PIXELS, probability
from ._images import (
    add_model_and_image_arguments,
    fail_if_skipped,
    load_for_images,
    normalization,
    read_images,
    unique_stem,
)

__all__ = ["HELP", "MAX_PIXELS", "add_arguments", "run"]

HELP = "per-head [CLS] attention maps of images: heat maps, top-mass masks, overlays and a head grid (Figure 4)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_and_image_arguments(p)
    p.add_argument(
        "--threshold", type=probability, default=0.6, help="fraction of each head's attention mass the mask keeps"
    )


def run(args: argparse.Namespace) -> int:
    import json

    import numpy as np
    from PIL import Image

    from ..analysis.images import prepare
    from ..analysis.segmentation import attention_maps, model_geometry
    from ..analysis.visualize import head_grid_figure, mass_mask, overlay, save_figure, to_uint8, upsample

    model, spec, files, layer = load_for_images(args)
    mean, std = normalization(args, spec)
    size, patch = model_geometry(model)
    args.output.mkdir(parents=True, exist_ok=True)
    records, used = [], set()
    readable, images, skipped = read_images(args, files)
    for path, image in zip(readable, images, strict=True):
        prep = prepare(image, size, patch, args.resize, args.size, mean, std)
        maps = attention_maps(model, prep.tensor[None], args.layer, args.decoder)[0]  # heads rows cols
        masks = mass_mask(maps, args.threshold)
        heat = upsample(maps, prep.original_size).numpy()  # heads H W
        mask_up = upsample(masks.float(), prep.original_size).numpy() > 0.5
        folder = args.output / unique_stem(path, used)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / "image.png")
        np.save(folder / "attention.npy", maps.numpy())
        for k in range(heat.shape[0]):
            Image.fromarray(to_uint8(heat[k]), mode="L").save(folder / f"attn-head{k}.png")
            Image.fromarray((mask_up[k] * 255).astype(np.uint8), mode="L").save(folder / f"mask-head{k}.png")
            overlay(image, heat[k]).save(folder / f"overlay-head{k}.png")
        part = "decoder layer" if args.decoder else "layer"
        title = f"{path.name}: {part} {layer} (0-based), top {args.threshold:.0%} of attention mass"
        save_figure(head_grid_figure(image, heat, mask_up, title), folder / "heads")
        records.append(
            {
                "image": str(path),
                "folder": str(folder),
                "preprocessing": prep.how,
                "input_size": list(prep.input_size),
                "grid": list(maps.shape[1:]),
                "heads": int(maps.shape[0]),
            }
        )
        print(f"{path}: {maps.shape[0]} heads, {prep.how} -> {folder}")
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
