"""Training objectives: classification and masked autoencoding give the engine a loss and validation metrics."""

from __future__ import annotations

import pytest
import torch

from cratevit.models.crate_mae import CRATEMAE, CRATEMAEConfig, random_masking
from cratevit.train.objectives import Classification, MaskedAutoencoding, make_objective

MAE_TINY = CRATEMAEConfig(
    image_size=32,
    patch_size=8,
    dim=32,
    depth=1,
    heads=2,
    dim_head=16,
    decoder_depth=1,
    decoder_heads=2,
    decoder_dim_head=16,
)


def test_masked_autoencoding_masks_are_a_function_of_seed_step_and_rank():
    model = CRATEMAE(MAE_TINY)
    obj = make_objective("mae", model, 10, {}, seed=3, rank=0)
    assert isinstance(obj, MaskedAutoencoding) and not obj.classifies and obj.sampler is random_masking
    x, y = torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    a, logits = obj.train_loss(model, x, y, step=5)
    b, _ = obj.train_loss(model, x, y, step=5)
    c, _ = obj.train_loss(model, x, y, step=6)
    assert logits is None and a.item() == b.item() != c.item()
    m = obj.mask(4, 1, 5, 0, device=torch.device("cpu"))
    assert m.sum(1).tolist() == [12] * 4
    torch.testing.assert_close(a, model(x, mask=m).loss)
    other_rank = MaskedAutoencoding(16, 0.75, random_masking, seed=3, rank=1)
    assert not torch.equal(other_rank.mask(4, 1, 5, 1, device=torch.device("cpu")), m)
    sums = obj.eval_sums(model, x, y, 0) + obj.eval_sums(model, x, y, 1)
    metrics = obj.metrics(sums)
    assert metrics["images"] == 8 and obj.score(metrics) == -metrics["loss"]
    torch.testing.assert_close(obj.eval_sums(model, x, y, 0), obj.eval_sums(model, x, y, 0))  # same every epoch


def test_classification_objective_matches_cross_entropy_and_counts_topk():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 6)
    obj = Classification(6, label_smoothing=0.0)
    x, y = torch.randn(10, 8), torch.randint(0, 6, (10,))
    loss, logits = obj.train_loss(model, x, y, 0)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(model(x), y))
    m = obj.metrics(obj.eval_sums(model, x, y, 0))
    order = logits.argsort(1, descending=True)
    assert m["top1"] == pytest.approx(100 * (order[:, 0] == y).float().mean().item())
    assert m["top5"] == pytest.approx(100 * (order[:, :5] == y[:, None]).any(1).float().mean().item())
    assert obj.score(m) == m["top1"]


def test_mae_objective_needs_an_mae_model():
    with pytest.raises(ValueError, match="needs a CRATE-MAE model"):
        make_objective("mae", torch.nn.Linear(2, 2), 10, {}, 0, 0)
    with pytest.raises(ValueError, match="unknown objective"):
        make_objective("contrastive", torch.nn.Linear(2, 2), 10, {}, 0, 0)
