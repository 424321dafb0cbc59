"""The emergence paper's architecture ablation (Yu et al. 2023, arXiv 2308.16271, Table 2) on the built-in data.

One backbone, the attention and the second half of each block chosen (:data:`cratevit.presets.ABLATIONS`):

=============  =========  ===========
variant        attention  second half
=============  =========  ===========
CRATE          MSSA       ISTA
CRATE-MLP      MSSA       MLP
CRATE-MHSA     MHSA       ISTA
ViT            MHSA       MLP
MSSA only      MSSA       none
MHSA only      MHSA       none
=============  =========  ===========

Each variant is trained on the built-in ``shapes`` data with the same recipe, budget and seed, and scored, trained
and at random initialisation (same seed), under the paper's two measurements:

* coarse segmentation, the paper's protocol (:func:`cratevit.analysis.segprotocols.evaluate_protocols` with
  ``protocol="paper"``: the [CLS] attention of each head on the token grid, the top 60% of its entries kept, the
  best head per class, mIoU over classes) on ``shapes`` (one object) and on ``multishapes`` (2-4 objects of
  6 classes), the stand-in for "VOC Seg.";
* MaskCut object discovery (:func:`cratevit.analysis.maskcut.maskcut_image`, key features of the last layer,
  tau 0.15, 3 cuts) on ``multishapes`` scenes, scored with class-agnostic COCO AP / AP50 / AP75 of boxes and masks
  (:func:`cratevit.analysis.detection.coco_ap`), the stand-in for "COCO Detection".

Training lives in :mod:`cratevit.train`, a room of the same layer as this one, so :func:`run_ablation` takes the
training step as a function (``cratevit ablation`` passes :func:`cratevit.train.train` wrapped).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..presets import ABLATIONS

__all__ = [
    "PAPER_ROWS",
    "PAPER_SOURCE",
    "PAPER_VARIANTS",
    "TABLE_COLUMNS",
    "VARIANTS",
    "AblationConfig",
    "AblationResult",
    "TrainedVariant",
    "ablation_table",
    "paper_table",
    "plot_ablation",
    "random_weights",
    "run_ablation",
    "score_model",
    "write_report",
]

# name -> (attention, second half); "crate" is the plain CRATE block, the others the presets' ablation stems.
VARIANTS: dict[str, tuple[str, str]] = {"crate": ("mssa", "ista"), **ABLATIONS}
"""Variant name -> (attention, second half): ``crate`` and the stems of :data:`cratevit.presets.ABLATIONS`."""
PAPER_VARIANTS: tuple[str, ...] = ("crate", "crate_mlp", "crate_mhsa", "crate_vit")
"""The variants of the paper's Table 2 (CRATE, CRATE-MLP, CRATE-MHSA, ViT): what ``cratevit ablation`` runs."""

# Table 2 of arXiv 2308.16271 as printed: (model, attention, nonlinearity, COCO detection AP50, AP75, AP,
# VOC Seg. mIoU). All four are Small-Patch8 (S-8) models pre-trained on ImageNet-21k with the same setup.
PAPER_ROWS: tuple[tuple[str, str, str, float, float, float, float], ...] = (
    ("CRATE", "MSSA", "ISTA", 2.1, 0.7, 0.8, 23.9),
    ("CRATE-MLP", "MSSA", "MLP", 0.2, 0.2, 0.2, 22.0),
    ("CRATE-MHSA", "MHSA", "ISTA", 0.1, 0.1, 0.0, 18.4),
    ("ViT", "MHSA", "MLP", 0.1, 0.1, 0.0, 14.1),
)
"""Table 2 of arXiv 2308.16271 as printed: (model, attention, nonlinearity, COCO detection AP50, AP75, AP, VOC
Seg. mIoU), all in %."""
PAPER_SOURCE = (
    'Yu et al., "Emergence of Segmentation with Minimalistic White-Box Transformers", arXiv 2308.16271, '
    'Table 2 ("Ablation study of different CRATE variants. We use the Small-Patch8 (S-8) model configuration '
    'across all experiments in this table.")'
)
"""Where :data:`PAPER_ROWS` come from, with the table's caption."""


