import pytest
import torch

import cratevit
from cratevit import CRATE, create_model, forward_flops
from cratevit.checkpoint import from_reference_keys, to_reference_keys
from cratevit.models import CRATEConfig
from cratevit.presets import PRESETS, classifier_presets
from reference_crate import ReferenceCRATE

EXACT_PARAMS = {"crate_tiny": 6_090_856, "crate_small": 13_116_328, "crate_base": 22_796_008, "crate_large": 77_641_192}


def small_kwargs(**kw):
    base = dict(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4, dim_head=16)
    base.update(kw)
    return base


def paired(**kw):
    """A reference model and a cratevit model holding the same weights."""
    ref = ReferenceCRATE(**small_kwargs(**kw)).eval()
    model = CRATE(**small_kwargs(**kw)).eval()
    model.load_state_dict(from_reference_keys(ref.state_dict()))
    return ref, model


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_exact_parameter_counts(name):
    assert create_model(name).num_params() == EXACT_PARAMS[name]


def test_readme_constructor_tiny():
    dim, n_heads, depth = 384, 6, 12
    model = CRATE(
        image_size=224, patch_size=16, num_classes=1000, dim=dim, depth=depth, heads=n_heads, dim_head=dim // n_heads
    )
    assert model.num_params() == EXACT_PARAMS["crate_tiny"]


@pytest.mark.parametrize("name", classifier_presets())
def test_every_preset_forward_shape(name):
    cfg = PRESETS[name]
    # small inputs keep the big presets quick: 2 x 2 patches
    size = (2 * cfg.patch_size[0], 2 * cfg.patch_size[1])
    model = create_model(name, image_size=size, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, cfg.channels, *size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_reference_names_resolve():
    assert create_model("CRATE_tiny").config == create_model("crate_tiny").config
    assert cratevit.get_config("CRATE-small").dim == 576
    with pytest.raises(ValueError, match="unknown CRATE preset 'crate_huge'"):
        create_model("crate_huge")


@pytest.mark.parametrize(
    "kw",
    [{}, {"pool": "mean"}, {"image_size": (32, 48), "patch_size": (8, 4)}, {"heads": 1, "dim_head": 64}, {"ista": 0.3}],
)
def test_fast_path_equals_reference_float32(kw):
    ref, model = paired(**kw)
    h, w = small_kwargs(**kw)["image_size"] if isinstance(kw.get("image_size"), tuple) else (32, 32)
    x = torch.randn(3, 3, h, w)
    with torch.no_grad():
        expected, got = ref(x), model(x)
    assert max_rel(got, expected) <= 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_both_attention_kernels_equal_reference(impl):
    ref, model = paired()
    for block in model.blocks:
        block.mssa.attn_impl = impl
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_rel(model(x), ref(x)) <= 1e-5


def test_fast_path_gradients_equal_reference():
    ref, model = paired()
    x = torch.randn(2, 3, 32, 32)
    ref(x).square().sum().backward()
    model(x).square().sum().backward()
    ref_grads = from_reference_keys({k: p.grad for k, p in ref.named_parameters()})
    for k, p in model.named_parameters():
        assert p.grad is not None, k
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-4, atol=1e-5)


def test_bfloat16_autocast_close_to_float32():
    _, model = paired()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x)
    assert half.dtype == torch.bfloat16
    assert max_rel(half.float(), full) < 0.05


def test_ista_is_one_proximal_step_without_outer_residual():
    model = CRATE(**small_kwargs(depth=1)).eval()
    block = model.blocks[0]
    z = torch.randn(2, 17, 64)
    x = block.norm2(z + block.mssa(block.norm1(z)))
    d = block.ista.dictionary
    expected = torch.relu(x + 0.1 * (x @ d - x @ d.T @ d) - 0.1 * 0.1)
    with torch.no_grad():
        torch.testing.assert_close(block(z), expected, rtol=1e-5, atol=1e-5)
        assert (block(z) >= 0).all()  # non-negative sparse code


