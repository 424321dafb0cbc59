"""Three ways to score coarse segmentation from [CLS] attention, so that a figure can be set beside a paper's.

All take per-head [CLS] attention maps at the token grid, ``(heads, rows, cols)``, and the image's ground truth.

* ``paper`` (the CRATE emergence paper, App. B): everything at the token grid. The ground-truth label map is
  brought to the grid by majority: a token takes the label covering most of its pixels (a token mostly of the
  ignore label 255 is ignored). A head's mask keeps its top 60% *entries* (``kind="mass"``: the entries holding
  60% of its mass, as DINO). For each foreground class present at the grid the best head is taken
  (``max_k IoU``); the image scores the mean over its classes; the data set the mean over images.
* ``dino`` (DINO's Jaccard, as its authors describe it in facebookresearch/dino#54): each head's mask keeps 60%
  of its attention mass and is brought to pixel resolution (nearest). For each ground-truth object ``o`` of an
  image (each label of its label map but 0 and 255: a class of a VOC ``SegmentationClass`` map) the best head is
  taken, ``max_k J(M_k, G_o)``; the image scores the mean over its objects, the data set the mean over images::

      J_img = 1/|O| sum_{o in O} max_k |M_k & G_o| / |M_k | G_o|      (pixels labelled 255 left out)

  Also reported, under their own names: the head-averaged map against the merged foreground
  (``jaccard_head_mean_map``) and the best head per image against the merged foreground (every class one
  foreground, ``jaccard_best_head_foreground``: what cratevit reported as DINO's figure before).
* ``cratevit`` (what ``cratevit segeval`` measured first, kept for continuity): pixel-level foreground IoU of
  the head-averaged map (60% of the mass), of each head with one head fixed over the data set, and of the PCA
  mask (see :func:`cratevit.segmentation.evaluate`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..presets import IMAGENET_MEAN, IMAGENET_STD
from .visualize import mass_mask, upsample

__all__ = [
    "PROTOCOLS",
    "ProtocolResult",
    "dino_object_scores",
    "dino_scores",
    "evaluate_protocols",
    "keep_top",
    "labels_to_grid",
    "paper_scores",
]

PROTOCOLS = ("paper", "dino", "cratevit")
"""The scoring protocols: ``paper``, ``dino`` and ``cratevit`` (see the module text)."""
IGNORE = 255
ThresholdKind = Literal["entries", "mass"]


def keep_top(maps: Tensor, keep: float = 0.6, kind: ThresholdKind = "entries") -> Tensor:
    """Boolean masks per map (last two dims): the top ``keep`` fraction of the entries (``"entries"``: the
    ``round(keep * n)`` largest, at least one), or the largest entries holding ``keep`` of the mass (``"mass"``)."""
    if not 0.0 < keep <= 1.0:
        raise UserError(f"the threshold must be in (0, 1], got {keep}")
    if kind == "mass":
        return mass_mask(maps, keep)
    if kind != "entries":
        raise UserError(f"unknown threshold kind {kind!r}; use 'entries' or 'mass'")
    flat = maps.flatten(-2).float()
    k = max(1, round(keep * flat.shape[-1]))
    idx = flat.topk(k, dim=-1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter(-1, idx, True).reshape(maps.shape)


def labels_to_grid(labels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A label map (H, W) at the token grid (rows, cols): each token takes the label that covers most of its
    pixels (ties to the smaller label); a token mostly of the ignore label 255 becomes 255."""
    labels = np.asarray(labels)
    values = np.unique(labels)
    onehot = torch.from_numpy(labels[None] == values[:, None, None]).float()  # (u, H, W)
    frac = F.adaptive_avg_pool2d(onehot[None], grid)[0]  # (u, rows, cols): share of each label in each token
    return values[frac.argmax(0).numpy()]


def _iou(pred: np.ndarray, target: np.ndarray, valid: np.ndarray) -> float:
    p, t = pred[valid], target[valid]
    union = np.logical_or(p, t).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, t).sum() / union)


