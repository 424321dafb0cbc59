"""``cratevit analyze CKPT``: layer-wise compression R^c and sparsity over images (Figure 3 of the CRATE paper)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._args import (
    add_arch_heads_arguments,
    add_batch_size_argument,
    add_max_pixels_argument,
    add_output_argument,
    add_seed_argument,
    add_threads_argument,
    apply_threads,
    positive_float,
    positive_int,
    say_random_weights,
)

HELP = "per-layer coding rate R^c and sparsity of a CRATE over images (CSV, JSON, plots: Figure 3)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "models",
        nargs="+",
        metavar="CKPT",
        help="checkpoint files or preset names (random weights); all are drawn on the same axes",
    )
    add_output_argument(
        p, "output folder (default: analysis/ next to the first checkpoint file, else ./analysis)", default=None
    )
    p.add_argument(
        "--with-random",
        action="store_true",
        help="also measure the first model's architecture at random initialisation (seed --seed)",
    )
    p.add_argument(
        "--data",
        default="digits",
        help="'digits' (the built-in held-out digits), 'shapes', or a folder of images (searched "
        "recursively, e.g. an ImageFolder)",
    )
    p.add_argument("--images", nargs="+", type=Path, default=None, help="image files to use instead of --data")
    p.add_argument(
        "--resize",
        choices=("crop", "direct"),
        default="crop",
        help="image files (a folder, --images): 'crop' = the model's evaluation preprocessing from its metadata "
        "(Resize(size / crop_pct) + CenterCrop, its interpolation: Resize(256) + CenterCrop(224), bilinear, for the "
        "224-px presets, as the reference evaluation); 'direct' = resize straight to the model's size",
    )
    add_max_pixels_argument(p)
    p.add_argument(
        "--num-images", type=positive_int, default=256, help="at most this many images (a seeded random subset)"
    )
    add_batch_size_argument(p, 64)
    add_seed_argument(p, "seed of the image subset and of --with-random")
    add_arch_heads_arguments(p)
    p.add_argument("--eps", type=positive_float, default=0.01, help="eps of the coding rate (above 0)")
    p.add_argument(
        "--plot-rc",
        choices=("rc_in", "rc_half"),
        default="rc_in",
        help="which R^c to plot: of Z^l (the MSSA input) or of Z^{l+1/2} (after MSSA); both go to the CSV",
    )
    add_threads_argument(p)


def _label(spec: str, used: set[str]) -> str:
    path = Path(spec)
    label = f"{path.parent.name}/{path.name}" if path.is_file() and path.parent.name else path.name
    base, k = label, 1
    while label in used:
        k += 1
        label = f"{base} ({k})"
    used.add(label)
    return label


def _subset(n: int, limit: int, seed: int) -> list[int]:
    import numpy as np

    if n <= limit:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=limit, replace=False).tolist())


def load_images(args: argparse.Namespace, model: Any, spec: str) -> tuple[Any, str]:
    """(N, 3, H, W) inputs for ``model`` and a description of them."""
    import torch

    from ..analysis import input_normalization
    from ..analysis.images import eval_transform, find_images, load_image, prepare
    from ..errors import UserError

    size, patch = model.config.image_size, model.config.patch_size
    if args.images is None and args.data == "digits":
        from ..data import transforms as T
        from ..data.digits import DigitsDataset
        from ..presets import data_preprocessing

        if size[0] != size[1]:
            raise UserError(f"the digits data is square; the model expects {size[0]}x{size[1]} images")
        prep = data_preprocessing("digits")
        data = DigitsDataset("val", size[0], T.digits_eval(prep.mean, prep.std))
        idx = _subset(len(data), args.num_images, args.seed)
        return torch.stack([data[i][0] for i in idx]), f"{len(idx)} held-out digits images at {size[0]} px"
    if args.images is None and args.data == "shapes":
        from ..data.shapes import ShapesDataset

        data = ShapesDataset("val", args.num_images, size[0], args.seed)
        pils = [data.sample(i)[0] for i in range(len(data))]
        what = f"{len(pils)} shapes validation images at {size[0]} px"
    else:
        files = list(args.images) if args.images is not None else find_images(args.data)
        files = [files[i] for i in _subset(len(files), args.num_images, args.seed)]
        pils = [load_image(f, args.max_pixels or None) for f in files]
        mean, std = input_normalization(spec)
        if args.resize == "crop":
            transform, how = eval_transform(model, mean, std)
            return torch.stack([transform(im.convert("RGB")) for im in pils]), f"{len(files)} image files, {how}"
        what = f"{len(files)} image files resized to {size[1]}x{size[0]}"
    mean, std = input_normalization(spec)
    return torch.stack([prepare(im, size, patch, mode="model", mean=mean, std=std).tensor for im in pils]), what


def default_output(first: str) -> Path:
    """``analysis/`` next to the first checkpoint file (``RUN/last.pt`` -> ``RUN/analysis``), else ``./analysis``."""
    path = Path(first)
    return path.parent / "analysis" if path.is_file() else Path("analysis")


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    import torch

    from ..analysis import layerwise_stats, load_model
    from ..analysis.layerwise import MAE_DECODER_DEFINITIONS
    from ..analysis.layerwise_report import write_layerwise_report
    from ..analysis.segmentation import random_copy
    from ..registry import is_autoencoder

    torch.manual_seed(args.seed)
    models = [(spec, load_model(spec, arch=args.arch, heads=args.heads)) for spec in args.models]
    for spec in args.models:
        say_random_weights(spec, args.seed)
    if args.with_random:
        models.append(("random init", random_copy(models[0][1], args.seed)))
    args.output = args.output or default_output(args.models[0])
    args.output.mkdir(parents=True, exist_ok=True)
    results, used = {}, set()
    for spec, model in models:
        label = "random init" if spec == "random init" else _label(spec, used)
        images, what = load_images(args, model, args.models[0] if spec == "random init" else spec)
        # a CRATE-MAE: its encoder and its decoder as two series (unmasked images)
        parts = ("encoder", "decoder") if is_autoencoder(model) else ("encoder",)
        for part in parts:
            name = f"{label} {part}" if len(parts) > 1 else label
            stats = layerwise_stats(model, images, batch_size=args.batch_size, eps=args.eps, part=part)
            stats.meta = {"model": spec, "part": part, "images": what, "architecture": model.config.to_dict()}
            if part == "decoder":
                stats.meta["definitions"] = dict(MAE_DECODER_DEFINITIONS)
            results[name] = stats
            last = stats.rows()[-1]
            code = (
                f", non-zeros of the code A_2 {last['code_sparsity_mean']:.3f}" if "code_sparsity_mean" in last else ""
            )
            tssa = [r for r in stats.rows() if "pi_entropy_mean" in r]
            if tssa:  # ToST: the last TSSA block's statistics
                code += (
                    f"; TSSA layer {tssa[-1]['layer']} (0-based): membership entropy "
                    f"{tssa[-1]['pi_entropy_mean']:.3f}, mean s_k {tssa[-1]['second_moment_mean']:.3g}"
                )
            print(
                f"{name}: {what}; last layer R^c {last['rc_in_mean']:.2f} +- {last['rc_in_std']:.2f}, "
                f"non-zeros {last['sparsity_mean']:.3f}{code}"
            )
    written = write_layerwise_report(results, args.output, args.plot_rc)
    print(f"wrote {args.output}/{', '.join(written)}")
    return 0
