"""``cratevit train``: train a CRATE (or timm) model; with no arguments, on the built-in digits data.

The original ``main.py`` flags work unchanged (``--arch CRATE_tiny --batch-size 512 --optimizer Lion ...``), and
so do the original ``finetune.py`` spellings (``--bs``, ``--net``, ``--opt``, ``--n_epochs``, ``--ckpt_dir``,
``--data_dir``, ``--randomaug``): every spelling sets the same :class:`cratevit.train.TrainConfig` field. The
options carry no defaults: those live in :mod:`cratevit.train.config`.
"""

from __future__ import annotations

import argparse
from typing import Any

from ._args import nonneg_int

HELP = "train a model (default: a small CRATE on the built-in digits data, ~30 s on 2 quiet CPU cores)"

S = argparse.SUPPRESS  # options not given keep the configuration's value (recipe, --config or --resume)


def _save_minutes() -> str:
    from ..train.config import SAVE_EVERY_MINUTES

    return f"{SAVE_EVERY_MINUTES:g}"


def _default(name: str) -> str:
    """``default X``: the TrainConfig default (cratevit.train.config), for help texts."""
    from ..train.config import default_of

    return f"default {default_of(name)}"


def _none_or_str(value: str) -> str | None:
    """``--ckpt_dir None`` means no checkpoint (the original README's convention)."""
    return None if value.strip().lower() in ("none", "") else value


def _json_dict(value: str) -> dict[str, Any]:
    import json

    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"depth\": 6}}', got {value!r} ({e})"
        ) from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 6}}', got {value!r}")
    return obj


