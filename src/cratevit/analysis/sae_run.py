"""``cratevit sae train`` as one function: cache a layer's activations, train an SAE on them, and score it beside
the layer's own ISTA code.

:func:`train_layer_sae` loads the model (a checkpoint, a folder, or a preset: random weights), reads layer ``l``'s
activations at one site (:mod:`.activations`) for the patch tokens of the training images into an on-disk
:class:`~.sae_train.ActivationCache` (``OUT/activations/train``, reused when it matches), trains the SAE
(:func:`~.sae_train.train_sae`: ``OUT/sae.pt``, ``metrics.jsonl``, ``curves.png``), then evaluates on the held-out
images (``OUT/eval.json``): L0, fraction of variance explained, dead and dense fractions (:mod:`.codes`) of the SAE
and, when the site is ``ista_in``, of the layer's ISTA code against its dictionary; optionally the linear-probe
accuracy of both codes, and on the shapes data their monosemanticity.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import atomic_path, load_model
from ..errors import UserError
from .activations import (
    SITES,
    dataset_activations,
    has_ista_dictionary,
    ista_dictionary,
    logits_with_replaced,
    prefix_tokens,
)
from .codes import (
    DEFINITIONS,
    code_metrics,
    code_probe,
    fraction_variance_explained,
    ista_reconstruction,
    loss_recovered,
    monosemanticity,
    shapes_token_attributes,
)
from .probe import probe_datasets
from .sae import SAEConfig, SparseAutoencoder
from .sae_features import weights_fingerprint
from .sae_train import CHECKPOINT_NAME, ActivationCache, SAETrainConfig, train_sae

__all__ = ["LayerSAEResult", "train_layer_sae", "train_model_sae"]


@dataclass
class LayerSAEResult:
    """What :func:`train_layer_sae` made: the run folder, whether the model had random weights, the evaluation
    (``eval.json``'s content) and the logged training records."""

    out: Path
    random_weights: bool
    evaluation: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)


def _patch_grid(model: torch.nn.Module) -> tuple[int, int]:
    """The patch grid (rows, cols) at the model's own input size (a white-box family's, or a timm ViT's)."""
    grid = getattr(model, "grid_size", None) or getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return int(grid[0]), int(grid[1])


def _split_images(dataset: Any, limit: int | None) -> int:
    return len(dataset) if limit is None else min(limit, len(dataset))


def _cache(
    model: torch.nn.Module, dataset: Any, folder: Path, meta: dict[str, Any], batch_size: int, resume: bool
) -> ActivationCache:
    """The training activations: the existing cache when its ``meta`` matches, else a new one."""
    try:
        cache = ActivationCache(folder)
        if cache.meta == meta:
            return cache
        if resume:
            raise UserError(f"{folder} caches other activations than this run's; resume with the same options")
    except UserError:
        if resume and (folder / "index.json").exists():
            raise
    prefix = prefix_tokens(model)
    site, layer = meta["site"], meta["layer"]

    def chunks():
        for acts, _ in dataset_activations(model, dataset, layer, (site,), batch_size, meta["images"]):
            yield acts[site][:, prefix:]

    return ActivationCache.write(folder, chunks(), meta)


