"""``cratevit finetune``: transfer a (pretrained) model to CIFAR-10/100, Flowers-102 or Oxford-IIIT Pet.

The same engine and options as ``cratevit train``, with the transfer defaults (``--data cifar10``). The original
command works unchanged::

    cratevit finetune --bs 256 --net CRATE_tiny --opt adamW --lr 5e-5 --n_epochs 200 --randomaug 1 \\
        --data cifar10 --ckpt_dir CKPT --data_dir DATA_DIR
"""

from __future__ import annotations

import argparse

from .train import add_config_arguments, run_command

HELP = "fine-tune a pretrained model (--ckpt_dir) on cifar10, cifar100, flower or pets (same options as train)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    return run_command(args, "finetune")
