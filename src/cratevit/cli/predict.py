"""``cratevit predict CKPT IMAGE...``: the top classes of each image, with their names and probabilities.

Images are prepared from the model's own preprocessing metadata (``pretrained_cfg``: Resize(256) +
CenterCrop(224), bilinear, ImageNet mean/std for the 224-px presets; the training data's normalisation for a
``cratevit train`` run). Class names come from the checkpoint (``cratevit train`` stores them, as
``pretrained_cfg["label_names"]``), else, for 1000-class models, from timm's ImageNet-1k table
(``timm.data.ImageNetInfo``); otherwise classes are shown by index.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._args import add_arch_heads_arguments, add_threads_argument, apply_threads, positive_int, say_random_weights

HELP = "classify images with a checkpoint: the top-5 classes of each, with names and probabilities"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint file, save_pretrained folder, or a preset name (random weights)")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    p.add_argument("--top-k", "-k", dest="top_k", type=positive_int, default=5, help="classes shown per image")
    add_arch_heads_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")
    add_threads_argument(p)


def class_names(model: Any) -> tuple[list[str] | None, str]:
    """(names by class index, where they come from); (None, reason) when there are none."""
    n = int(getattr(model, "num_classes", 0) or 0)
    stored = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if stored is not None and len(stored) == n:
        return [str(x) for x in stored], "the checkpoint"
    if n == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo("imagenet-1k")
        return [info.index_to_description(i) for i in range(n)], "ImageNet-1k (timm.data.ImageNetInfo)"
    return None, f"the checkpoint stores no class names for its {n} classes"


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    import json

    import torch

    from ..analysis.images import eval_transform, load_image
    from ..checkpoint import load_model
    from ..errors import UserError

    model = load_model(args.checkpoint, arch=args.arch, heads=args.heads).eval()
    if not getattr(model, "num_classes", 0):
        raise UserError(f"{args.checkpoint} has no classifier (num_classes 0); predict needs a classification head")
    names, source = class_names(model)
    transform, how = eval_transform(model)
    k = min(args.top_k, model.num_classes)
    if not args.json:
        say_random_weights(args.checkpoint)
        names_from = f"class names from {source}" if names else f"classes shown by index ({source})"
        print(f"{args.checkpoint}: {model.num_classes} classes, {names_from}")
        print(f"preprocessing: {how}")
    for path in args.images:
        x = transform(load_image(path).convert("RGB"))[None]
        with torch.inference_mode():
            probs = model(x).float().softmax(-1)[0]
        top = probs.topk(k)
        rows = [
            {"class": int(i), "name": names[int(i)] if names else None, "probability": float(p)}
            for p, i in zip(top.values, top.indices, strict=True)
        ]
        if args.json:
            print(json.dumps({"image": str(path), "top": rows}))
            continue
        print(f"{path}:")
        for rank, row in enumerate(rows, 1):
            label = f"{row['name']} (class {row['class']})" if row["name"] is not None else f"class {row['class']}"
            print(f"  {rank}. {100 * row['probability']:6.2f}%  {label}")
    return 0