def _bool01(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0 or 1, got {value!r}")


def add_config_arguments(p: argparse.ArgumentParser, command: str = "train") -> None:
    """The options of both commands; each sets the TrainConfig field named by ``dest``."""
    from ..train.config import COMMAND_BASES

    data_default = COMMAND_BASES[command].get("data", "digits")
    m = p.add_argument_group("model")
    m.add_argument(
        "--arch",
        "-a",
        "--net",
        dest="arch",
        default=S,
        help="cratevit preset (crate_tiny, CRATE_small, crate_digits, ...) or a timm model name "
        "(vit_tiny_patch16_224, ...); default: the data's recipe",
    )
    m.add_argument(
        "--pretrained",
        "--ckpt_dir",
        "--ckpt-dir",
        dest="pretrained",
        type=_none_or_str,
        default=S,
        help="checkpoint to start from (cratevit or reference CRATE); the head is replaced; None: random init",
    )
    m.add_argument("--image-size", "--image_size", "--imsize", dest="image_size", type=int, default=S)
    m.add_argument("--patch-size", "--patch_size", "--patch", dest="patch_size", type=int, default=S)
    m.add_argument(
        "--model-kwargs",
        dest="model_kwargs",
        type=_json_dict,
        default=S,
        help="more model options as JSON, e.g. '{\"depth\": 6}' (CRATE config fields) or "
        '\'{"embed_dim": 96, "depth": 6, "num_heads": 3}\' (timm)',
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        default=S,
        help=f"digits, shapes, cifar10, cifar100, flower, pets, or a folder with train/ and val/ (default "
        f"{data_default})",
    )
    d.add_argument(
        "--data-dir",
        "--data_dir",
        dest="data_dir",
        default=S,
        help="folder of the torchvision datasets (cifar10, cifar100, flower, pets)",
    )
    d.add_argument("--dummy", action="store_true", default=S, help="synthetic data, to benchmark the loop")
    d.add_argument(
        "--num-classes",
        "--classes",
        dest="num_classes",
        type=int,
        default=S,
        help="class count: of --dummy data; for other data (the original finetune.py's --classes, the new head's "
        "size) it must match the data's",
    )
    d.add_argument("--randomaug", "--randaug", dest="randaug", type=_bool01, default=S, help="RandAugment: 1 or 0")
    d.add_argument(
        "--rand_aug_n", "--randaug-n", dest="randaug_n", type=int, default=S, help="RandAugment operations (default 2)"
    )
    d.add_argument(
        "--rand_aug_m", "--randaug-m", dest="randaug_m", type=int, default=S, help="RandAugment magnitude (default 14)"
    )
    d.add_argument(
        "--erase_prob",
        "--erase-prob",
        dest="erase_prob",
        type=float,
        default=S,
        help="RandomErasing probability after normalisation (default 0)",
    )
    d.add_argument("--no-download", dest="download", action="store_false", default=S, help="never download datasets")
    d.add_argument("--workers", "-j", dest="workers", type=int, default=S, help="data loading processes")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", "--n_epochs", dest="epochs", type=int, default=S)
    o.add_argument(
        "--batch-size",
        "-b",
        "--bs",
        dest="batch_size",
        type=int,
        default=S,
        help="global batch size (divided among torchrun processes)",
    )
    o.add_argument("--optimizer", "--opt", dest="optimizer", default=S, help="timm optimizer: lion, adamw, sgd, ...")
    o.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=S)
    o.add_argument("--weight-decay", "--wd", dest="weight_decay", type=float, default=S, help=_default("weight_decay"))
    o.add_argument("--momentum", type=float, default=S, help=f"for SGD-type optimizers, {_default('momentum')}")
    o.add_argument(
        "--warmup-epochs",
        "--warmup",
        dest="warmup_epochs",
        type=float,
        default=S,
        help="linear warmup epochs before the cosine decay",
    )
    o.add_argument(
        "--min-lr", dest="min_lr", type=float, default=S, help=f"end of the cosine decay, {_default('min_lr')}"
    )
    o.add_argument(
        "--clip-grad",
        dest="clip_grad",
        type=float,
        default=S,
        help=f"max gradient norm, {_default('clip_grad')}; 0: off",
    )
    o.add_argument("--label-smoothing", dest="label_smoothing", type=float, default=S, help=_default("label_smoothing"))
    o.add_argument("--mixup", type=float, default=S, help=f"mixup alpha (timm Mixup), {_default('mixup')} (0: off)")
    o.add_argument("--cutmix", type=float, default=S, help=f"cutmix alpha (timm Mixup), {_default('cutmix')} (0: off)")
    o.add_argument(
        "--amp",
        nargs="?",
        const="bf16",
        choices=("none", "bf16", "fp16"),
        default=S,
        help=f"mixed precision: bf16 (CPU or GPU) or fp16 (GPU, with loss scaling); {_default('amp')}",
    )
    o.add_argument("--compile", action="store_true", default=S, help="torch.compile the model")
    o.add_argument(
        "--grad-checkpointing",
        dest="grad_checkpointing",
        action="store_true",
        default=S,
        help="recompute activations in the backward pass to save memory",
    )
    r = p.add_argument_group("run")
    r.add_argument(
        "--output", "-o", "--out", dest="output", default=S, help="run directory (default runs/DATA-ARCH-TIME)"
    )
    r.add_argument("--seed", type=nonneg_int, default=S, help="seed of the weights, data order and augmentation")
    r.add_argument("--print-freq", "-p", dest="print_freq", type=int, default=S, help="log every N steps")
    r.add_argument(
        "--steps-per-epoch",
        dest="steps_per_epoch",
        type=int,
        default=S,
        help="stop each epoch after N steps (quick runs)",
    )
    r.add_argument(
        "--save-every",
        dest="save_every",
        type=int,
        default=S,
        help=f"also write last.pt every N steps (default: every {_save_minutes()} minutes; 0: at epoch ends only)",
    )
    r.add_argument("--tensorboard", action="store_true", default=S, help="also write TensorBoard scalars")
    r.add_argument(
        "--device",
        default=S,
        help="where to train: auto (default: this process's GPU if there is one, else cpu), cpu, cuda, cuda:1",
    )
    r.add_argument("--threads", type=int, default=S, help="CPU threads per process (default: torch's; 1 on digits)")
    r.add_argument("--resume", default=None, metavar="PATH", help="continue a run: its directory or last.pt")
    r.add_argument("--evaluate", "-e", action="store_true", help="only evaluate (--resume or --pretrained weights)")
    r.add_argument("--config", default=None, metavar="FILE", help="start from a run's config.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def run_command(args: argparse.Namespace, command: str) -> int:
    """Run ``command`` (train or finetune): its base configuration (:data:`cratevit.train.config.COMMAND_BASES`),
    else the ``--resume`` run's or the ``--config`` file's, with the options given on top."""
    from dataclasses import fields, replace

    from ..errors import UserError
    from ..train import Resume, base_config, load_run_config, train

    names = {f.name for f in fields(base_config(command))}
    given = {k: v for k, v in vars(args).items() if k in names}
    resume = Resume.read(args.resume) if args.resume else None
    if resume is not None:  # the run's own configuration; options given now override it (e.g. more --epochs)
        if args.config:
            raise UserError(
                f"--config {args.config} and --resume {args.resume} both give the run's configuration; a resumed run "
                f"continues its checkpoint's: drop --config and give changed options beside --resume"
            )
        base = resume.config
        if "output" not in given:  # continue in the run's own directory, from whatever working directory
            given["output"] = str(resume.run_dir)
    elif args.config:
        base = load_run_config(args.config)
    else:
        base = base_config(command)
    cfg = replace(base, **given)
    if args.evaluate and not (resume or cfg.pretrained):
        raise UserError("--evaluate needs weights: pass --resume RUN_DIR or --pretrained CHECKPOINT")
    return train(cfg, resume=resume, evaluate_only=args.evaluate)


def run(args: argparse.Namespace) -> int:
    return run_command(args, "train")
