"""``cratevit sae train MODEL``: a sparse autoencoder on one layer's activations, scored beside its ISTA code.

``MODEL`` is a checkpoint, a ``save_pretrained`` folder or a preset name (random weights, from ``--seed``). The
patch tokens of layer ``--layer`` (0-based block index) at ``--site`` are cached under ``OUTPUT/activations``, the
SAE is trained on them (``OUTPUT/sae.pt``, ``metrics.jsonl``, ``curves.png``; ``--resume`` continues), then scored
on the held-out images (``OUTPUT/eval.json``). See ``docs/sae.md``.
"""

from __future__ import annotations

import argparse

HELP = "train a sparse autoencoder (ReLU-L1 or TopK) on a layer's activations and score it beside the ISTA code"


# The library's names (cratevit.analysis.activations.SITES, cratevit.analysis.sae.ARCHS), spelled here so that
# `cratevit --help` imports no torch (tests/analysis/test_sae.py checks they agree).
SITES = ("z_in", "z_half", "ista_in", "code")
ARCHS = ("relu", "topk")


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    from ._args import (
        add_batch_size_argument,
        add_layer_argument,
        add_output_argument,
        add_seed_argument,
        add_threads_argument,
        nonneg_float,
        nonneg_int,
        positive_float,
        positive_int,
    )

    p.add_argument("model", help="checkpoint, save_pretrained folder or cratevit preset (random weights)")
    add_layer_argument(p)
    p.add_argument("--site", choices=SITES, default="ista_in", help="which activation of the layer")
    p.add_argument("--data", default="digits", help="digits, shapes, a transfer set or a folder with train/ and val/")
    p.add_argument("--data-dir", dest="data_dir", default=None, help="folder of the torchvision sets")
    p.add_argument(
        "--images", type=positive_int, default=None, help="at most this many images per split (default: all)"
    )
    p.add_argument("--arch", choices=ARCHS, default="topk", help="relu: ReLU + L1 penalty; topk: TopK + AuxK")
    p.add_argument("--expansion", type=positive_int, default=8, help="features = expansion x activation width")
    p.add_argument("--k", type=positive_int, default=16, help="TopK: features kept per token")
    p.add_argument(
        "--l1", type=nonneg_float, default=1.0, help="ReLU: L1 coefficient lambda (inputs scaled to E|x|=sqrt(d))"
    )
    p.add_argument(
        "--dead-after", dest="dead_after", type=positive_int, default=100_000, help="tokens without firing = dead"
    )
    p.add_argument("--steps", type=positive_int, default=2000, help="optimiser steps")
    add_batch_size_argument(p, 1024, "tokens per step")
    p.add_argument("--lr", type=positive_float, default=4e-4, help="Adam learning rate (after warm-up)")
    p.add_argument("--warmup", type=nonneg_int, default=100, help="learning-rate warm-up steps")
    p.add_argument(
        "--resample-every", dest="resample_every", type=positive_int, default=None,
        help="resample dead features every N steps (default: relu 500, topk never: AuxK revives them)",
    )  # fmt: skip
    p.add_argument("--probe", action="store_true", help="also the linear-probe accuracy of both codes")
    add_seed_argument(p, "SAE initialisation, batch order, random preset weights")
    add_threads_argument(p)
    add_output_argument(p, "run folder (default runs/sae-MODEL-layerL-SITE-ARCH)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its sae.pt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    # the action is a plain positional (not a sub-parser): the CLI parses every command intermixed
    p.add_argument("action", choices=("train",), help="train: " + HELP)
    _add_train_arguments(p)


def print_record(record: dict) -> None:
    print(
        f"step {record['step']}/{record['steps']}: loss {record['loss']:.4f} FVE {record['fve']:.3f} "
        f"L0 {record['l0']:.1f} dead {100 * record['dead_fraction']:.1f}% lr {record['lr']:.2e} "
        f"{record['tokens_s']:.0f} tokens/s",
        flush=True,
    )


def _print_table(ev: dict) -> None:
    rows = [("SAE", ev["sae"])] + ([("ISTA code", ev["ista"])] if "ista" in ev else [])
    print(f"held-out {ev['split']} images: {ev['images']} ({ev['sae']['tokens']} patch tokens)")
    if "loss_clean" in ev:
        print(f"  classifier loss: clean {ev['loss_clean']:.4f}, site zeroed {ev['loss_zero']:.4f}")
    print(f"  {'code':<10} {'features':>8} {'L0':>7} {'FVE':>7} {'dead':>7} {'dense':>7}  extra")
    for name, m in rows:
        extra = []
        if m.get("loss_recovered") is not None:
            extra.append(f"loss recovered {m['loss_recovered']:.3f}")
        if "probe_top1" in m:
            extra.append(f"probe top-1 {m['probe_top1']:.1f}%")
        if "monosemanticity" in m:
            extra.append(f"monosemanticity {m['monosemanticity']['score']:.3f}")
        print(
            f"  {name:<10} {m['features']:>8} {m['l0']:>7.2f} {m['fve']:>7.3f} {100 * m['dead_fraction']:>6.1f}% "
            f"{100 * m['dense_fraction']:>6.1f}%  {', '.join(extra)}"
        )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..analysis.sae_run import train_layer_sae
    from ..analysis.sae_train import SAETrainConfig
    from ._args import apply_threads

    apply_threads(args)
    resample = args.resample_every if args.resample_every is not None else (500 if args.arch == "relu" else 0)
    name = Path(args.model).stem if Path(args.model).exists() else args.model
    out = Path(args.output or f"runs/sae-{name}-layer{args.layer}-{args.site}-{args.arch}")
    train_cfg = SAETrainConfig(
        steps=args.steps,
        lr=args.lr,
        warmup_steps=args.warmup,
        resample_every=resample,
        seed=args.seed,
        log_every=max(1, min(100, args.steps // 20)),
        checkpoint_every=max(1, min(500, args.steps)),
    )
    sae_cfg = {
        "arch": args.arch,
        "expansion": args.expansion,
        "k": args.k,
        "l1_coeff": args.l1,
        "dead_after": args.dead_after,
    }
    result = train_layer_sae(
        args.model,
        args.layer,
        out,
        sae_cfg,
        train_cfg,
        data=args.data,
        site=args.site,
        images=args.images,
        batch_size=args.batch_size,
        resume=args.resume,
        probe=args.probe,
        data_dir=args.data_dir,
        progress=print_record,
        status=lambda msg: print(msg, flush=True),
    )
    _print_table(result.evaluation)
    print(f"run folder {result.out}: sae.pt, metrics.jsonl, curves.png, eval.json")
    return 0
