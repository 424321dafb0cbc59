"""``cratevit codes compare``: a white-box model's built-in sparse code beside sparse autoencoders, with a
random-weights control (issue 21).

Six codes of one layer ``l`` (0-based block index), each scored on the same held-out images with the functions of
:mod:`.codes`:

==========  ==============  ==========================================================================
network     weights         code
==========  ==============  ==========================================================================
CRATE       trained         the ISTA code of layer ``l`` against its own dictionary (``x_hat = code D^T``)
CRATE       trained         an SAE trained on the same layer's ISTA input ``LN2(Z^{l+1/2})`` (``ista_in``)
ViT         trained         an SAE on the matched ViT layer's MLP input ``LN2(Z^{l+1/2})`` (same site)
(the same three)  random weights  the same architectures freshly initialised (seeded): the control of arXiv 2501.17727
==========  ==============  ==========================================================================

Every activation is read and every reconstruction spliced back through the hook API (:mod:`.hooks`: the site is
``blocks.l.norm2``). The ViT's layer is ``l`` when both networks have the same depth, else the same relative depth.
Each of the four networks gets a run folder of :func:`~.sae_run.train_model_sae` (cached activations, ``sae.pt``,
``metrics.jsonl``, ``curves.png``, ``eval.json``); the report folder adds ``compare.md`` (the table),
``compare.json`` (every number) and ``compare.png`` (the metrics as bars).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import atomic_path
from ..errors import UserError
from .probe import probe_datasets
from .sae_run import train_model_sae
from .sae_train import SAETrainConfig
from .segmentation import load_vision_model, random_copy

__all__ = ["COLUMNS", "CompareConfig", "compare_codes", "matched_layer", "matched_vit", "render_table"]


@dataclass
class CompareConfig:
    """What ``cratevit codes compare`` runs: the layer, the data, and the SAEs' recipe (as ``cratevit sae train``)."""

    layer: int = 3  # block index of the CRATE model, 0-based
    data: str = "shapes"
    images: int | None = None  # at most this many images per split (None: all)
    arch: str = "topk"
    expansion: int = 8
    k: int = 16
    l1: float = 1.0
    steps: int = 1000
    batch_size: int = 1024  # tokens per SAE step
    lr: float = 4e-4
    probe: bool = True
    seed: int = 0  # SAE initialisation, batch order, the random-weights copies


COLUMNS: dict[str, str] = {
    "features": "features",
    "l0": "L0",
    "fve": "FVE",
    "dead_fraction": "dead",
    "dense_fraction": "dense",
    "loss_recovered": "loss recovered",
    "probe_top1": "probe top-1",
    "mono": "mono.",
    "mono_adjusted": "mono. adjusted",
}
"""Row field -> column heading of the report table."""


def matched_layer(layer: int, depth: int, other_depth: int) -> int:
    """The layer of a ``other_depth``-deep network at the relative depth of ``layer`` in a ``depth``-deep one."""
    if depth == other_depth or depth == 1:
        return min(layer, other_depth - 1)
    return round(layer * (other_depth - 1) / (depth - 1))


def matched_vit(name: str, crate_model: nn.Module) -> nn.Module:
    """The timm model ``name`` at random weights, built to the CRATE model's geometry: its image and patch size,
    width, depth, heads and classes (a matched ViT for the control)."""
    import timm

    if not timm.is_model(name):
        raise UserError(f"--vit {name!r} is neither a checkpoint file nor a timm model name (see timm.list_models())")
    c = crate_model.config
    kwargs = {"img_size": c.image_size, "patch_size": c.patch_size, "embed_dim": c.dim, "depth": c.depth}
    kwargs.update(num_heads=c.heads, num_classes=c.num_classes)
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise UserError(f"timm model {name!r} cannot be built to the CRATE model's geometry {kwargs}: {e}") from None


