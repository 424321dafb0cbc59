"""``cratevit info PRESET``: configuration, parameter count and forward GFLOPs per image."""

from __future__ import annotations

import argparse

from ._args import add_arch_heads_arguments, nonneg_int, positive_int

HELP = "print a preset's configuration, parameter count and forward GFLOPs per image"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", help="preset name (crate_tiny, CRATE_small, ...) or a checkpoint file")
    p.add_argument("--num-classes", type=nonneg_int, default=None, help="classes of the head (0: no head)")
    p.add_argument("--image-size", type=positive_int, default=None, help="input size in pixels")
    p.add_argument("--patch-size", type=positive_int, default=None, help="patch size in pixels")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_arch_heads_arguments(p)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..checkpoint import create_model, load_checkpoint
    from ..models import forward_flops
    from ..registry import family_for

    if Path(args.preset).is_file():
        model = load_checkpoint(args.preset, arch=args.arch, heads=args.heads)
    else:
        model = create_model(
            args.preset, num_classes=args.num_classes, image_size=args.image_size, patch_size=args.patch_size
        )
    cfg = model.config
    family_flops = family_for(cfg).forward_flops  # a family's own count (ToST); None: the white-box backbone's
    flops = (
        {"gflops_per_image": family_flops(cfg) / 1e9}
        if family_flops is not None
        else {
            "gflops_per_image": forward_flops(cfg) / 1e9,
            "gflops_per_image_reference": forward_flops(cfg, ista_matmuls=3) / 1e9,
        }
    )
    info = {
        "name": cfg.name or args.preset,
        "family": family_for(cfg).name,
        **cfg.to_dict(),
        "num_patches": cfg.num_patches,
        "params": model.num_params(),
        **flops,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        if key == "params":
            value = f"{value:,}"
        elif isinstance(value, float):
            value = f"{value:.3f}" if value == 0 or abs(value) >= 1e-3 else f"{value:g}"  # norm_eps 1e-06
        print(f"{key:<{width}}  {value}")
    return 0
