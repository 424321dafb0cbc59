"""``cratevit ablation -o DIR``: the emergence paper's architecture ablation (CRATE, CRATE-MLP, CRATE-MHSA, ViT;
optionally the attention-only stacks) trained on the built-in shapes and scored, trained and at random
initialisation, with the paper's coarse-segmentation protocol and MaskCut + COCO AP (:mod:`cratevit.analysis.ablation`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._args import add_layer_argument, add_output_argument, add_seed_argument, add_threads_argument, positive_int

HELP = (
    "the emergence paper's ablation (attention MSSA|MHSA x second half ISTA|MLP|none) trained on the built-in "
    "shapes, scored with the paper's coarse segmentation and MaskCut COCO AP, trained and at random init"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_output_argument(
        p, "output folder (ablation.md, ablation.json, ablation.png, a run directory per variant)", True
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="VARIANT",
        help="variants to run: crate, crate_mlp, crate_mhsa, crate_vit (the paper's four, the default), "
        "crate_mssa_only, crate_mhsa_only (attention only)",
    )
    p.add_argument(
        "--base",
        default="crate_nano",
        metavar="PRESET",
        help="CRATE preset every variant is built from (its sizes; the variant sets attention and feedforward)",
    )
    p.add_argument("--epochs", type=positive_int, default=3, help="training epochs of every variant (the same budget)")
    p.add_argument("--steps-per-epoch", type=positive_int, default=None, help="cap on the training steps per epoch")
    add_seed_argument(p, "seed of the training runs and of the random-weights copies")
    p.add_argument(
        "--num-images", type=positive_int, default=300, help="shapes and multishapes images of the segmentation"
    )
    p.add_argument("--num-scenes", type=positive_int, default=100, help="multishapes scenes of MaskCut")
    add_layer_argument(p)
    add_threads_argument(p, help="torch CPU threads of the training runs")


def _train_step(args: argparse.Namespace) -> Any:
    """Train one variant with ``cratevit train``'s shapes recipe, overriding only the budget and the seed."""
    import json

    from ..analysis.ablation import TrainedVariant
    from ..train import TrainConfig, train

    def step(name: str, model_kwargs: dict[str, str], out: Path) -> TrainedVariant:
        cfg = TrainConfig(
            arch=args.base,
            model_kwargs=model_kwargs,
            data="shapes",
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            warmup_epochs=min(2.0, args.epochs / 5),  # the recipe's 2 epochs, shortened for short runs
            workers=0,
            threads=args.threads,
            seed=args.seed,
            output=str(out),
            print_freq=50,
        )
        train(cfg)
        top1 = None
        for line in (out / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "val":
                top1 = record.get("best_top1", top1)
        return TrainedVariant(out / "best.pt", top1)

    return step


def run(args: argparse.Namespace) -> int:
    from ..analysis.ablation import PAPER_VARIANTS, AblationConfig, ablation_table, run_ablation

    cfg = AblationConfig(
        out=args.output,
        variants=tuple(args.variants or PAPER_VARIANTS),
        base=args.base,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        seed=args.seed,
        seg_images=args.num_images,
        scenes=args.num_scenes,
        layer=args.layer,
    )
    result = run_ablation(cfg, _train_step(args))
    print(ablation_table(result))
    print(f"{result.seconds / 60:.1f} min; table and figures in {args.output / 'ablation.md'} and ablation.json")
    return 0
