"""Hook points (cratevit.analysis.hooks): names, run_with_cache equal to every family's trace API, replace hooks,
activation patching, and no hook left behind."""

from __future__ import annotations

import pytest
import timm
import torch

from cratevit import create_model
from cratevit.analysis.hooks import (
    HOOK_POINTS,
    activation_patching,
    block_points,
    hook_names,
    hooks,
    run_with_cache,
)
from cratevit.analysis.inspection import TimmViTFamily
from cratevit.errors import UserError
from cratevit.models.tost import ToST, tost_preset

WHITE_BOX = [
    "crate_debug",
    "crate_mlp_digits",
    "crate_mhsa_digits",
    "crate_vit_digits",
    "crate_mssa_only_digits",
    "crate_alpha_debug",
    "mae_crate_digits",
]


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _forward_kwargs(model: torch.nn.Module, x: torch.Tensor) -> dict:
    if hasattr(model, "decoder_blocks"):  # an autoencoder: nothing masked, as its forward_trace
        return {"mask": torch.zeros(x.shape[0], model.config.num_patches, dtype=torch.bool)}
    return {}


def _timm_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10
    ).eval()


@pytest.mark.parametrize("preset", WHITE_BOX)
def test_cache_equals_the_trace_of_every_white_box_family(preset):
    torch.manual_seed(0)
    model = create_model(preset).eval()
    x = torch.randn(2, 3, 32, 32)
    _, cache = run_with_cache(model, x, **_forward_kwargs(model, x))
    assert list(cache) == hook_names(model)
    trace = model.forward_trace(x)
    for i, t in enumerate(trace.layers):
        att = "mssa" if hasattr(model.blocks[i], "mssa") else "attn"
        expected = {"in": t.z_in, "mid": t.z_half, "out": t.z_out, f"{att}.proj": t.proj, f"{att}.pattern": t.attn}
        if t.code is not None:
            expected["ista.code"] = t.code  # CRATE-alpha's A_2
        elif hasattr(model.blocks[i], "ista"):
            expected["ista.code"] = t.z_out  # CRATE: the code is the layer's output
        for point, tensor in expected.items():
            assert torch.equal(cache[f"blocks.{i}.{point}"], tensor), (preset, i, point)
        assert torch.equal(cache[f"blocks.{i}.norm1"], model.blocks[i].norm1(t.z_in))
    assert _no_hooks(model)


def test_cache_equals_the_trace_of_tost():
    torch.manual_seed(0)
    model = ToST(config=tost_preset("tost_debug")).eval()
    x = torch.randn(2, 3, 32, 32)
    out, cache = run_with_cache(model, x)
    trace = model.forward_trace(x)
    for i, t in enumerate(trace.layers):
        for point, tensor in {"in": t.z_in, "mid": t.z_half, "out": t.z_out, "tssa.proj": t.proj}.items():
            assert torch.equal(cache[f"blocks.{i}.{point}"], tensor), (i, point)
        assert torch.equal(cache[f"blocks.{i}.tssa.membership"], t.membership)
    assert torch.equal(out, model(x))
    with pytest.raises(UserError, match="read-only"), hooks(model, {"blocks.0.tssa.proj": lambda a, n: a * 2}):
        model(x)
    assert _no_hooks(model)