def _row(network: str, weights: str, code: str, layer: int, m: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    mono = m.get("monosemanticity") or {}
    row = {
        "network": network,
        "weights": weights,
        "code": code,
        "layer": layer,
        "features": m["features"],
        "l0": m["l0"],
        "fve": m["fve"],
        "dead_fraction": m["dead_fraction"],
        "dense_fraction": m["dense_fraction"],
        "loss_recovered": m.get("loss_recovered"),
        "probe_top1": m.get("probe_top1"),
        "mono": mono.get("score"),
        "mono_adjusted": mono.get("score_adjusted"),
        "loss_clean": ev.get("loss_clean"),
        "loss_zero": ev.get("loss_zero"),
    }
    if "fve_identity" in m:
        row["fve_identity"] = m["fve_identity"]
    return row


def _cell(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in ("dead_fraction", "dense_fraction"):
        return f"{100 * value:.1f}%"
    if key == "probe_top1":
        return f"{value:.1f}%"
    if key == "features":
        return str(value)
    return f"{value:.3f}" if key != "l0" else f"{value:.2f}"


def render_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of the report (one line per code)."""
    head = "| network | weights | layer | code | " + " | ".join(COLUMNS.values()) + " |"
    rule = "| --- | --- | ---: | --- | " + " | ".join("---:" for _ in COLUMNS) + " |"
    lines = [head, rule]
    for r in rows:
        cells = [_cell(k, r.get(k)) for k in COLUMNS]
        lines.append(f"| {r['network']} | {r['weights']} | {r['layer']} | {r['code']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["l0", "fve", "dense_fraction", "loss_recovered", "probe_top1", "mono_adjusted"]
    labels = [f"{r['network']} {r['code']}\n{r['weights']}" for r in rows]
    colours = ["tab:blue" if r["weights"] == "trained" else "tab:gray" for r in rows]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, key in zip(axes.flat, metrics, strict=True):
        values = [r.get(key) if r.get(key) is not None else float("nan") for r in rows]
        ax.bar(range(len(rows)), values, color=colours)
        ax.set_title(COLUMNS.get(key, key) + (" (%)" if key == "probe_top1" else ""))
        ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=30, ha="right")
        ax.axhline(0, color="black", linewidth=0.6)
    fig.suptitle(title + " (blue: trained, grey: random weights)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def compare_codes(
    crate: str,
    vit: str,
    out: str | Path,
    cfg: CompareConfig,
    status: Callable[[str], None] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train and score the six codes (module docstring); write the report folder; return ``compare.json``'s content.

    ``crate``: a CRATE checkpoint, folder or preset (a preset: its "trained" row has random weights too, and says
    so); ``vit``: a ``cratevit train --arch vit_...`` checkpoint, or a timm model name (random weights, built to
    the CRATE model's geometry: :func:`matched_vit`)."""
    say = status or (lambda _msg: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    crate_model = load_vision_model(crate).eval()
    vit_model = (load_vision_model(vit) if Path(vit).exists() else matched_vit(vit, crate_model)).eval()
    for name, model in (("--crate", crate_model), ("--vit", vit_model)):
        if not isinstance(getattr(model, "blocks", None), (nn.ModuleList, nn.Sequential)):
            raise UserError(
                f"{name} {crate if name == '--crate' else vit} has no blocks to read; give a ViT-like model"
            )
    if not hasattr(crate_model.blocks[0], "ista"):
        raise UserError(f"--crate {crate} has no ISTA step; give a CRATE model (checkpoint or preset)")
    depth = len(crate_model.blocks)
    if not -depth <= cfg.layer < depth:
        raise UserError(
            f"--layer {cfg.layer} is outside the {depth}-layer CRATE model; use 0..{depth - 1} (block index, 0-based)"
        )
    layer = cfg.layer % depth
    vit_layer = matched_layer(layer, depth, len(vit_model.blocks))
    pcfg = dict(getattr(crate_model, "pretrained_cfg", {}) or {})
    size = int(pcfg.get("input_size", (3, 224, 224))[-1])
    datasets = probe_datasets(cfg.data, size, pcfg.get("mean"), pcfg.get("std"))  # both networks see these images
    sae_cfg = {"arch": cfg.arch, "expansion": cfg.expansion, "k": cfg.k, "l1_coeff": cfg.l1}
    train_cfg = SAETrainConfig(
        steps=cfg.steps,
        lr=cfg.lr,
        warmup_steps=min(100, max(1, cfg.steps // 10)),
        resample_every=500 if cfg.arch == "relu" else 0,
        seed=cfg.seed,
        log_every=max(1, min(100, cfg.steps // 20)),
        checkpoint_every=max(1, min(500, cfg.steps)),
    )
    trained = {"CRATE": Path(crate).exists(), "ViT": Path(vit).exists()}
    networks = [
        ("CRATE", "trained", crate_model, crate, layer),
        ("ViT", "trained", vit_model, vit, vit_layer),
        ("CRATE", "random", random_copy(crate_model, cfg.seed + 1), crate, layer),
        ("ViT", "random", random_copy(vit_model, cfg.seed + 2), vit, vit_layer),
    ]
    rows: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    for network, weights, model, spec, at in networks:
        random_weights = weights == "random" or not trained[network]
        label = "random weights" if random_weights else "trained"
        run = f"{network.lower()}-{weights}"
        say(f"{network} ({label}), layer {at} (0-based): SAE on its ISTA/MLP input -> {out / run}")
        result = train_model_sae(
            model.eval(),
            spec,
            random_weights,
            at,
            out / run,
            sae_cfg,
            train_cfg,
            datasets,
            data=cfg.data,
            site="ista_in",
            images=cfg.images,
            batch_size=cfg.batch_size,
            probe=cfg.probe,
            progress=progress,
            status=say,
        )
        ev = result.evaluation
        runs[run] = {k: ev[k] for k in ("model", "random_weights", "layer", "images") if k in ev}
        runs[run].update({k: ev[k] for k in ("loss_clean", "loss_zero") if k in ev})
        sae_name = f"SAE {cfg.arch} (k {cfg.k})" if cfg.arch == "topk" else f"SAE relu (l1 {cfg.l1})"
        if "ista" in ev:
            rows.append(_row(network, label, "ISTA code", at, ev["ista"], ev))
        rows.append(_row(network, label, sae_name, at, ev["sae"], ev))
    report = {
        "crate": crate,
        "vit": vit,
        "layer": layer,
        "vit_layer": vit_layer,
        "data": cfg.data,
        "config": asdict(cfg),
        "rows": rows,
        "runs": runs,
        "definitions": "docs/sae.md (metrics of any sparse code); loss recovered = (L_zero - L_spliced) / "
        "(L_zero - L_clean) with the site's patch tokens zeroed / replaced by the reconstruction",
    }
    with atomic_path(out / "compare.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    title = f"codes of layer {layer} (0-based), {cfg.data}"
    md = [f"# {title}", "", render_table(rows), ""]
    for run, info in runs.items():
        if "loss_clean" in info:
            md.append(f"- {run}: classifier loss clean {info['loss_clean']:.3f}, site zeroed {info['loss_zero']:.3f}")
    with atomic_path(out / "compare.md") as tmp:
        tmp.write_text("\n".join(md) + "\n", encoding="utf-8")
    _plot(rows, out / "compare.png", title)
    return report
