"""How good are a model's features? Linear probe and k-NN on frozen features, as the self-supervised literature
reports them (MAE, DINO).

* :func:`pooled_features`: one feature vector per image from any model cratevit loads: CRATE, CRATE-MAE (the
  unmasked encoder) and timm models; the final features or the mean patch token of one layer.
* :func:`extract_features`: features of a whole dataset, sharded over torchrun processes and gathered on all;
  :func:`cached_features` keeps them in a file keyed by the model's weights, the layer, the pooling and the data.
* :func:`knn_classifier`: DINO's weighted k-NN (``eval_knn.py``): cosine similarity of L2-normalised features,
  the k = 20 nearest training images vote for their class with weight ``exp(similarity / T)``, T = 0.07.
* :func:`linear_probe`: multinomial logistic regression on standardised features (train mean/std, as MAE's
  linear probe puts a BatchNorm without affine parameters before its linear layer), solved to convergence by
  full-batch L-BFGS; the L2 strength is picked from a grid on a held-out fifth of the training set, then the
  probe is refit on the whole training set.

Everything but the extraction is a function of tensors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..checkpoint.read import load_file
from ..errors import UserError

__all__ = [
    "KNN_K",
    "KNN_TEMPERATURE",
    "L2_GRID",
    "LinearProbeResult",
    "cached_features",
    "embed_splits",
    "extract_features",
    "knn_classifier",
    "linear_probe",
    "model_fingerprint",
    "pooled_features",
    "probe_datasets",
    "score_probes",
    "topk_accuracy",
]

KNN_K = 20
"""Neighbours that vote in :func:`knn_classifier` (DINO's 20)."""
KNN_TEMPERATURE = 0.07
"""Temperature ``T`` of the k-NN vote weights ``exp(similarity / T)`` (DINO's 0.07)."""
L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""L2 strengths the linear probe tries; the one with the best held-out top-1 is kept."""


# ---------------------------------------------------------------------------------------------- k-NN
@torch.no_grad()
def knn_classifier(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> Tensor:
    """DINO's weighted k-NN: class scores (n_test, num_classes) of every test feature.

    Features are L2-normalised; each test image's ``k`` most cosine-similar training images add
    ``exp(similarity / temperature)`` to their class's score.
    """
    if train_features.shape[0] != train_labels.shape[0]:
        raise UserError(f"{train_features.shape[0]} training features but {train_labels.shape[0]} labels")
    k = min(k, train_features.shape[0])
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    train = F.normalize(train_features.float(), dim=1).t()  # (d, n_train)
    test = F.normalize(test_features.float(), dim=1)
    scores = []
    for start in range(0, test.shape[0], chunk):
        sim, idx = (test[start : start + chunk] @ train).topk(k, dim=1)  # (c, k) similarities and neighbours
        votes = F.one_hot(train_labels[idx], num_classes).float()  # (c, k, classes)
        scores.append((votes * (sim / temperature).exp()[..., None]).sum(dim=1))
    return torch.cat(scores)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Percentage of rows whose label is among the ``k`` highest scores (k capped at the class count)."""
    order = scores.argsort(dim=1, descending=True)
    hit = order == labels[:, None]
    return {k: 100.0 * hit[:, : min(k, scores.shape[1])].any(dim=1).float().mean().item() for k in ks}


# ---------------------------------------------------------------------------------------------- linear probe
@dataclass
class LinearProbeResult:
    """A linear probe's test accuracies (top-1 and top-5, %), the chosen L2 strength and every strength's held-out
    top-1."""

    top1: float  # on the test features, %
    top5: float
    l2: float  # the chosen L2 strength
    val_top1: dict[str, float]  # held-out accuracy of every L2 strength tried
    recipe: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fit_logistic(x: Tensor, y: Tensor, num_classes: int, l2: float, max_iter: int) -> nn.Linear:
    """Multinomial logistic regression, mean cross-entropy + l2/2 * ||W||^2 (bias unpenalised), by L-BFGS."""
    head = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(
        head.parameters(),
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + 0.5 * l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head


def _split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Stratified split of the indices: about ``fraction`` of every class held out."""
    g = torch.Generator().manual_seed(seed)
    held, kept = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = round(len(idx) * fraction) if len(idx) > 1 else 0
        held.append(idx[:n])
        kept.append(idx[n:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    l2_grid: Sequence[float] = L2_GRID,
    num_classes: int | None = None,
    max_iter: int = 500,
    seed: int = 0,
) -> LinearProbeResult:
    """Top-1/top-5 of a logistic-regression probe on frozen features (see the module docstring for the recipe)."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1 if num_classes is None else num_classes
    x = train_features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs, xt = ((x - mean) / std).float(), ((test_features.double() - mean) / std).float()
    fit_idx, val_idx = _split(train_labels, 0.2, seed)
    val_top1: dict[str, float] = {}
    if len(l2_grid) > 1 and len(val_idx) > 0:
        for l2 in l2_grid:
            head = _fit_logistic(xs[fit_idx], train_labels[fit_idx], num_classes, l2, max_iter)
            with torch.no_grad():
                val_top1[f"{l2:g}"] = topk_accuracy(head(xs[val_idx]), train_labels[val_idx], (1,))[1]
        best = max(l2_grid, key=lambda v: (val_top1[f"{v:g}"], v))  # ties: the stronger penalty
    else:
        best = l2_grid[0]
    head = _fit_logistic(xs, train_labels, num_classes, best, max_iter)
    with torch.no_grad():
        acc = topk_accuracy(head(xt), test_labels)
    recipe = (
        f"logistic regression on standardised features, L-BFGS (max {max_iter} iterations), L2 {best:g} chosen "
        f"from {', '.join(f'{v:g}' for v in l2_grid)} on a stratified 20% of the training set, then refit on all"
    )
    return LinearProbeResult(acc[1], acc[5], best, val_top1, recipe)


# ---------------------------------------------------------------------------------------------- features
def pooled_features(model: nn.Module, images: Tensor, layer: int | None = None, pool: str = "cls") -> Tensor:
    """One feature vector per image, (b, d).

    ``layer=None``: the model's own final features: for a CRATE-MAE the unmasked encoder's output (after its final
    LayerNorm), the class token (``pool="cls"``) or the mean patch token (``"mean"``); for CRATE and timm models
    ``forward_head(forward_features(x), pre_logits=True)`` (the model's pooling and norm; ``pool`` unused).
    ``layer=i``: the mean patch token of layer ``i``'s output (``forward_intermediates``, negative from the end).
    """
    if pool not in ("cls", "mean"):
        raise UserError(f"pool must be 'cls' or 'mean', got {pool!r}")
    if layer is not None:
        (maps,) = model.forward_intermediates(images, indices=[layer], output_fmt="NCHW", intermediates_only=True)
        return maps.float().mean(dim=(2, 3))
    if hasattr(model, "forward_encoder_features"):
        z = model.forward_encoder_features(images)
        return (z[:, 0] if pool == "cls" else z[:, 1:].mean(dim=1)).float()
    return model.forward_head(model.forward_features(images), pre_logits=True).float()


def _collate(items: list[Any]) -> tuple[Tensor, Tensor]:
    good = [it for it in items if it is not None]
    if len(good) != len(items):
        raise UserError("an image could not be read; features need every image (fix or remove the file)")
    return torch.stack([torch.as_tensor(im) for im, _ in good]), torch.tensor([int(t) for _, t in good])


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    layer: int | None = None,
    pool: str = "cls",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    workers: int = 0,
    log: Callable[[str], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Features (n, d) and labels (n,) of every item of ``dataset`` (``(image, label)`` pairs), in dataset order.

    Under torchrun (``torch.distributed`` initialised) each process embeds every ``world_size``-th item and the
    pieces are gathered, so every process returns the whole set.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    n = len(dataset)  # type: ignore[arg-type]
    mine = list(range(rank, n, world))
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for step, (x, y) in enumerate(loader):
        feats.append(pooled_features(model, x.to(device), layer, pool).cpu())
        labels.append(y)
        if log and (step + 1) % 20 == 0:
            log(f"  features: {min((step + 1) * batch_size, len(mine))}/{len(mine)} images")
    model.train(was_training)
    f, y = torch.cat(feats), torch.cat(labels)
    if world == 1:
        return f, y
    return _gather_strided(f, y, n, world, device)


def _gather_strided(f: Tensor, y: Tensor, n: int, world: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Reassemble rank r's items r, r + world, ... into dataset order on every rank."""
    rows = -(-n // world)  # ceil
    backend_device = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    pad_f = f.new_zeros(rows, f.shape[1])
    pad_f[: len(f)] = f
    pad_y = y.new_full((rows,), -1)
    pad_y[: len(y)] = y
    all_f = pad_f.new_empty(world * rows, f.shape[1]).to(backend_device)
    all_y = pad_y.new_empty(world * rows).to(backend_device)
    dist.all_gather_into_tensor(all_f, pad_f.to(backend_device))
    dist.all_gather_into_tensor(all_y, pad_y.to(backend_device))
    # rank-major (world, rows) -> item index r + world * j: transpose to (rows, world), flatten, drop the padding
    f_out = all_f.cpu().view(world, rows, -1).transpose(0, 1).reshape(world * rows, -1)[:n]
    y_out = all_y.cpu().view(world, rows).t().reshape(-1)[:n]
    return f_out, y_out


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state (names, shapes, dtypes and values): the same weights give the same key."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cached_features(
    cache_dir: str | Path,
    model: nn.Module,
    data_key: str,
    layer: int | None,
    pool: str,
    compute: Callable[[], tuple[Tensor, Tensor]],
    fingerprint: str | None = None,
) -> tuple[Tensor, Tensor, bool]:
    """``compute()``'s (features, labels), kept in ``cache_dir/<key>.pt``; the key hashes the model's weights
    (or ``fingerprint``), the layer, the pooling and ``data_key`` (which names the data and its preprocessing).
    Returns (features, labels, whether they came from the cache)."""
    meta = {"model": fingerprint or model_fingerprint(model), "layer": layer, "pool": pool, "data": data_key}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{key}.pt"
    if path.is_file():
        stored = load_file(path)
        if stored.get("meta") == meta:
            return stored["features"], stored["labels"], True
    features, labels = compute()
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return features, labels, False  # one writer
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"features": features, "labels": labels, "meta": meta}, tmp)
    tmp.replace(path)
    return features, labels, False


# ---------------------------------------------------------------------------------------------- data
def probe_datasets(
    data: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    data_dir: str | None = None,
    seed: int = 0,
    download: bool = False,
) -> tuple[Dataset, Dataset, str]:
    """(train, val, data key) with evaluation preprocessing on both splits (no augmentation), normalised with
    ``mean``/``std`` (the model's): the built-in digits and shapes, a torchvision transfer set, or a folder with
    ``train/`` and ``val/``. The key names the data and its preprocessing, for :func:`cached_features`."""
    from ..data import SHAPES_SIZES, data_info
    from ..data import transforms as T

    info = data_info(data)
    mean, std = tuple(mean), tuple(std)
    key = f"{info.kind}:{info.name}:{image_size}:{mean}:{std}"
    if info.kind == "digits":
        from ..data.digits import DigitsDataset

        tf = T.digits_eval(mean, std)
        return DigitsDataset("train", image_size, tf), DigitsDataset("val", image_size, tf), key
    if info.kind == "shapes":
        from ..data.shapes import ShapesDataset

        tf = T.transfer_eval(image_size, mean, std)
        train = ShapesDataset("train", SHAPES_SIZES["train"], image_size, seed, tf)
        return train, ShapesDataset("val", SHAPES_SIZES["val"], image_size, seed, tf), f"{key}:seed={seed}"
    if info.kind == "transfer":
        from ..data.transfer import make_transfer

        tf = T.transfer_eval(image_size, mean, std)
        train = make_transfer(info.name, data_dir, True, tf, download)
        return train, make_transfer(info.name, data_dir, False, tf, download), key
    from ..data.folder import SafeImageFolder

    root = Path(info.name)
    train = SafeImageFolder(root / "train", T.imagenet_eval(image_size, mean, std))
    val = SafeImageFolder(root / "val", T.imagenet_eval(image_size, mean, std))
    listing = hashlib.sha256()
    for path, label in [*train.samples, *val.samples]:
        st = Path(path).stat()
        listing.update(f"{path}:{label}:{st.st_size}:{st.st_mtime_ns};".encode())
    return train, val, f"{key}:{listing.hexdigest()[:16]}"


# ---------------------------------------------------------------------------------------------- both probes
def embed_splits(
    model: nn.Module,
    splits: dict[str, Dataset],
    data_key: str,
    layer: int | None = None,
    pool: str = "cls",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    workers: int = 0,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, tuple[Tensor, Tensor, bool]]:
    """``{split: (features, labels, from_cache)}`` of each dataset (:func:`extract_features`), kept in
    ``cache_dir`` when given (:func:`cached_features`, keyed by ``data_key:split``)."""
    out = {}
    for split, ds in splits.items():

        def compute(ds: Dataset = ds) -> tuple[Tensor, Tensor]:
            return extract_features(model, ds, layer, pool, batch_size, device, workers, log=log)

        if cache_dir is not None:
            out[split] = cached_features(cache_dir, model, f"{data_key}:{split}", layer, pool, compute)
        else:
            out[split] = (*compute(), False)
    return out


def score_probes(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    l2_grid: Sequence[float] = L2_GRID,
) -> tuple[dict[str, Any], LinearProbeResult]:
    """Both probes of frozen features: ``({"knn": {k, temperature, top1, top5}, "linear": {...}, "seconds":
    {knn, linear}}, the linear probe)`` (weighted cosine k-NN as DINO; a logistic regression choosing its L2
    strength from ``l2_grid`` on a held-out part of the training features)."""
    import time

    start = time.perf_counter()
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    scores = knn_classifier(train_features, train_labels, val_features, k, temperature, num_classes)
    knn = topk_accuracy(scores, val_labels)
    t_knn = time.perf_counter() - start
    lin = linear_probe(
        train_features, train_labels, val_features, val_labels, l2_grid=tuple(l2_grid), num_classes=num_classes
    )
    t_lin = time.perf_counter() - start - t_knn
    record = {
        "knn": {"k": k, "temperature": temperature, "top1": knn[1], "top5": knn[5]},
        "linear": lin.to_dict(),
        "seconds": {"knn": t_knn, "linear": t_lin},
    }
    return record, lin
