"""Probes: DINO's weighted k-NN, the logistic-regression probe, feature extraction (any model, torchrun) and its cache."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from cratevit import create_model
from cratevit.analysis.probe import (
    cached_features,
    extract_features,
    knn_classifier,
    linear_probe,
    model_fingerprint,
    pooled_features,
    topk_accuracy,
)
from cratevit.models.crate_mae import CRATEMAE, CRATEMAEConfig

MAE_TINY = CRATEMAEConfig(
    image_size=32,
    patch_size=8,
    dim=32,
    depth=2,
    heads=2,
    dim_head=16,
    decoder_depth=1,
    decoder_heads=2,
    decoder_dim_head=16,
)


def knn_literal(train_x, train_y, test_x, k, t, num_classes):
    """One test image at a time: cosine similarities, the k largest, exp(s / t) added to each neighbour's class."""
    scores = torch.zeros(len(test_x), num_classes, dtype=torch.float64)
    for i, q in enumerate(test_x.double()):
        sims = [
            (float(q @ x.double() / (q.norm() * x.double().norm())), int(y))
            for x, y in zip(train_x, train_y, strict=True)
        ]
        for s, y in sorted(sims, key=lambda p: -p[0])[:k]:
            scores[i, y] += math.exp(s / t)
    return scores


def blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_knn_matches_the_literal_weighted_vote():
    x, y = blobs(15, 4, 8, 3.0, 0)
    q, _ = blobs(5, 4, 8, 3.0, 1)
    ours = knn_classifier(x, y, q, k=20, temperature=0.07, num_classes=4, chunk=7)
    torch.testing.assert_close(ours.double(), knn_literal(x, y, q, 20, 0.07, 4), rtol=1e-4, atol=0)
    # k larger than the training set is capped; the scale of a feature does not matter (cosine)
    torch.testing.assert_close(knn_classifier(x, y, q * 7, k=500), knn_classifier(x, y, q, k=60), rtol=1e-5, atol=0)


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    assert topk_accuracy(scores, torch.tensor([1, 1, 0]), (1, 2, 5)) == pytest.approx({1: 100 / 3, 2: 200 / 3, 5: 100})


def test_linear_probe_separates_blobs_and_is_at_chance_on_random_labels():
    x, y = blobs(40, 5, 16, 1.0, 0)
    xt, yt = blobs(20, 5, 16, 1.0, 1)
    res = linear_probe(x, y, xt, yt, max_iter=100)
    assert (
        res.top1 == 100.0
        and res.top5 == 100.0
        and set(res.val_top1) == {"1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"}
    )
    assert "L-BFGS" in res.recipe and f"{res.l2:g}" in res.recipe
    assert linear_probe(x, y, xt, yt, max_iter=100) == res  # deterministic
    noise = torch.randn(200, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(3))
    chance = linear_probe(noise[:150], labels[:150], noise[150:], labels[150:], max_iter=100)
    assert chance.top1 < 45.0


def test_pooled_features_from_crate_mae_and_timm_models():
    x = torch.randn(3, 3, 32, 32)
    crate = create_model("crate_debug", num_classes=10).eval()
    with torch.no_grad():
        f = pooled_features(crate, x)
        torch.testing.assert_close(f, crate.forward_head(crate.forward_features(x), pre_logits=True))
        assert pooled_features(crate, x, layer=-1).shape == (3, crate.config.dim)
        mae = CRATEMAE(MAE_TINY).eval()
        z = mae.forward_encoder_features(x)
        torch.testing.assert_close(pooled_features(mae, x, pool="cls"), z[:, 0])
        torch.testing.assert_close(pooled_features(mae, x, pool="mean"), z[:, 1:].mean(1))
        torch.testing.assert_close(
            pooled_features(mae, x, layer=0), mae.forward_trace(x).encoder[0].z_out[:, 1:].mean(1)
        )
        vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0).eval()
        assert pooled_features(vit, x).shape == (3, 192) and pooled_features(vit, x, layer=1).shape == (3, 192)
    with pytest.raises(ValueError, match="pool must be"):
        pooled_features(mae, x, pool="max")


def test_extract_features_keeps_dataset_order_and_the_cache_is_keyed_by_weights(tmp_path):
    mae = CRATEMAE(MAE_TINY)
    data = TensorDataset(torch.randn(10, 3, 32, 32), torch.arange(10) % 3)
    f, y = extract_features(mae, data, batch_size=4)
    assert f.shape == (10, 32) and y.tolist() == (torch.arange(10) % 3).tolist()
    with torch.no_grad():
        torch.testing.assert_close(f[7], mae.forward_encoder_features(data[7][0][None])[0, 0])
    calls = []

    def compute():
        calls.append(1)
        return extract_features(mae, data, batch_size=4)

    a = cached_features(tmp_path, mae, "toy:v1", None, "cls", compute)
    b = cached_features(tmp_path, mae, "toy:v1", None, "cls", compute)
    assert (a[2], b[2], len(calls)) == (False, True, 1) and torch.equal(a[0], b[0])
    cached_features(tmp_path, mae, "toy:v1", -1, "cls", compute)  # another layer: computed
    fp = model_fingerprint(mae)
    with torch.no_grad():
        mae.blocks[0].ista.dictionary[0, 0] += 1.0
    assert model_fingerprint(mae) != fp
    assert cached_features(tmp_path, mae, "toy:v1", None, "cls", compute)[2] is False  # new weights: computed
    assert len(calls) == 3 and len(list(tmp_path.glob("*.pt"))) == 3


def _gather_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    mae = CRATEMAE(MAE_TINY)
    data = TensorDataset(torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(7))
    f, y = extract_features(mae, data, batch_size=2)
    torch.save({"f": f, "y": y}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_features_are_gathered_across_processes(tmp_path):
    mp.spawn(_gather_worker, args=(str(tmp_path / "store"), str(tmp_path / "feats")), nprocs=2, join=True)
    torch.manual_seed(0)
    mae = CRATEMAE(MAE_TINY)
    data = TensorDataset(torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(7))
    f, _ = extract_features(mae, data, batch_size=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"feats.{rank}", weights_only=True)
        assert got["y"].tolist() == list(range(7))
        torch.testing.assert_close(got["f"], f, rtol=1e-5, atol=1e-6)


def test_probe_command_on_a_timm_name_and_a_missing_file(tmp_path, capsys):
    from cratevit.cli import main
    from cratevit.cli.probe import load_probe_model

    vit = load_probe_model("vit_tiny_patch16_224")
    assert type(vit).__name__ == "VisionTransformer" and vit.num_classes == 0
    assert main(["probe", str(tmp_path / "nope.pt")]) == 2
    assert "not found" in capsys.readouterr().err
