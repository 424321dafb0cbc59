"""``cratevit attention CKPT IMAGE...``: per-head [CLS] attention maps, DINO-style masks, overlays (Figure 4)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "per-head [CLS] attention maps of images: heat maps, top-mass masks, overlays and a head grid (Figure 4)"


def add_model_and_image_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared with ``cratevit pca``: ``[CKPT] IMAGE...``, ``--checkpoint``, sizes, layer, output."""
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="[CKPT] IMAGE",
        help="a checkpoint file (or a preset name: random weights) followed by image files or folders; "
        "without the checkpoint when --checkpoint is given",
    )
    p.add_argument("--checkpoint", default=None, metavar="FILE", help="the checkpoint (instead of the first input)")
    p.add_argument("--arch", default=None, help="preset of a checkpoint that does not record its architecture")
    p.add_argument(
        "--heads", type=int, default=None, help="head count, where the file's shapes cannot tell it (6x128 vs 12x64)"
    )
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    p.add_argument("--layer", type=int, default=-1, help="layer index (0-based; negative counts from the end)")
    p.add_argument("--decoder", action="store_true", help="a CRATE-MAE's decoder layer (default: its encoder)")
    p.add_argument(
        "--resize",
        choices=("keep-aspect", "model"),
        default="keep-aspect",
        help="keep-aspect: scale the shorter side to --size and interpolate the positional embedding; "
        "model: resize to the model's training size",
    )
    p.add_argument("--size", type=int, default=None, help="shorter side for keep-aspect (default: the model's size)")
    add_max_pixels_argument(p)
    p.add_argument(
        "--mean",
        type=float,
        nargs=3,
        default=None,
        help="normalisation mean (default: the training data's, else ImageNet's)",
    )
    p.add_argument(
        "--std",
        type=float,
        nargs=3,
        default=None,
        help="normalisation std (default: the training data's, else ImageNet's)",
    )


MAX_PIXELS = 89_478_485  # PIL's decompression-bomb limit, Image.MAX_IMAGE_PIXELS (not imported: --help stays fast)


def add_max_pixels_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-pixels",
        dest="max_pixels",
        type=int,
        default=MAX_PIXELS,
        help="refuse images with more pixels than this before decoding them (default: PIL's "
        "decompression-bomb limit); 0: no limit",
    )


def read_images(args: argparse.Namespace, files: list) -> tuple[list, list, list[dict[str, str]]]:
    """(readable files, their images, skipped files with the reason): an unreadable file among several is
    skipped with a warning naming it (the command finishes the rest, then exits non-zero); a single one is an
    error."""
    import sys

    from ..analysis.images import load_image
    from ..errors import UserError

    if args.max_pixels < 0:
        raise UserError(f"--max-pixels must be 0 (no limit) or a positive pixel count, got {args.max_pixels}")
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_and_image_arguments(p)
    p.add_argument("--threshold", type=float, default=0.6, help="fraction of each head's attention mass the mask keeps")


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


def load_for_images(args: argparse.Namespace) -> tuple[Any, str, list[Path]]:
    """The model and the image files; checks ``--layer``. CRATE interpolates its positional embedding for other
    sizes; a timm ViT (a ``cratevit train --arch vit_...`` checkpoint) gets its training size (``--resize model``)."""
    from ..analysis.segmentation import load_vision_model
    from ..errors import UserError
    from ..registry import is_autoencoder, is_family_model, layer_count

    spec, files = split_inputs(args)
    model = load_vision_model(spec, arch=args.arch, heads=args.heads).eval()
    if is_autoencoder(model):  # a fixed sine-cosine table: the training size
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
    depth = len(model.decoder_blocks) if args.decoder else layer_count(model)
    if not -depth <= args.layer < depth:
        raise UserError(f"--layer {args.layer} is out of range for a {depth}-layer model; use 0..{depth - 1} or -1")
    return model, spec, files


def has_random_weights(spec: str) -> bool:
    """A preset or timm model name (not a file, folder or hf-hub address) is built with random weights."""
    return not (Path(spec).exists() or spec.startswith("hf-hub:"))


def normalization(args: argparse.Namespace, spec: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``--mean``/``--std``, else what the checkpoint was trained with (ImageNet's by default)."""
    from ..analysis import input_normalization

    mean, std = input_normalization(spec)
    return tuple(args.mean or mean), tuple(args.std or std)


def unique_stem(path: Path, used: set[str]) -> str:
    stem, k = path.stem, 1
    while stem in used:
        k += 1
        stem = f"{path.stem}-{k}"
    used.add(stem)
    return stem


def run(args: argparse.Namespace) -> int:
    import json

    import numpy as np
    from PIL import Image

    from ..analysis.images import prepare
    from ..analysis.segmentation import attention_maps, model_geometry
    from ..analysis.visualize import head_grid_figure, mass_mask, overlay, save_figure, to_uint8, upsample
    from ..registry import layer_count, layer_label

    model, spec, files = load_for_images(args)
    depth = len(model.decoder_blocks) if args.decoder else layer_count(model)
    mean, std = normalization(args, spec)
    size, patch = model_geometry(model)
    args.out.mkdir(parents=True, exist_ok=True)
    records, used = [], set()
    readable, images, skipped = read_images(args, files)
    for path, image in zip(readable, images, strict=True):
        prep = prepare(image, size, patch, args.resize, args.size, mean, std)
        maps = attention_maps(model, prep.tensor[None], args.layer, args.decoder)[0]  # heads rows cols
        masks = mass_mask(maps, args.threshold)
        heat = upsample(maps, prep.original_size).numpy()  # heads H W
        mask_up = upsample(masks.float(), prep.original_size).numpy() > 0.5
        folder = args.out / unique_stem(path, used)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / "image.png")
        np.save(folder / "attention.npy", maps.numpy())
        for k in range(heat.shape[0]):
            Image.fromarray(to_uint8(heat[k]), mode="L").save(folder / f"attn-head{k}.png")
            Image.fromarray((mask_up[k] * 255).astype(np.uint8), mode="L").save(folder / f"mask-head{k}.png")
            overlay(image, heat[k]).save(folder / f"overlay-head{k}.png")
        where = f"decoder layer {args.layer % depth}" if args.decoder else layer_label(model, args.layer)
        title = f"{path.name}: {where}, top {args.threshold:.0%} of attention mass"
        figure = head_grid_figure(image, heat, mask_up, title, has_random_weights(spec), args.threshold)
        save_figure(figure, folder / "heads")
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
        "layer": args.layer,
        "decoder": args.decoder,
        "threshold": args.threshold,
        "mean": mean,
        "std": std,
        "maps": "class-token attention to each patch, upsampled (nearest) to the image size",
        "images": records,
        "skipped": skipped,
    }
    (args.out / "attention.json").write_text(json.dumps(info, indent=2))
    fail_if_skipped(skipped, len(files), args.out / "attention.json")
    return 0
