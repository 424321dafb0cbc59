"""``cratevit probe MODEL``: how good are a model's frozen features? Linear probe and k-NN top-1.

``MODEL`` is anything cratevit loads (a checkpoint of any family, a ``save_pretrained`` folder, a preset name:
random weights from ``--seed``) or a timm model name (random weights; ``--timm-pretrained`` downloads timm's).
The features are the model's own final ones (CRATE-MAE: the unmasked encoder; CRATE/timm:
``forward_head(..., pre_logits=True)``) or, with ``--layer``, the mean patch token of one layer. Both splits are
embedded with evaluation preprocessing and the model's normalisation; the features are cached under the output
folder, keyed by the weights, layer, pooling and data. Under torchrun the images are shared out and the features
gathered; rank 0 fits the probes.
"""

from __future__ import annotations

import argparse

from ._args import (
    add_batch_size_argument,
    add_device_argument,
    add_layer_argument,
    add_output_argument,
    add_seed_argument,
    add_threads_argument,
    add_workers_argument,
    apply_threads,
    positive_float,
    positive_int,
    say_random_weights,
)

HELP = "linear-probe and k-NN accuracy of a model's frozen features (built-in data or an image folder)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint, save_pretrained folder, cratevit preset or timm model name")
    p.add_argument(
        "--data",
        default="digits",
        help="digits, shapes, cifar10, cifar100, flower, pets, or a folder with train/ and val/",
    )
    p.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None, help="folder of the torchvision sets")
    add_layer_argument(p, default=None, extra="; default: the model's final features")
    p.add_argument(
        "--pool",
        choices=("cls", "mean"),
        default="mean",
        help="CRATE-MAE final features: class token or mean patch token",
    )
    p.add_argument("--k", type=positive_int, default=20, help="neighbours of the k-NN vote (DINO: 20)")
    p.add_argument(
        "--temperature",
        type=positive_float,
        default=0.07,
        help="k-NN vote weight exp(cos / T), T above 0 (DINO: 0.07)",
    )
    p.add_argument(
        "--l2",
        type=positive_float,
        nargs="+",
        default=None,
        metavar="L2",
        help="L2 strengths (above 0) the linear probe chooses from (default 1e-6 ... 1e-1, six values)",
    )
    add_batch_size_argument(p, 128)
    add_workers_argument(p)
    add_seed_argument(p, "weights of a preset or timm name (random init)")
    p.add_argument("--timm-pretrained", action="store_true", help="download timm's pretrained weights")
    add_output_argument(
        p,
        "folder for probe.jsonl and the feature cache (default: next to the checkpoint, else runs/probe-MODEL)",
        type=str,
    )
    p.add_argument("--no-cache", dest="cache", action="store_false", help="always recompute the features")
    add_device_argument(p)
    add_threads_argument(p)


def load_probe_model(spec: str, seed: int = 0, timm_pretrained: bool = False):
    """A cratevit model (file, folder, preset: random weights from ``seed``) or a timm model name, in eval mode."""
    from pathlib import Path

    import timm
    import torch

    from ..checkpoint import load_model
    from ..errors import UserError
    from ..presets import resolve_name

    torch.manual_seed(seed)
    try:
        resolve_name(spec)
        is_preset = True
    except UserError:
        is_preset = False
    if Path(spec).exists() or is_preset or not timm.is_model(spec):
        model = load_model(spec).eval()  # its errors name what is wrong
    else:
        model = timm.create_model(spec, pretrained=timm_pretrained, num_classes=0).eval()
    return model


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    import json
    import sys
    import time

    from ..analysis.probe import L2_GRID, embed_splits, probe_datasets, score_probes
    from ..train.distributed import cleanup, init_distributed

    dist = init_distributed(args.device)
    try:
        model = load_probe_model(args.model, args.seed, args.timm_pretrained).to(dist.device)
        if dist.is_main and not args.timm_pretrained:
            say_random_weights(args.model, args.seed)
        pcfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        size = int(pcfg.get("input_size", (3, 224, 224))[-1])
        mean, std = pcfg.get("mean", (0.485, 0.456, 0.406)), pcfg.get("std", (0.229, 0.224, 0.225))
        train_ds, val_ds, data_key = probe_datasets(args.data, size, mean, std, args.data_dir, args.seed)
        out = _output_folder(args)
        log = (lambda line: print(line, file=sys.stderr, flush=True)) if dist.is_main else None
        t0 = time.perf_counter()
        feats = embed_splits(
            model, {"train": train_ds, "val": val_ds}, data_key, args.layer, args.pool, args.batch_size,
            dist.device, args.workers, out / "features" if args.cache else None, log,
        )  # fmt: skip
        t_features = time.perf_counter() - t0
        if not dist.is_main:
            return 0
        (xf, xy, hit_train), (vf, vy, hit_val) = feats["train"], feats["val"]
        scores, lin = score_probes(xf, xy, vf, vy, args.k, args.temperature, args.l2 or L2_GRID)
        record = {
            "model": args.model,
            "data": args.data,
            "layer": args.layer,
            "pool": args.pool,
            "features": list(xf.shape),
            "val_images": len(vy),
            "cached": hit_train and hit_val,
            **scores,
            "seconds": {"features": t_features, **scores["seconds"]},
        }
        out.mkdir(parents=True, exist_ok=True)
        with (out / "probe.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        _print_record(args, record, lin, out)
        return 0
    finally:
        cleanup(dist)


def _output_folder(args: argparse.Namespace):
    """``-o``, else ``probe/`` next to a checkpoint file, else ``runs/probe-MODEL``."""
    from pathlib import Path

    source = Path(args.model)
    if args.output:
        return Path(args.output)
    return source.parent / "probe" if source.is_file() else Path("runs") / f"probe-{source.name.replace('/', '_')}"


def _print_record(args: argparse.Namespace, record: dict, lin, out) -> None:
    where = "final features" if args.layer is None else f"layer {args.layer} (block index, 0-based; mean patch token)"
    (n_train, dim), seconds = record["features"], record["seconds"]
    print(f"{args.model} on {args.data} ({where}, {dim}-d, {n_train} train / {record['val_images']} val images):")
    print(f"  k-NN (k={args.k}, T={args.temperature}, cosine, weighted votes): top-1 {record['knn']['top1']:.2f}%")
    print(f"  linear probe: top-1 {lin.top1:.2f}%  ({lin.recipe})")
    print(
        f"  features {seconds['features']:.1f} s{' (cached)' if record['cached'] else ''}, k-NN {seconds['knn']:.1f} s, "
        f"linear {seconds['linear']:.1f} s; results appended to {out / 'probe.jsonl'}"
    )