def paper_scores(
    maps: Tensor, labels: np.ndarray, keep: float = 0.6, kind: ThresholdKind = "entries"
) -> tuple[list[int], np.ndarray]:
    """The paper protocol on one image: the foreground classes present at the token grid and their IoU with
    each head's mask, ``(classes, heads)``. The image scores ``ious.max(1).mean()``."""
    grid = tuple(maps.shape[-2:])
    gt = labels_to_grid(labels, grid)
    valid = gt != IGNORE
    masks = keep_top(maps, keep, kind).numpy()
    classes = [int(c) for c in np.unique(gt) if c not in (0, IGNORE)]
    ious = np.array([[_iou(m, gt == c, valid) for m in masks] for c in classes]).reshape(len(classes), len(masks))
    return classes, ious


def dino_scores(
    maps: Tensor, foreground: np.ndarray, ignore: np.ndarray | None = None, keep: float = 0.6
) -> tuple[float, np.ndarray]:
    """DINO's Jaccard on one image: (J of the head-averaged map, J of each head), masks keeping ``keep`` of the
    attention mass at pixel resolution (nearest upsampling to the ground truth's size)."""
    shape = tuple(foreground.shape)
    valid = np.ones(shape, bool) if ignore is None else ~np.asarray(ignore, bool)
    fg = np.asarray(foreground, bool)
    mean_mask = upsample(mass_mask(maps.mean(0), keep).float(), shape).numpy() > 0.5
    head_masks = upsample(mass_mask(maps, keep).float(), shape).numpy() > 0.5
    return _iou(mean_mask, fg, valid), np.array([_iou(m, fg, valid) for m in head_masks])


def dino_object_scores(maps: Tensor, labels: np.ndarray, keep: float = 0.6) -> tuple[list[int], np.ndarray]:
    """DINO's per-object Jaccard on one image: the objects (labels of ``labels`` (H, W) other than 0 and 255)
    and each head's Jaccard with each, ``(objects, heads)``; the image scores ``J.max(1).mean()``.

    Head masks keep ``keep`` of the attention mass, upsampled (nearest) to the label map's size; pixels labelled
    255 count in neither mask."""
    labels = np.asarray(labels)
    valid = labels != IGNORE
    masks = upsample(mass_mask(maps, keep).float(), tuple(labels.shape)).numpy() > 0.5
    objects = [int(o) for o in np.unique(labels) if o not in (0, IGNORE)]
    jac = np.array([[_iou(m, labels == o, valid) for m in masks] for o in objects])
    return objects, jac.reshape(len(objects), len(masks))


@dataclass
class ProtocolResult:
    """Per-image scores of the protocols; :meth:`summary` gives the data-set figures."""

    names: list[str] = field(default_factory=list)
    # per image (NaN where no foreground class is left at the token grid): mean over classes of max_k / mean_k IoU
    paper_best: list[float] = field(default_factory=list)
    paper_head_mean: list[float] = field(default_factory=list)
    dino_mean: list[float] = field(default_factory=list)  # head-averaged map vs the merged foreground
    dino_best: list[float] = field(default_factory=list)  # DINO's: mean over objects of the best head (NaN: none)
    dino_best_foreground: list[float] = field(default_factory=list)  # best head vs the merged foreground
    dino_heads: list[list[float]] = field(default_factory=list)  # each head vs the merged foreground
    cratevit: Any = None  # a cratevit.segmentation.SegEvalResult
    settings: dict[str, Any] = field(default_factory=dict)

    def per_image(self) -> list[dict[str, Any]]:
        rows = []
        for i, name in enumerate(self.names):
            row: dict[str, Any] = {"image": name}
            if self.cratevit is not None:
                row.update(
                    {
                        "iou_attention": self.cratevit.attention[i],
                        "iou_pca": self.cratevit.pca[i],
                        "iou_heads": " ".join(f"{v:.4f}" for v in self.cratevit.per_head[i]),
                    }
                )
            if self.paper_best:
                row.update({"paper_iou_best_head": self.paper_best[i], "paper_iou_head_mean": self.paper_head_mean[i]})
            if self.dino_mean:
                row.update(
                    {
                        "dino_j_mean_map": self.dino_mean[i],
                        "dino_j_best_head": self.dino_best[i],
                        "dino_j_best_head_foreground": self.dino_best_foreground[i],
                    }
                )
            rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        def mean(v: list[float]) -> float:
            v = [x for x in v if not np.isnan(x)]
            return float(np.mean(v)) if v else float("nan")

        out: dict[str, Any] = {"num_images": len(self.names), **self.settings}
        if "paper" in self.settings.get("protocols", PROTOCOLS):
            scored = int(np.sum(~np.isnan(self.paper_best)))
            out["paper"] = {
                "miou": mean(self.paper_best),
                "miou_head_mean": mean(self.paper_head_mean),
                "images_scored": scored,
                "images_without_class": len(self.paper_best) - scored,
            }
        if "dino" in self.settings.get("protocols", PROTOCOLS):
            heads = np.asarray(self.dino_heads, dtype=np.float64).reshape(len(self.dino_mean), -1).mean(0)
            scored = int(np.sum(~np.isnan(self.dino_best)))
            out["dino"] = {
                "jaccard_best_head": mean(self.dino_best),  # DINO's: best head per object, mean over objects
                "images_scored": scored,
                "images_without_object": len(self.dino_best) - scored,
                "jaccard_head_mean_map": mean(self.dino_mean),
                "jaccard_best_head_foreground": mean(self.dino_best_foreground),
                "jaccard_per_head": [float(v) for v in heads],
            }
        if self.cratevit is not None:
            s = self.cratevit.summary()
            out["cratevit"] = {
                k: s[k] for k in ("miou_attention", "miou_best_head", "best_head", "miou_pca", "miou_per_head")
            }
        return out


