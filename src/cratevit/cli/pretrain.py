"""``cratevit pretrain``: masked-autoencoder pre-training of a CRATE-MAE; with no arguments, on the built-in digits.

The same engine, options, run directory, resume, torchrun and mixed precision as ``cratevit train``; the objective
is the masked-patch reconstruction loss instead of the labels' cross-entropy. The recipe is MAE's
(:data:`cratevit.train.config.MAE_RECIPE`: AdamW, betas 0.9/0.95, lr = base lr x batch / 256, weight decay 0.05,
cosine decay after a warmup), shortened for the built-in data.
"""

from __future__ import annotations

import argparse

from ._args import open_unit_float, positive_float, unit_float
from .train import add_config_arguments, run_command

HELP = "MAE-pretrain a CRATE-MAE (default: mae_crate_digits on the built-in digits, a few minutes on 2 CPU cores)"

S = argparse.SUPPRESS


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    m = p.add_argument_group("masked autoencoding")
    m.add_argument(
        "--blr", type=positive_float, default=S, help="base learning rate: lr = blr x batch / 256 (unless --lr)"
    )
    m.add_argument("--betas", type=unit_float, nargs=2, default=S, metavar=("B1", "B2"), help="AdamW betas (0.9 0.95)")
    m.add_argument(
        "--mask-ratio",
        "--mask_ratio",
        dest="mask_ratio",
        type=open_unit_float,
        default=S,
        help="fraction of patches masked, in (0, 1) (the preset's, 0.75)",
    )
    m.add_argument(
        "--norm-pix-loss",
        "--norm_pix_loss",
        dest="norm_pix_loss",
        action="store_true",
        default=S,
        help="predict per-patch normalised pixels (MAE's option)",
    )


def run(args: argparse.Namespace) -> int:
    model_kwargs = dict(getattr(args, "model_kwargs", None) or {})
    for name in ("mask_ratio", "norm_pix_loss"):
        if hasattr(args, name):
            model_kwargs[name] = getattr(args, name)
            delattr(args, name)
    if model_kwargs:
        args.model_kwargs = model_kwargs
    if hasattr(args, "betas"):
        args.betas = list(args.betas)
    return run_command(args, "pretrain")