@torch.no_grad()
def _evaluate(
    model: torch.nn.Module,
    sae: SparseAutoencoder,
    train_ds: Any,
    val_ds: Any,
    layer: int,
    site: str,
    data: str,
    images: int | None,
    batch_size: int,
    probe: bool,
) -> dict[str, Any]:
    prefix = prefix_tokens(model)
    with_ista = site == "ista_in" and has_ista_dictionary(model, layer)
    sites = ("ista_in", "code") if with_ista else (site,)
    dictionary = ista_dictionary(model, layer) if with_ista else None

    def codes_of(dataset: Any, limit: int | None, pooled: bool = False) -> tuple[dict[str, Tensor], Tensor]:
        """Patch tokens' activations and codes (images, tokens, .); ``pooled``: their mean over the tokens
        (images, 1, .), so a large training split is never held token by token."""
        keep = {"x": [], "sae": [], **({"ista": []} if with_ista else {})}
        labels = []
        for acts, y in dataset_activations(model, dataset, layer, sites, batch_size, limit):
            x = acts[site][:, prefix:]
            batch = {"x": x, "sae": sae.encode(x), **({"ista": acts["code"][:, prefix:]} if with_ista else {})}
            for name, value in batch.items():
                keep[name].append(value.mean(1, keepdim=True) if pooled else value)
            labels.append(y)
        return {name: torch.cat(values) for name, values in keep.items()}, torch.cat(labels)

    val, val_y = codes_of(val_ds, images)
    x = val["x"]
    result: dict[str, Any] = {"split": "val", "images": len(val_y), "definitions": dict(DEFINITIONS)}
    result["sae"] = code_metrics(x, val["sae"], sae.decode(val["sae"])).to_dict()
    # the training-time definition: no firing on the last dead_after training tokens
    result["sae"]["dead_fraction_training"] = float(sae.dead_mask().float().mean())
    if with_ista:
        result["ista"] = code_metrics(x, val["ista"], ista_reconstruction(val["ista"], dictionary)).to_dict()
        # one ISTA step starts from the input itself: the code as its own reconstruction (identity dictionary)
        result["ista"]["fve_identity"] = fraction_variance_explained(x, val["ista"])
    result.update(_spliced_losses(model, sae, val_ds, layer, site, dictionary, images, batch_size))
    for name in ("sae", "ista"):
        if name in result and f"loss_{name}" in result:
            # None when zeroing the site leaves the loss unchanged (the last layer's patch tokens under
            # class-token pooling never reach the logits)
            same = result["loss_zero"] == result["loss_clean"]
            result[name]["loss_recovered"] = (
                None if same else loss_recovered(result["loss_clean"], result["loss_zero"], result[f"loss_{name}"])
            )
    if data == "shapes":
        grid = _patch_grid(model)
        attrs = shapes_token_attributes(val_ds, range(len(val_y)), grid)
        for name in ("sae", "ista") if with_ista else ("sae",):
            result[name]["monosemanticity"] = monosemanticity(val[name].flatten(0, 1), attrs)
    if probe:
        train, train_y = codes_of(train_ds, images, pooled=True)
        for name in ("sae", "ista") if with_ista else ("sae",):
            result[name]["probe_top1"] = code_probe(train[name], train_y, val[name], val_y).top1
    return result


