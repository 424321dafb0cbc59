"""Metrics of sparse codes on hand-made inputs: L0, FVE, dead/dense fractions, loss recovered, probe accuracy,
purity / monosemanticity, the shapes data's token attributes, and reading a CRATE layer's code and dictionary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cratevit import create_model
from cratevit.analysis.activations import ista_dictionary, layer_activations, logits_with_replaced
from cratevit.analysis.codes import (
    code_metrics,
    code_probe,
    dead_fraction,
    dense_fraction,
    feature_frequency,
    feature_purity,
    fraction_variance_explained,
    ista_reconstruction,
    l0,
    loss_recovered,
    monosemanticity,
    pool_codes,
    shapes_token_attributes,
)
from cratevit.data.shapes import ShapesDataset
from cratevit.errors import UserError


def test_l0_frequency_dead_and_dense_on_a_hand_made_code():
    codes = torch.zeros(20, 3)
    codes[0, 0] = 1.0  # feature 0 on 1/20 = 5% of tokens: neither dead nor dense
    codes[:3, 1] = 2.0  # feature 1 on 15%: dense (> 10%)
    # feature 2 never fires: dead
    assert l0(codes) == pytest.approx(4 / 20)
    torch.testing.assert_close(feature_frequency(codes), torch.tensor([0.05, 0.15, 0.0], dtype=torch.float64))
    assert dead_fraction(codes) == pytest.approx(1 / 3)
    assert dense_fraction(codes) == pytest.approx(1 / 3)
    assert dense_fraction(codes, above=0.01) == pytest.approx(2 / 3)
    assert l0(codes.reshape(4, 5, 3)) == l0(codes)  # any leading shape


def test_fraction_of_variance_explained_definition():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])  # mean 0, total variance 1+1+4+4 = 10
    assert fraction_variance_explained(x, x) == 1.0
    assert fraction_variance_explained(x, torch.zeros_like(x)) == pytest.approx(0.0)
    half = x.clone()
    half[2:, 1] = 0.0  # the error is 4 + 4 = 8 of 10
    assert fraction_variance_explained(x, half) == pytest.approx(0.2)
    assert fraction_variance_explained(x, -x) == pytest.approx(-3.0)  # worse than the mean
    with pytest.raises(UserError, match="differ in shape"):
        fraction_variance_explained(x, x[:2])
    with pytest.raises(UserError, match="do not vary"):
        fraction_variance_explained(torch.ones(3, 2), torch.ones(3, 2))


def test_code_metrics_bundle_and_ista_reconstruction():
    d = torch.eye(3)[:, [2, 0, 1]]  # a permutation dictionary: atom j is e_{perm(j)}
    code = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    x_hat = ista_reconstruction(code, d)
    torch.testing.assert_close(x_hat, code @ d.t())
    torch.testing.assert_close(x_hat[0], torch.tensor([0.0, 0.0, 1.0]))  # code 1 on atom 0 = e_2
    m = code_metrics(x_hat, code, x_hat)
    assert (m.l0, m.fve, m.dead_fraction, m.dense_fraction, m.tokens, m.features) == (0.75, 1.0, 0.0, 1.0, 4, 3)
    with pytest.raises(UserError, match="does not fit a dictionary"):
        ista_reconstruction(code[:, :2], d)


def test_loss_recovered_definition():
    assert loss_recovered(clean=1.0, zero=3.0, spliced=1.5) == pytest.approx(0.75)
    assert loss_recovered(clean=1.0, zero=3.0, spliced=1.0) == 1.0
    assert loss_recovered(clean=1.0, zero=3.0, spliced=4.0) == pytest.approx(-0.5)  # worse than zeros
    with pytest.raises(UserError, match="undefined"):
        loss_recovered(2.0, 2.0, 1.0)


def test_purity_and_monosemanticity_on_hand_made_tokens():
    attrs = {"shape": torch.tensor([0, 0, 1, 1, 1, 2]), "position": torch.tensor([0, 1, 0, 1, 0, 1])}
    codes = torch.zeros(6, 4)
    codes[[0, 1], 0] = torch.tensor([2.0, 1.0])  # shape 0 twice: shape purity 1; positions 0, 1: 0.5
    codes[[0, 2, 4], 1] = torch.tensor([3.0, 2.0, 1.0])  # shapes 0, 1, 1 -> 2/3; positions all 0 -> 1
    codes[5, 2] = 1.0  # one active token: purity 1 (top 3, only 1 active)
    purity = feature_purity(codes, attrs, top=3)
    torch.testing.assert_close(purity["shape"][:3], torch.tensor([1.0, 2 / 3, 1.0], dtype=torch.float64))
    torch.testing.assert_close(purity["position"][:3], torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64))
    assert math.isnan(purity["shape"][3])  # never active
    summary = monosemanticity(codes, attrs, top=3, min_active=2)  # features 0 and 1 qualify
    assert summary["features"] == 2
    assert summary["score"] == pytest.approx(1.0)  # each is pure in one attribute
    assert summary["shape"]["purity"] == pytest.approx((1 + 2 / 3) / 2)
    assert summary["shape"]["base_rate"] == pytest.approx(0.5)  # value 1 on 3 of 6 tokens
    # chance-adjusted (p - b) / (1 - b): shape b = 1/2, position b = 1/2 -> feature 0: (1, 0), feature 1: (1/3, 1)
    assert summary["shape"]["adjusted"] == pytest.approx((1 + 1 / 3) / 2)
    assert summary["position"]["adjusted"] == pytest.approx((0 + 1) / 2)
    assert summary["score_adjusted"] == pytest.approx(1.0)
    background = {"shape": torch.tensor([6, 6, 6, 0, 1, 2])}  # value 6 on half the tokens
    chance = torch.zeros(6, 1)
    chance[[0, 3], 0] = torch.tensor([2.0, 1.0])  # values 6 and 0: purity 1/2, the base rate: adjusted 0
    lazy = monosemanticity(chance, background, top=2, min_active=2)
    assert lazy["score"] == pytest.approx(0.5) and lazy["score_adjusted"] == pytest.approx(0.0)
    top1 = feature_purity(codes, attrs, top=1)
    assert float(top1["position"][0]) == 1.0  # its single top token
    with pytest.raises(UserError, match="one value per token"):
        feature_purity(codes, {"shape": torch.zeros(5, dtype=torch.long)})


def test_code_probe_reads_pooled_codes():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 2
    codes = torch.rand(40, 5, 8, generator=g)
    codes[:, 1:, 3] += 3.0 * labels[:, None]  # class 1 lights feature 3 on the patch tokens
    codes[:, 0, :] = 100.0 * torch.rand(40, 8, generator=g)  # a noisy prefix token that pooling must drop
    torch.testing.assert_close(pool_codes(codes, prefix=1), codes[:, 1:].mean(1))
    result = code_probe(codes[:30], labels[:30], codes[30:], labels[30:], prefix=1, l2_grid=(1e-3,))
    assert result.top1 == 100.0
    with pytest.raises(UserError, match="images, tokens, features"):
        pool_codes(codes[0])


def test_shapes_token_attributes_follow_the_ground_truth():
    ds = ShapesDataset("val", size=6, image_size=32)
    attrs = shapes_token_attributes(ds, [0, 4], (4, 4))
    assert {k: tuple(v.shape) for k, v in attrs.items()} == {"shape": (32,), "colour": (32,), "position": (32,)}
    for n, i in enumerate([0, 4]):
        image, label, mask = ds.sample(i)
        fg = mask.reshape(4, 8, 4, 8).mean(axis=(1, 3)).reshape(-1) >= 0.5
        shape = attrs["shape"][16 * n : 16 * (n + 1)].numpy()
        assert (shape[fg] == label).all() and (shape[~fg] == 6).all()
        assert fg.any() and (~fg).any()
        rgb = np.asarray(image, dtype=np.float64)[:8, :8].reshape(-1, 3).mean(0) / 255  # patch (0, 0)
        assert int(attrs["colour"][16 * n]) == 4 * (rgb[0] >= 0.5) + 2 * (rgb[1] >= 0.5) + (rgb[2] >= 0.5)
    assert attrs["position"][:16].tolist() == [0, 0, 1, 2, 0, 0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8]
    with pytest.raises(UserError, match="does not split"):
        shapes_token_attributes(ds, [0], (5, 5))


def test_layer_activations_are_the_trace_tensors_and_the_ista_code_is_the_layer_output():
    torch.manual_seed(0)
    model = create_model("crate_debug").eval()
    x = torch.randn(2, 3, 32, 32)
    acts = layer_activations(model, x, 1, ("z_in", "z_half", "ista_in", "code"))
    with torch.no_grad():
        trace = model.forward_trace(x)
        block = model.blocks[1]
    torch.testing.assert_close(acts["z_in"], trace.layers[1].z_in)
    torch.testing.assert_close(acts["ista_in"], block.norm2(trace.layers[1].z_half))
    torch.testing.assert_close(acts["code"], trace.layers[1].z_out)
    torch.testing.assert_close(acts["code"], block.ista(acts["ista_in"]))
    assert ista_dictionary(model, -1).shape == (32, 32)
    with pytest.raises(UserError, match="outside this 2-layer model"):
        layer_activations(model, x, 2)
    with pytest.raises(UserError, match="unknown activation site"):
        layer_activations(model, x, 0, ("mlp",))


def test_replacing_a_site_by_itself_keeps_the_logits_and_zeroing_the_code_changes_them():
    torch.manual_seed(0)
    model = create_model("crate_debug").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        clean = model(x)
    for site in ("z_in", "z_half", "ista_in", "code"):
        same = logits_with_replaced(model, x, 1, site, lambda t: t)
        torch.testing.assert_close(same, clean, rtol=1e-4, atol=1e-5)
    zeroed = logits_with_replaced(model, x, 0, "code", torch.zeros_like)
    with torch.no_grad():
        z = model.blocks[0](model.embed(x)[0])
        z[:, 1:] = 0.0  # the patch tokens' code; the class token keeps its own
        torch.testing.assert_close(zeroed, model.forward_head(model.blocks[1](z)))
    assert not torch.allclose(zeroed, clean)