def test_cache_equals_a_timm_vit_s_own_readings():
    model = _timm_vit()
    x = torch.randn(2, 3, 32, 32)
    out, cache = run_with_cache(model, x)
    inspection = TimmViTFamily().inspect(model, x)  # timm's modules read with forward hooks, explicit softmax
    for i, layer in enumerate(inspection.layers):
        assert torch.equal(cache[f"blocks.{i}.attn.pattern"], layer.attn)
        assert torch.equal(cache[f"blocks.{i}.out"], layer.facets["token"])
        assert torch.equal(cache[f"blocks.{i}.mid"], layer.facets["attn"])
    feats = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)  # timm's fused kernel
    for i, f in enumerate(feats):
        torch.testing.assert_close(cache[f"blocks.{i}.out"][:, 1:], f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
    assert _no_hooks(model)


def test_names_are_documented_and_checked():
    model = create_model("crate_debug")
    names = hook_names(model)
    assert names[:3] == ["blocks.0.in", "blocks.0.norm1", "blocks.0.mssa.proj"]
    assert "blocks.1.ista.code" in names and names[-1] == "blocks.1.out"
    documented = {p.replace("ATT.", "") for p in HOOK_POINTS}
    for point in block_points(model.blocks[0]) + block_points(_timm_vit().blocks[0]):
        assert point.split(".")[-1] in documented or point in HOOK_POINTS
    with pytest.raises(UserError, match=r"unknown hook name 'blocks.2.out'.*0\.\.1 \(block index, 0-based\)"):
        run_with_cache(model, torch.randn(1, 3, 32, 32), ["blocks.2.out"])
    with pytest.raises(UserError, match=r"unknown hook name 'blocks\.0\.mlp\.out'"):
        run_with_cache(model, torch.randn(1, 3, 32, 32), ["blocks.0.mlp.out"])


def test_a_replace_hook_changes_the_output_and_is_removed_after():
    torch.manual_seed(0)
    model = create_model("crate_debug").eval()
    x = torch.randn(2, 3, 32, 32)
    plain = model(x)
    assert _no_hooks(model)
    with hooks(model, {"blocks.0.ista.code": lambda a, name: torch.zeros_like(a)}):
        assert model.blocks[0]._forward_hooks  # registered inside the context only
        edited = model(x)
    assert (edited - plain).abs().max() > 1e-3
    assert _no_hooks(model)
    assert torch.equal(model(x), plain)
    with hooks(model, {"blocks.1.mid": lambda a, name: None}):  # a reading hook changes nothing
        torch.testing.assert_close(model(x), plain, atol=1e-6, rtol=1e-6)
    with pytest.raises(UserError, match="returned"), hooks(model, {"blocks.0.out": lambda a, n: a[:, 1:]}):
        model(x)
    assert _no_hooks(model)  # removed after an error too


def test_replacing_the_pattern_steers_the_attention_output():
    torch.manual_seed(0)
    model = create_model("crate_debug").eval()
    x = torch.randn(2, 3, 32, 32)
    uniform = lambda a, name: torch.full_like(a, 1.0 / a.shape[-1])
    _, cache = run_with_cache(model, x, ["blocks.0.mssa.proj"])
    _, patched = run_with_cache(model, x, ["blocks.0.mssa.out"], fwd_hooks={"blocks.0.mssa.pattern": uniform})
    with hooks(model, {"blocks.0.mssa.pattern": uniform}), pytest.raises(UserError, match="do not nest"):
        run_with_cache(model, x, ["blocks.0.mssa.out"])
    assert _no_hooks(model)
    # every token attends equally: each head's output is the mean of its coordinates, the same for every token
    out = patched["blocks.0.mssa.out"]
    assert torch.allclose(out, out[:, :1].expand_as(out), atol=1e-5)
    assert not torch.allclose(cache["blocks.0.mssa.proj"][:, :, 0], cache["blocks.0.mssa.proj"][:, :, 1])


@pytest.mark.parametrize("preset", ["crate_debug", "crate_alpha_debug", "crate_vit_digits"])
def test_patching_the_last_residual_restores_the_clean_logits(preset):
    torch.manual_seed(0)
    model = create_model(preset).eval()
    clean, corrupted = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    last = len(model.blocks) - 1
    result = activation_patching(model, clean, corrupted, [f"blocks.{last}.out", "blocks.0.in"])
    assert torch.equal(result.patched[f"blocks.{last}.out"], result.clean)
    assert result.restored[f"blocks.{last}.out"] == 1.0
    assert not torch.allclose(result.clean, result.corrupted)
    assert result.restored["blocks.0.in"] == pytest.approx(1.0, abs=1e-5)  # the whole input, patched
    one = activation_patching(model, clean, corrupted, ["blocks.0.in"], positions=[1])
    assert 0.0 < abs(one.restored["blocks.0.in"]) < 1.0  # one patch token of the input: part of the way
    assert _no_hooks(model)


def test_patching_a_timm_vit_and_an_autoencoder_s_reconstruction():
    model = _timm_vit()
    clean, corrupted = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    result = activation_patching(model, clean, corrupted, ["blocks.1.out"])
    assert torch.equal(result.patched["blocks.1.out"], result.clean)
    torch.manual_seed(0)
    mae = create_model("mae_crate_digits").eval()
    mask = torch.zeros(2, mae.config.num_patches, dtype=torch.bool)
    result = activation_patching(mae, clean, corrupted, [f"blocks.{len(mae.blocks) - 1}.out"], mask=mask)
    assert result.clean.shape == (2, mae.config.num_patches, mae.config.patch_dim)  # the reconstruction
    assert torch.equal(result.patched[f"blocks.{len(mae.blocks) - 1}.out"], result.clean)


def test_layer_activations_read_a_timm_vit_and_tost_through_the_hooks():
    from cratevit.analysis.activations import layer_activations, logits_with_replaced, prefix_tokens

    vit = _timm_vit()
    x = torch.randn(2, 3, 32, 32)
    acts = layer_activations(vit, x, 1, ("z_in", "z_half", "ista_in"))
    _, cache = run_with_cache(vit, x, ["blocks.1.in", "blocks.1.mid", "blocks.1.norm2"])
    assert torch.equal(acts["ista_in"], cache["blocks.1.norm2"]) and torch.equal(acts["z_half"], cache["blocks.1.mid"])
    with pytest.raises(UserError, match="has no code"):
        layer_activations(vit, x, 0, ("code",))
    same = logits_with_replaced(vit, x, 0, "ista_in", lambda t: t)
    torch.testing.assert_close(same, vit(x), atol=1e-5, rtol=1e-5)
    tost = ToST(config=tost_preset("tost_debug")).eval()
    assert prefix_tokens(tost) == 0 and prefix_tokens(vit) == 1
    assert layer_activations(tost, x, 0)["ista_in"].shape == (2, 16, 32)  # 4x4 patches, no class token
