"""ToST: parity with the literal formulation (outputs and gradients), the official sizes, TSSA's statistics, the
causal operator, timm's model contract, and bad input."""

from __future__ import annotations

import pytest
import torch
from timm.models._manipulate import group_parameters

from cratevit.errors import UserError
from cratevit.models.reference_tost import ReferenceToST, naive_causal_tssa
from cratevit.models.tost import (
    TOST_PRESETS,
    CausalTSSA,
    ToST,
    ToSTConfig,
    causal_token_statistics_attention,
    from_official_keys,
    to_official_keys,
    token_statistics_attention,
    tost_preset,
)

# Parameter counts of the official constructors (tost_vision/tost.py, num_classes=1000), counted from the
# official module tree: ReferenceToST reproduces it (names and shapes), and ToST must have the same count.
OFFICIAL_PARAMS = {
    "tost_cab_tiny_12_p16": 5_769_328,
    "tost_cab_tiny_12_p8": 5_759_560,
    "tost_cab_tiny_24_p16": 10_223_008,
    "tost_cab_tiny_24_p8": 10_213_240,
    "tost_cab_small_12_p16": 22_589_944,
    "tost_cab_small_12_p8": 22_549_672,
    "tost_cab_small_24_p16": 40_344_664,
    "tost_cab_small_24_p8": 40_304_392,
    "tost_cab_medium_24_p16": 71_481_064,
    "tost_cab_medium_24_p8": 71_408_936,
    "tost_cab_large_24_p16": 160_286_920,
    "tost_cab_large_24_p8": 160_123_432,
}


def reference_of(cfg: ToSTConfig) -> ReferenceToST:
    return ReferenceToST(
        patch_size=cfg.patch_size[0],
        num_classes=cfg.num_classes,
        dim=cfg.dim,
        depth=cfg.depth,
        heads=cfg.heads,
        eta=cfg.eta,
        class_blocks=cfg.class_blocks,
        tokens_norm=cfg.tokens_norm,
        channels=cfg.channels,
    )


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and BatchNorm statistic random (LayerScale, temperatures and BN included), so that no
    part of the computation hides behind an initial value of 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(0.5 * torch.randn(t.shape, generator=g, dtype=t.dtype))
                if name.endswith("running_var"):
                    t.abs_().add_(0.5)
    return model


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_parameter_counts_equal_the_official_constructors(name):
    with torch.device("meta"):
        ours = ToST(config=tost_preset(name))
        ref = reference_of(tost_preset(name))
    assert ours.num_params() == OFFICIAL_PARAMS[name]
    assert sum(p.numel() for p in ref.parameters()) == OFFICIAL_PARAMS[name]
    # the key tables map the official module tree onto ours and back, one to one
    assert set(from_official_keys(ref.state_dict())) == set(ours.state_dict())
    assert set(to_official_keys(ours.state_dict())) == set(ref.state_dict())
    assert set(from_official_keys({"module." + k: v for k, v in ref.state_dict().items()})) == set(ours.state_dict())


def test_presets_follow_the_official_rules():
    for name in OFFICIAL_PARAMS:
        cfg = tost_preset(name)
        assert cfg.eta == (1.0 if cfg.depth == 12 else 1e-5)
        assert (cfg.class_blocks, cfg.tokens_norm, cfg.mlp_ratio, cfg.qkv_bias) == (2, True, 4.0, True)
        assert cfg.image_size == (224, 224) and cfg.num_classes == 1000
    assert tost_preset("tost_cab_small_12_p16").stem_widths == [48, 96, 192, 384]
    assert tost_preset("tost_cab_small_12_p8").stem_widths == [96, 192, 384]
    assert {"tost_digits", "tost_shapes"} <= set(TOST_PRESETS)
    with pytest.raises(UserError, match="unknown ToST preset"):
        tost_preset("tost_cab_medium_12_p16")  # named by the official README, not registered by its code


CASES = [
    {"patch_size": 16, "image_size": 64, "dim": 32, "depth": 2, "heads": 4},
    {"patch_size": 8, "image_size": (32, 48), "dim": 24, "depth": 3, "heads": 3, "eta": 1e-5},
    {"patch_size": 8, "image_size": 32, "dim": 16, "depth": 1, "heads": 2, "tokens_norm": False, "class_blocks": 1},
]