@torch.no_grad()
def evaluate_protocols(
    model: nn.Module,
    samples: Iterable[Any],
    input_size: tuple[int, int],
    patch_size: tuple[int, int],
    layer: int = -1,
    threshold: float = 0.6,
    threshold_kind: ThresholdKind = "entries",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    protocols: Sequence[str] = PROTOCOLS,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> ProtocolResult:
    """Score ``samples`` (:class:`cratevit.segmentation.SegSample`, with ``labels`` for the paper protocol)
    under each of ``protocols``; one forward pass per batch serves all of them.

    ``threshold_kind`` applies to the paper protocol; DINO's and cratevit's keep a fraction of the mass.
    """
    from .images import prepare
    from .segmentation import SegEvalResult, _batches, cratevit_scores, maps_and_features

    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown or not protocols:
        raise UserError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
    model.eval()
    result = ProtocolResult(
        settings={
            "layer": layer,
            "threshold": threshold,
            "threshold_kind": threshold_kind,
            "input_size": list(input_size),
            "protocols": list(protocols),
        }
    )
    if "cratevit" in protocols:
        result.cratevit = SegEvalResult(settings=dict(result.settings))
    for batch in _batches(samples, batch_size):
        x = torch.stack(
            [prepare(s.image, input_size, patch_size, mode="model", mean=mean, std=std).tensor for s in batch]
        )
        maps, feats = maps_and_features(model, x, layer)
        for sample, head_maps, feat in zip(batch, maps, feats, strict=True):
            result.names.append(sample.name)
            labels = sample.labels if sample.labels is not None else _labels_from_mask(sample)
            if "paper" in protocols:
                classes, ious = paper_scores(head_maps, labels, threshold, threshold_kind)
                result.paper_best.append(float(ious.max(1).mean()) if classes else float("nan"))
                result.paper_head_mean.append(float(ious.mean(1).mean()) if classes else float("nan"))
            if "dino" in protocols:
                j_mean, j_heads = dino_scores(head_maps, sample.foreground, sample.ignore, threshold)
                objects, j_objects = dino_object_scores(head_maps, labels, threshold)
                result.dino_mean.append(j_mean)
                result.dino_best.append(float(j_objects.max(1).mean()) if objects else float("nan"))
                result.dino_best_foreground.append(float(j_heads.max()))
                result.dino_heads.append([float(v) for v in j_heads])
            if result.cratevit is not None:
                cratevit_scores(result.cratevit, sample, head_maps, feat, threshold)
        if progress is not None:
            progress(len(result.names))
    if not result.names:
        raise UserError("no images to evaluate")
    return result


def _labels_from_mask(sample: Any) -> np.ndarray:
    labels = np.asarray(sample.foreground, dtype=np.uint8)
    if sample.ignore is not None:
        labels[np.asarray(sample.ignore, bool)] = IGNORE
    return labels