def test_identity_out_projection_when_single_full_head():
    model = CRATE(**small_kwargs(heads=1, dim_head=64))
    assert isinstance(model.blocks[0].mssa.out_proj, torch.nn.Identity)


def test_trace_matches_forward_and_exposes_every_layer():
    ref, model = paired()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        trace = model.forward_trace(x)
        feats = model.forward_features(x)
        logits = model.forward_head(trace.features)
    assert len(trace.layers) == 2 and trace.grid_size == (4, 4)
    torch.testing.assert_close(trace.features, feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref(x), rtol=1e-5, atol=1e-5)
    for i, t in enumerate(trace.layers):
        assert t.proj.shape == (2, 4, 17, 16)
        assert t.attn.shape == (2, 4, 17, 17)
        torch.testing.assert_close(t.attn.sum(-1), torch.ones(2, 4, 17))
        assert t.z_half.shape == t.z_out.shape == (2, 17, 64)
        block = model.blocks[i]
        with torch.no_grad():
            # U_k^T LN(Z^l), and Z^{l+1} = ISTA(LN(Z^{l+1/2}))
            torch.testing.assert_close(t.proj, block.mssa.project(block.norm1(t.z_in)))
            torch.testing.assert_close(t.z_out, block.ista(block.norm2(t.z_half)))
    assert torch.equal(trace.layers[1].z_in, trace.layers[0].z_out)
    last = model.get_last_selfattention(x)
    torch.testing.assert_close(last, trace.layers[-1].attn)
    only_last = model.forward_trace(x, layers=[-1])
    assert len(only_last.layers) == 1


def test_forward_head_pre_logits_and_reset_classifier():
    model = CRATE(**small_kwargs()).eval()
    z = model.forward_features(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 17, 64)
    assert model.forward_head(z, pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(5)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 64)


def test_wrong_image_size_is_a_clear_error_unless_interpolating():
    model = CRATE(**small_kwargs()).eval()
    with pytest.raises(ValueError, match=r"expected 32x32 images, got 48x64.*dynamic_img_size"):
        model(torch.randn(1, 3, 48, 64))
    model.dynamic_img_size = True
    with torch.no_grad():
        out = model.forward_trace(torch.randn(1, 3, 48, 64))
    assert out.grid_size == (6, 8)
    assert out.features.shape == (1, 49, 64)
    # at the native size, interpolation is the identity
    x = torch.randn(1, 3, 32, 32)
    model.dynamic_img_size = False
    a = model(x)
    model.dynamic_img_size = True
    torch.testing.assert_close(model(x), a)


def test_bad_inputs_are_clear_errors():
    model = CRATE(**small_kwargs())
    with pytest.raises(ValueError, match="not divisible by the patch size 8x8"):
        model(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match="expected 3-channel images, got 1 channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expected a batch of images"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the patch width 7"):
        CRATE(image_size=32, patch_size=(8, 7))
    with pytest.raises(ValueError, match="pool must be"):
        CRATE(pool="max")


def test_flops_match_published_figures():
    tiny = cratevit.get_config("crate_tiny")
    assert forward_flops(tiny, ista_matmuls=3) / 1e9 == pytest.approx(4.32, abs=0.01)
    assert forward_flops(tiny) / 1e9 == pytest.approx(3.62, abs=0.01)
    assert forward_flops(cratevit.get_config("crate_small"), ista_matmuls=3) / 1e9 == pytest.approx(9.09, abs=0.01)


def test_config_round_trips_through_dict():
    cfg = CRATEConfig(image_size=(32, 48), patch_size=8, dim=64, heads=4, dim_head=16)
    assert CRATEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown CRATE config keys"):
        CRATEConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_key_converter_round_trips():
    ref = ReferenceCRATE(**small_kwargs())
    ours = from_reference_keys(ref.state_dict())
    assert set(ours) == set(CRATE(**small_kwargs()).state_dict())
    assert to_reference_keys(ours).keys() == ref.state_dict().keys()
