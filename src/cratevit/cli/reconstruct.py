"""``cratevit reconstruct CKPT IMAGE...``: masked reconstruction by a CRATE-MAE, as the MAE demo shows it.

Each image is centre-cropped to a square and resized to the model's input size; a seeded random mask hides
``--mask-ratio`` of its patches (the model's own ratio by default); the figure shows, per image, the original, the
masked input, the reconstruction, and the reconstruction with the visible patches pasted back, as PNG and PDF.
"""

from __future__ import annotations

import argparse

from ._args import (
    add_device_argument,
    add_output_argument,
    add_seed_argument,
    add_threads_argument,
    apply_threads,
    open_unit_float,
)

HELP = "masked reconstruction figure of a CRATE-MAE checkpoint on image files (PNG + PDF)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a CRATE-MAE checkpoint (ours, or the official MAE-pretrain layout)")
    p.add_argument("images", nargs="+", help="image files")
    add_output_argument(p, "folder of the figure (default: CHECKPOINT's folder/reconstruct)", type=str)
    p.add_argument("--name", default="reconstruction", help="file name of the figure, without suffix")
    add_seed_argument(p, "seed of the random masks")
    p.add_argument(
        "--mask-ratio",
        dest="mask_ratio",
        type=open_unit_float,
        default=None,
        help="fraction of patches masked, in (0, 1) (default: the model's, 0.75)",
    )
    add_device_argument(p)
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    import json
    from pathlib import Path

    import torch

    from ..analysis.images import load_image, prepare
    from ..analysis.reconstruction import reconstruct, reconstruction_figure
    from ..analysis.visualize import save_figure
    from ..checkpoint import load_model
    from ..errors import UserError
    from ..registry import is_autoencoder
    from ..train.distributed import pick_device

    model = load_model(args.checkpoint)
    if not is_autoencoder(model):
        raise UserError(
            f"{args.checkpoint} holds a {type(model).__name__}, not a CRATE-MAE; pass a checkpoint "
            f"written by cratevit pretrain or the official CRATE-MAE release"
        )
    model = model.to(pick_device(args.device)).eval()
    cfg, pcfg = model.config, model.pretrained_cfg
    mean, std = tuple(pcfg["mean"]), tuple(pcfg["std"])
    inputs = []
    for path in args.images:
        img = load_image(path)
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        square = img.crop((left, top, left + side, top + side))
        inputs.append(prepare(square, cfg.image_size, cfg.patch_size, mode="model", mean=mean, std=std).tensor)
    rec = reconstruct(model, torch.stack(inputs), mean, std, seed=args.seed, mask_ratio=args.mask_ratio)
    out = Path(args.output) if args.output else Path(args.checkpoint).parent / "reconstruct"
    names = [Path(p).stem for p in args.images]
    title = f"{Path(args.checkpoint).name}: {cfg.name or 'CRATE-MAE'}, mask seed {args.seed}"
    paths = save_figure(reconstruction_figure(rec, names, title), out / args.name)
    losses = {n: round(float(v), 5) for n, v in zip(names, rec.loss, strict=True)}
    (out / f"{args.name}.json").write_text(
        json.dumps({"checkpoint": args.checkpoint, "seed": args.seed, "masked_mse": losses}, indent=2) + "\n"
    )
    print(f"masked-patch MSE (normalised pixels): {losses}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