@pytest.mark.parametrize("case", CASES)
def test_fast_model_matches_the_literal_formulation(case):
    torch.manual_seed(0)
    cfg = ToSTConfig(num_classes=7, **case)
    ref = randomised(reference_of(cfg)).double()
    ours = ToST(config=cfg).double()
    ours.load_state_dict(from_official_keys(ref.state_dict()), strict=True)
    x = torch.randn(3, 3, *cfg.image_size, dtype=torch.float64)
    for train in (False, True):  # eval: BatchNorm's running statistics; train: the batch's
        ref.train(train)
        ours.train(train)
        a, b = ref(x), ours(x)
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
        ga = torch.autograd.grad(a.square().sum(), list(ref.parameters()))
        gb = dict(
            zip(
                [n for n, _ in ours.named_parameters()],
                torch.autograd.grad(b.square().sum(), list(ours.parameters())),
                strict=True,
            )
        )
        ref_names = [n for n, _ in ref.named_parameters()]
        mapped = from_official_keys(dict(zip(ref_names, ga, strict=True)))
        assert set(mapped) == set(gb)
        for k, g in mapped.items():
            torch.testing.assert_close(gb[k], g, rtol=1e-8, atol=1e-10, msg=k)
    # and in float32 (the fast path's own operation order)
    ref.float().eval()
    ours.float().eval()
    torch.testing.assert_close(ours(x.float()), ref(x.float()), rtol=1e-4, atol=1e-4)


def test_tssa_statistics_are_the_equations():
    torch.manual_seed(1)
    b, n, h, p = 2, 10, 3, 4
    w = torch.randn(b, n, h, p, dtype=torch.float64)
    tau = torch.rand(h, 1, dtype=torch.float64) + 0.5
    out, pi, s = token_statistics_attention(w, tau)
    # Pi: softmax over heads of tau_k * sum_j (w_ij / ||w_:j||)^2
    energy = (w**2 / (w**2).sum(dim=1, keepdim=True)).sum(-1) * tau.view(1, 1, h)
    torch.testing.assert_close(pi, torch.softmax(energy, dim=2))
    torch.testing.assert_close(pi.sum(dim=2), torch.ones(b, n, dtype=torch.float64))
    # s_k: the Pi-weighted mean of w^2 over the tokens
    for k in range(h):
        weights = pi[:, :, k] / (pi[:, :, k].sum(1, keepdim=True) + 1e-8)
        torch.testing.assert_close(s[:, k], (weights.unsqueeze(-1) * w[:, :, k] ** 2).sum(1))
    torch.testing.assert_close(out, -(w * pi.unsqueeze(-1)) / (1 + s.unsqueeze(1)))
    # statistics of the token set: permuting the tokens permutes the output and leaves s unchanged
    perm = torch.randperm(n)
    out2, _, s2 = token_statistics_attention(w[:, perm], tau)
    torch.testing.assert_close(s2, s)
    torch.testing.assert_close(out2, out[:, perm])


def test_causal_tssa_matches_a_per_position_loop():
    torch.manual_seed(2)
    w = torch.randn(2, 3, 9, 5, dtype=torch.float64, requires_grad=True)
    tau = torch.randn(3, 1, dtype=torch.float64)
    bias = 0.3 * torch.randn(3, 12, 1, dtype=torch.float64)
    fast, pi = causal_token_statistics_attention(w, tau, bias)
    slow, pi_slow = naive_causal_tssa(w, tau, bias)
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(pi, pi_slow)
    g_fast = torch.autograd.grad(fast.sum(), w)[0]
    g_slow = torch.autograd.grad(slow.sum(), w)[0]
    torch.testing.assert_close(g_fast, g_slow)
    # causal: the first 4 outputs do not depend on later tokens
    w2 = w.detach().clone()
    w2[:, :, 4:] = torch.randn_like(w2[:, :, 4:])
    torch.testing.assert_close(causal_token_statistics_attention(w2, tau, bias)[0][:, :, :4], fast.detach()[:, :, :4])


def test_causal_tssa_module_and_its_context_limit():
    torch.manual_seed(3)
    attn = CausalTSSA(dim=16, heads=4, context=8)
    assert attn(torch.randn(2, 8, 16)).shape == (2, 8, 16)
    assert attn(torch.randn(2, 3, 16)).shape == (2, 3, 16)
    with pytest.raises(UserError, match="longer than the 8-token context") as err:
        attn(torch.randn(1, 9, 16))
    assert "\n" not in str(err.value)


def small(**kw) -> ToST:
    torch.manual_seed(0)
    return ToST(config=tost_preset("tost_debug", **kw))


def test_timm_contract():
    model = small()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1 + 16, 32)
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model.get_classifier() is model.head
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 0])
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)
    model.reset_classifier(5, global_pool="avg")
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 1:].mean(1))
    assert model(x).shape == (2, 5) and model.config.num_classes == 5
    names = {n for n, _ in model.named_parameters()}
    assert model.no_weight_decay() <= names
    groups = group_parameters(model, model.group_matcher())
    assert sorted(n for g in groups.values() for n in g) == sorted(names)
    assert model.pretrained_cfg["first_conv"] + ".weight" in names


