"""``cratevit codes compare``: CRATE's built-in ISTA code beside sparse autoencoders on CRATE and on a matched
ViT, trained and at random weights, scored with the same metrics (L0, FVE, dead/dense, loss recovered, probe,
monosemanticity). The library function is :func:`cratevit.analysis.codes_compare.compare_codes`; see
``docs/sae.md``.
"""

from __future__ import annotations

import argparse

HELP = "compare CRATE's ISTA code with SAEs on CRATE and on a ViT layer, trained and random (a report folder)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ._args import (
        add_layer_argument,
        add_output_argument,
        add_seed_argument,
        add_threads_argument,
        int_range,
        nonneg_float,
    )

    # the action is a plain positional (not a sub-parser): the CLI parses every command intermixed
    p.add_argument("action", choices=("compare",), help="compare: " + HELP)
    p.add_argument("crate", help="CRATE checkpoint, save_pretrained folder or preset (a preset: random weights)")
    p.add_argument("vit", help="a `cratevit train --arch vit_...` checkpoint, or a timm model name (random weights)")
    add_layer_argument(p, default=3, extra="; the ViT's layer is the same (or the same relative depth)")
    p.add_argument("--data", default="shapes", help="shapes (monosemanticity needs its ground truth) or digits")
    p.add_argument(
        "--images", type=int_range(1), default=None, help="at most this many images per split (default: all)"
    )
    p.add_argument("--arch", choices=("relu", "topk"), default="topk", help="the SAEs: TopK + AuxK, or ReLU + L1")
    p.add_argument("--expansion", type=int_range(1), default=8, help="SAE features = expansion x activation width")
    p.add_argument("--k", type=int_range(1), default=16, help="TopK: features kept per token")
    p.add_argument("--l1", type=nonneg_float, default=1.0, help="ReLU: L1 coefficient lambda")
    p.add_argument("--steps", type=int_range(1), default=1000, help="optimiser steps of each SAE")
    p.add_argument("--batch-size", "-b", dest="batch_size", type=int_range(1), default=1024, help="tokens per step")
    p.add_argument("--no-probe", dest="probe", action="store_false", help="skip the linear probes")
    add_seed_argument(p, "SAE initialisation, batch order, the random-weights copies")
    add_threads_argument(p)
    add_output_argument(p, "report folder (default runs/codes-compare)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..analysis.codes_compare import CompareConfig, compare_codes, render_table
    from ._args import apply_threads
    from .sae import print_record

    apply_threads(args)
    cfg = CompareConfig(
        layer=args.layer,
        data=args.data,
        images=args.images,
        arch=args.arch,
        expansion=args.expansion,
        k=args.k,
        l1=args.l1,
        steps=args.steps,
        batch_size=args.batch_size,
        probe=args.probe,
        seed=args.seed,
    )
    out = Path(args.output or "runs/codes-compare")
    report = compare_codes(
        args.crate, args.vit, out, cfg, status=lambda msg: print(msg, flush=True), progress=print_record
    )
    print(render_table(report["rows"]))
    print(f"report folder {out}: compare.md, compare.json, compare.png, one run folder per network")
    return 0