@dataclass(frozen=True)
class AblationConfig:
    """What ``cratevit ablation`` runs: every variant at the same budget and seed."""

    out: Path
    variants: tuple[str, ...] = PAPER_VARIANTS
    base: str = "crate_nano"  # the shapes recipe's preset; each variant is it with attention/feedforward chosen
    epochs: int = 3
    steps_per_epoch: int | None = None  # cap on the training steps per epoch (quick runs)
    seed: int = 0  # of the training run and of the random-weights copy
    seg_images: int = 300  # shapes and multishapes images of the coarse segmentation
    scenes: int = 100  # multishapes scenes of MaskCut
    layer: int = -1  # layer (block index, 0-based; -1 the last) of the attention and the MaskCut features
    threshold: float = 0.6  # the paper protocol's fraction of entries kept
    tau: float = 0.15  # MaskCut affinity threshold
    rounds: int = 3  # MaskCut cuts per image
    multishapes_size: int = 48  # the scenes' own size (objects as large, in tokens, as in training)

    def check(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise UserError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
        if len(set(self.variants)) != len(self.variants):
            raise UserError(f"a variant is named twice in {list(self.variants)}")
        for name in ("epochs", "seg_images", "scenes", "rounds"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise UserError(f"--steps-per-epoch must be a positive integer, got {self.steps_per_epoch}")
        if not 0 < self.threshold < 1 or not 0 <= self.tau < 1:
            raise UserError(f"need 0 < --threshold < 1 and 0 <= --tau < 1, got {self.threshold} and {self.tau}")


@dataclass(frozen=True)
class TrainedVariant:
    """What the training step returns: the checkpoint and its best validation top-1 (%)."""

    checkpoint: Path
    val_top1: float | None = None


# (variant name, model kwargs {"attn_kind", "feedforward"}, run directory) -> the trained checkpoint
TrainStep = Callable[[str, dict[str, str], Path], TrainedVariant]


@dataclass
class AblationResult:
    """One ``cratevit ablation`` run: its configuration, one row of figures per (variant, weights), wall time."""

    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        keys = ("model", "attention", "nonlinearity", "AP50", "AP75", "AP", "mIoU")
        paper = [dict(zip(keys, row, strict=True)) for row in PAPER_ROWS]
        return {
            "config": self.config,
            "rows": self.rows,
            "seconds": self.seconds,
            "paper": {"source": PAPER_SOURCE, "rows": paper},
        }


def score_model(
    model: nn.Module,
    mean: Sequence[float],
    std: Sequence[float],
    cfg: AblationConfig,
    coco: tuple[list[Any], dict[str, Any]],
) -> dict[str, Any]:
    """The paper-protocol mIoU (%) on shapes and multishapes and MaskCut's COCO AP (%) on the scenes ``coco``
    (``(CocoImage list, ground truth)``) of one model. The model is left at the multishapes input size."""
    from .detection import coco_ap
    from .images import load_image
    from .maskcut import maskcut_image, results_for_image, set_input_size
    from .segmentation import model_geometry, multishapes_samples, shapes_samples
    from .segprotocols import evaluate_protocols

    model.eval()
    size, patch = model_geometry(model)
    depth = len(model.blocks)
    if not -depth <= cfg.layer < depth:
        raise UserError(f"--layer {cfg.layer} is out of range for a {depth}-layer model; use 0..{depth - 1} or -1")

    def paper_miou(samples: Any, input_size: tuple[int, int]) -> float:
        result = evaluate_protocols(
            model, samples, input_size, patch, cfg.layer, cfg.threshold, "entries", mean, std, ("paper",)
        )
        return 100 * result.summary()["paper"]["miou"]

    scores: dict[str, Any] = {"shapes_miou": paper_miou(shapes_samples("val", cfg.seg_images, size[0]), size)}
    ms = (cfg.multishapes_size, cfg.multishapes_size)
    set_input_size(model, ms)
    scores["multishapes_miou"] = paper_miou(multishapes_samples("val", cfg.seg_images, ms[0]), ms)
    images, gt = coco
    results: list[dict[str, Any]] = []
    for im in images:
        masks = maskcut_image(
            model, load_image(im.path), ms[0], cfg.layer, "key", cfg.tau, cfg.rounds, mean, std, "auto"
        )
        results += results_for_image(masks, im.id)
    ap = coco_ap(json.loads(json.dumps(gt)), results)  # coco_ap edits its ground truth: give it a copy
    for kind, key in (("bbox", "box"), ("segm", "mask")):
        scores[key] = {m: 100 * ap[kind][m] for m in ("AP50", "AP75", "AP")}
    scores["maskcut_masks"] = len(results)
    return scores


def random_weights(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture, freshly initialised with ``seed``."""
    from ..registry import family_for

    torch.manual_seed(seed)
    return family_for(model).build(model.config)


def run_ablation(cfg: AblationConfig, train_step: TrainStep, log: Callable[[str], None] = print) -> AblationResult:
    """Train every variant of ``cfg.variants`` with ``train_step`` (same budget and seed), score it trained and
    at random initialisation, and write ``ablation.json`` and ``ablation.md`` under ``cfg.out``."""
    from ..checkpoint import load_model
    from ..data.coco import load_annotations, mask_api, read_coco_folder
    from ..data.multishapes import MultiShapesDataset, export_coco
    from ..presets import get_config
    from .layerwise import input_normalization

    cfg.check()
    depth = get_config(cfg.base).depth
    if not -depth <= cfg.layer < depth:
        raise UserError(
            f"--layer {cfg.layer} is out of range for {cfg.base} ({depth} layers); use 0..{depth - 1} or -1"
        )
    mask_api()  # a one-line error naming the extra when pycocotools is missing, before any training
    start = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    export_coco(MultiShapesDataset("val", cfg.scenes, cfg.multishapes_size), cfg.out / "multishapes")
    images, ann_path = read_coco_folder(cfg.out / "multishapes")
    coco = (images, load_annotations(ann_path))
    result = AblationResult(config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()})
    for i, name in enumerate(cfg.variants, start=1):
        attention, feedforward = VARIANTS[name]
        log(f"[{i}/{len(cfg.variants)}] {name}: {attention.upper()} + {feedforward.upper()}, training")
        t0 = time.perf_counter()
        trained = train_step(name, {"attn_kind": attention, "feedforward": feedforward}, cfg.out / name)
        train_s = time.perf_counter() - t0
        model = load_model(str(trained.checkpoint))
        mean, std = input_normalization(trained.checkpoint)
        label = model.config.variant
        for weights, net in (("trained", model), ("random weights", random_weights(model, cfg.seed))):
            t0 = time.perf_counter()
            scores = score_model(net, mean, std, cfg, coco)
            row = {
                "variant": name,
                "model": label,
                "attention": attention.upper(),
                "second_half": feedforward.upper() if feedforward != "none" else "none",
                "weights": weights,
                "val_top1": trained.val_top1 if weights == "trained" else None,
                **scores,
                "train_seconds": train_s if weights == "trained" else 0.0,
                "eval_seconds": time.perf_counter() - t0,
            }
            result.rows.append(row)
            log(
                f"  {label} ({weights}): shapes mIoU {row['shapes_miou']:.1f}, multishapes mIoU "
                f"{row['multishapes_miou']:.1f}, MaskCut box AP50 {row['box']['AP50']:.1f} AP {row['box']['AP']:.1f}"
            )
    result.seconds = time.perf_counter() - start
    write_report(result, cfg)
    return result


def write_report(result: AblationResult, cfg: AblationConfig) -> None:
    """``ablation.json``, ``ablation.md`` (the settings, the measured table, the paper's) and ``ablation.png``."""
    from ..presets import get_config

    (cfg.out / "ablation.json").write_text(json.dumps(result.to_json(), indent=2))
    settings = (
        f"Measured: every variant is `{cfg.base}` with its attention and second half chosen, trained "
        f"{cfg.epochs} epoch(s) on shapes (seed {cfg.seed}); attention and features of layer "
        f"{cfg.layer % get_config(cfg.base).depth} (0-based, block index); segmentation on {cfg.seg_images} "
        f'images, MaskCut on {cfg.scenes} scenes; every figure in %. "random weights": the same architecture '
        f"freshly initialised with seed {cfg.seed}."
    )
    (cfg.out / "ablation.md").write_text(f"{settings}\n\n{ablation_table(result)}\n\n{paper_table()}\n")
    plot_ablation(result, cfg.out / "ablation.png")


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


TABLE_COLUMNS: tuple[str, ...] = (
    "model",
    "attention",
    "second half",
    "weights",
    "val top-1",
    "shapes mIoU",
    "multishapes mIoU",
    "box AP50",
    "box AP75",
    "box AP",
    "mask AP50",
    "mask AP",
)
"""The columns of :func:`ablation_table` (every figure in %)."""


def ablation_table(result: AblationResult) -> str:
    """The measured table (Markdown; every figure in %)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in result.rows:
        cells = [r["model"], r["attention"], r["second_half"], r["weights"], _fmt(r["val_top1"])]
        cells += [_fmt(r["shapes_miou"]), _fmt(r["multishapes_miou"])]
        cells += [_fmt(r["box"][k]) for k in ("AP50", "AP75", "AP")] + [_fmt(r["mask"][k]) for k in ("AP50", "AP")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_table() -> str:
    """Table 2 of the paper, as printed there (S-8 models, ImageNet-21k; COCO val2017 MaskCut, VOC coarse seg.)."""
    lines = [
        "| model | attention | nonlinearity | COCO det. AP50 | AP75 | AP | VOC Seg. mIoU |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in PAPER_ROWS]
    return "\n".join(lines) + f"\n\nSource: {PAPER_SOURCE}."


def plot_ablation(result: AblationResult, path: Path) -> None:
    """Bars per variant, trained beside random weights: paper-protocol mIoU on shapes and multishapes, and
    MaskCut's box AP50 on the multishapes scenes."""
    from matplotlib.figure import Figure

    panels = (
        ("shapes mIoU (paper protocol)", lambda r: r["shapes_miou"]),
        ("multishapes mIoU (paper protocol)", lambda r: r["multishapes_miou"]),
        ("MaskCut box AP50 (multishapes)", lambda r: r["box"]["AP50"]),
    )
    models = list(dict.fromkeys(r["model"] for r in result.rows))
    fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels))
    width = 0.4
    for ax, (title, value) in zip(axes, panels, strict=True):
        for k, (weights, colour) in enumerate((("trained", "tab:blue"), ("random weights", "tab:gray"))):
            rows = {r["model"]: r for r in result.rows if r["weights"] == weights}
            heights = [value(rows[m]) if m in rows else 0.0 for m in models]
            ax.bar([i + (k - 0.5) * width for i in range(len(models))], heights, width, color=colour, label=weights)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("%")
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper right", ncols=2, fontsize=8)
    fig.savefig(path, dpi=120)