@torch.no_grad()
def _spliced_losses(
    model: torch.nn.Module,
    sae: SparseAutoencoder,
    dataset: Any,
    layer: int,
    site: str,
    dictionary: Tensor | None,
    limit: int | None,
    batch_size: int,
) -> dict[str, float]:
    """Mean cross-entropy of the model's classifier: clean, with the site's patch activations zeroed, replaced by
    the SAE's reconstruction and (``ista_in``) by the ISTA code's ``code D^T``. Empty without a classifier whose
    classes cover the labels."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Subset

    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    variants = {"clean": None, "zero": torch.zeros_like, "sae": sae}
    if dictionary is not None:
        variants["ista"] = lambda x: ista_reconstruction(model.blocks[layer].ista(x), dictionary)
    totals = dict.fromkeys(variants, 0.0)
    count = 0
    model.eval()
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        labels = torch.as_tensor(labels)
        clean = model(images)
        if clean.ndim != 2 or int(labels.max()) >= clean.shape[1]:
            return {}
        for name, fn in variants.items():
            logits = clean if fn is None else logits_with_replaced(model, images, layer, site, fn)
            totals[name] += float(F.cross_entropy(logits, labels, reduction="sum"))
        count += len(labels)
    return {f"loss_{name}": total / max(count, 1) for name, total in totals.items()}


def train_layer_sae(
    model_spec: str,
    layer: int,
    out: str | Path,
    sae_cfg: dict[str, Any],
    train_cfg: SAETrainConfig,
    data: str = "digits",
    site: str = "ista_in",
    images: int | None = None,
    batch_size: int = 1024,
    resume: bool = False,
    probe: bool = False,
    data_dir: str | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    status: Callable[[str], None] | None = None,
) -> LayerSAEResult:
    """Cache, train, evaluate (see the module docstring). ``sae_cfg``: :class:`SAEConfig` fields but ``d_in``;
    ``images``: at most this many images per split (None: all); ``batch_size``: tokens per SAE step."""
    if site not in SITES:
        raise UserError(f"unknown activation site {site!r}; choose from {', '.join(SITES)}")
    out = Path(out)
    if resume and not (out / CHECKPOINT_NAME).is_file():
        raise UserError(f"nothing to resume: {out / CHECKPOINT_NAME} does not exist; start without --resume")
    random_weights = not Path(model_spec).exists()
    torch.manual_seed(train_cfg.seed)
    model = load_model(model_spec).eval()
    pcfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    size = int(pcfg.get("input_size", (3, 224, 224))[-1])
    datasets = probe_datasets(data, size, pcfg.get("mean"), pcfg.get("std"), data_dir)
    return train_model_sae(
        model,
        str(model_spec),
        random_weights,
        layer,
        out,
        sae_cfg,
        train_cfg,
        datasets,
        data=data,
        site=site,
        images=images,
        batch_size=batch_size,
        resume=resume,
        probe=probe,
        progress=progress,
        status=status,
    )


def train_model_sae(
    model: torch.nn.Module,
    model_name: str,
    random_weights: bool,
    layer: int,
    out: str | Path,
    sae_cfg: dict[str, Any],
    train_cfg: SAETrainConfig,
    datasets: tuple[Any, Any, str],
    data: str = "digits",
    site: str = "ista_in",
    images: int | None = None,
    batch_size: int = 1024,
    resume: bool = False,
    probe: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    status: Callable[[str], None] | None = None,
) -> LayerSAEResult:
    """:func:`train_layer_sae` on a model already built (any model the hook API reads: a white-box family, a timm
    ViT), with its ``(train, val, data key)`` datasets; ``model_name`` is recorded, ``random_weights`` reported."""
    say = status or (lambda _msg: None)
    out = Path(out)
    model = model.eval()
    depth = len(model.blocks)
    if not -depth <= layer < depth:
        raise UserError(f"layer {layer} is outside this {depth}-layer model; use 0..{depth - 1} (block index, 0-based)")
    layer %= depth
    train_ds, val_ds, data_key = datasets
    meta = {
        "model": model_name,
        "random_weights": random_weights,
        "layer": layer,
        "site": site,
        "data": data_key,
        "images": _split_images(train_ds, images),
        "tokens": "patch",
        "model_fingerprint": weights_fingerprint(model),  # what the explorer checks an SAE against
    }
    say(
        f"caching layer {layer} (0-based) {site} activations of {meta['images']} training images"
        + (" (random weights)" if random_weights else "")
    )
    cache = _cache(model, train_ds, out / "activations" / "train", meta, 64, resume)
    sae = SparseAutoencoder(SAEConfig(d_in=cache.dim, **sae_cfg))
    say(
        f"training a {sae.config.arch} SAE ({cache.dim} -> {sae.config.d_sae} features) for {train_cfg.steps} steps "
        f"of {batch_size} tokens on {cache.num_tokens} cached tokens"
    )
    records = train_sae(
        sae, cache.batches(batch_size, train_cfg.seed), train_cfg, out, resume=resume, progress=progress, meta=meta
    )
    say(f"evaluating on {_split_images(val_ds, images)} held-out images")
    evaluation = {
        **meta,
        **_evaluate(model, sae, train_ds, val_ds, layer, site, data, images, 64, probe),
        "checkpoint": str(out / CHECKPOINT_NAME),
    }
    with atomic_path(out / "eval.json") as tmp:
        tmp.write_text(json.dumps(evaluation, indent=2) + "\n", encoding="utf-8")
    return LayerSAEResult(out, random_weights, evaluation, records)