def test_forward_intermediates_and_trace_agree():
    model = small().eval()
    x = torch.randn(2, 3, 32, 48)  # any multiple of the patch: the Fourier encoding exists for every grid
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert [t.shape for t in inter] == [(2, 32, 4, 6)] * 2
    trace = model.forward_trace(x)
    torch.testing.assert_close(trace.features, final)
    assert trace.grid_size == (4, 6)
    last = trace.layers[-1]
    torch.testing.assert_close(inter[-1].flatten(2).transpose(1, 2), last.z_out)
    assert last.membership.shape == (2, 2, 24) and last.second_moment.shape == (2, 2, 16)
    torch.testing.assert_close(last.membership.sum(1), torch.ones(2, 24))
    assert len(trace.class_attention) == 2 and trace.class_attention[0].shape == (2, 2, 25)
    torch.testing.assert_close(trace.class_attention[0].sum(-1), torch.ones(2, 2))
    only = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(only[0], trace.layers[0].z_out)
    assert len(model.forward_trace(x, layers=[-1]).layers) == 1


def test_grad_checkpointing_gives_the_same_gradients():
    model = small().train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    g1 = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    model.set_grad_checkpointing(True)
    g2 = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


def test_prune_intermediate_layers():
    model = small()
    assert model.prune_intermediate_layers([0]) == [0]
    assert len(model.blocks) == 1 and model.config.depth == 1
    out = model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=1, intermediates_only=True)
    assert out[0].shape == (1, 32, 4, 4)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1, 3, 30, 32), "not a multiple of 8, which ToST's stride-2 convolutional stem requires"),
        ((1, 1, 32, 32), "expected 3-channel images"),
        ((3, 32, 32), "expected a batch of images"),
    ],
)
def test_bad_images_get_one_line(shape, match):
    with pytest.raises(UserError, match=match) as err:
        small()(torch.randn(*shape))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"patch_size": 12}, "square power-of-two patch"),
        ({"image_size": 36}, "not a multiple of the patch size 8"),
        ({"dim": 30, "heads": 4}, "not divisible by heads"),
        ({"pool": "max"}, "pool must be"),
    ],
)
def test_bad_configs_get_one_line(changes, match):
    with pytest.raises(UserError, match=match):
        tost_preset("tost_debug", **changes)
    with pytest.raises(UserError, match="unknown ToST config keys"):
        ToSTConfig.from_dict({"dim": 32, "mlp_dim": 4})
    cfg = tost_preset("tost_digits")
    assert ToSTConfig.from_dict(cfg.to_dict()) == cfg


def test_memory_lean_backward_equals_autograd_of_the_equations():
    from cratevit.models.tost import tssa_output

    torch.manual_seed(4)
    w = torch.randn(2, 7, 3, 4, dtype=torch.float64, requires_grad=True)
    tau = (torch.rand(3, 1, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(tssa_output, (w, tau))
    fast, plain = tssa_output(w, tau), token_statistics_attention(w, tau)[0]
    torch.testing.assert_close(fast, plain)
    g = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad(fast, (w, tau), g), torch.autograd.grad(plain, (w, tau), g), strict=True):
        torch.testing.assert_close(a, b)
    # a column that is zero over all tokens (the clamp of the normalisation) gives finite gradients
    w0 = w.detach().clone()
    w0[:, :, :, 1] = 0
    w0.requires_grad_()
    (gw,) = torch.autograd.grad(tssa_output(w0, tau).sum(), (w0,))
    assert torch.isfinite(gw).all()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_fx_feature_extraction_and_torchscript():
    """timm's contract checks, ahead of registration: the torch.fx feature extractor (eval output identical; the
    training graph gives every parameter a gradient) and torch.jit.script (TorchScript runs the plain TSSA)."""
    import timm

    from tests.interop.test_timm_contract import create_fx_model

    model = small().eval()
    x = torch.randn(2, 3, 32, 48)
    out = model(x)
    assert torch.equal(torch.cat(tuple(create_fx_model(model)(x).values())), out)
    fx_train = create_fx_model(small().train(), train=True)
    torch.cat(tuple(fx_train(x).values())).sum().backward()
    assert all(p.grad is not None for p in fx_train.parameters())
    with timm.layers.set_scriptable(True):
        scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), out, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="not a multiple of 8"):
        scripted(torch.randn(1, 3, 30, 32))
