"""Object discovery over a set of images, as ``cratevit maskcut`` runs it: MaskCut on each image
(:func:`cratevit.analysis.maskcut.maskcut_image`), the masks as COCO results (``results.json``), overlays, and
class-agnostic COCO AP (:func:`cratevit.analysis.detection.coco_ap`) when the images have ground truth.

Files written under ``out``: ``results.json`` (a COCO results list: RLE mask, box, score ``(N - round) / N``),
``maskcut.json`` (the settings, timings, per-image mask counts and AP) and ``overlays/NNNNNN-STEM.png``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.coco import CocoImage, load_annotations
from .detection import coco_ap
from .images import load_image
from .maskcut import maskcut_image, overlay_masks, results_for_image

__all__ = ["DiscoveryConfig", "discover_objects"]


@dataclass(frozen=True)
class DiscoveryConfig:
    """MaskCut's settings for every image: input ``size`` x ``size`` pixels, the ``facet`` of block ``layer``
    (0-based; negative from the end), affinity threshold ``tau``, ``rounds`` normalised cuts, the eigen ``solver``,
    the normalisation ``mean``/``std``."""

    size: int = 480
    layer: int = -1
    facet: str = "key"
    tau: float = 0.15
    rounds: int = 3
    solver: str = "auto"
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    overlays: bool = True


def _each(items: list[CocoImage]) -> Iterable[CocoImage]:
    return items


def discover_objects(
    model: nn.Module,
    images: list[CocoImage],
    out: Path,
    cfg: DiscoveryConfig,
    annotations: Path | None = None,
    provenance: dict[str, Any] | None = None,
    progress: Callable[[list[CocoImage]], Iterable[CocoImage]] = _each,
) -> dict[str, Any]:
    """Run MaskCut on ``images`` (the model already set to ``cfg.size``), write the files above, and return the
    summary (``maskcut.json`` without its per-image list), with ``"ap"`` when ``annotations`` is given.
    ``provenance`` (the checkpoint, the data ...) heads the summary; ``progress`` wraps the image list (e.g. a
    tqdm bar)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overlays:
        (out / "overlays").mkdir(exist_ok=True)
    results: list[dict[str, Any]] = []
    seconds: list[float] = []
    per_image: list[dict[str, Any]] = []
    for im in progress(images):
        image = load_image(im.path)
        start = time.perf_counter()
        masks = maskcut_image(
            model, image, cfg.size, cfg.layer, cfg.facet, cfg.tau, cfg.rounds, cfg.mean, cfg.std, cfg.solver
        )
        seconds.append(time.perf_counter() - start)
        results += results_for_image(masks, im.id)
        per_image.append({"image_id": im.id, "file": str(im.path), "masks": len(masks), "seconds": seconds[-1]})
        if cfg.overlays:
            overlay_masks(image, [m.mask for m in masks]).save(out / "overlays" / f"{im.id:06d}-{im.path.stem}.png")
    (out / "results.json").write_text(json.dumps(results))
    settings = asdict(cfg)
    settings.pop("overlays")
    summary: dict[str, Any] = {
        **(provenance or {}),
        "annotations": str(annotations) if annotations else None,
        "images": len(images),
        "masks": len(results),
        "input_size": settings.pop("size"),
        **settings,
        "mean": tuple(cfg.mean),
        "std": tuple(cfg.std),
        "crf": False,
        "torch_threads": torch.get_num_threads(),
        "seconds_per_image": {"mean": statistics.fmean(seconds), "median": statistics.median(seconds)},
        "score": "(N - round) / N: the first cut scores highest",
    }
    if annotations is not None:
        gt = load_annotations(annotations)
        ids = {im.id for im in images}
        gt["images"] = [g for g in gt["images"] if int(g["id"]) in ids]
        gt["annotations"] = [a for a in gt["annotations"] if int(a["image_id"]) in ids]
        summary["ap"] = coco_ap(gt, results)
    (out / "maskcut.json").write_text(json.dumps({**summary, "per_image": per_image}, indent=2))
    return summary
