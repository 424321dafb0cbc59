"""Hook points (cratevit.analysis.hooks): names, run_with_cache equal to every family's trace API, replace hooks,
activation patching, and no hook left behind."""

from __future__ import annotations

import pytest
import timm
import torch

from cratevit import create_model
from cratevit.analysis.hooks import (
    DECODER_POINTS,
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


def test_sae_layers_count_as_the_analysis_does_and_class_blocks_are_one_line():
    from cratevit.analysis.activations import site_hook
    from cratevit.registry import layer_count

    tost = ToST(config=tost_preset("tost_debug")).eval()
    depth, total = len(tost.blocks), layer_count(tost)
    assert total == depth + len(tost.class_blocks) > depth  # as attention/pca/explore number them
    assert site_hook(tost, depth - 1, "z_in") == site_hook(tost, depth - 1 - total, "z_in") == f"blocks.{depth - 1}.in"
    for layer in (depth, -1):  # a class-attention block: named, with the range that works
        with pytest.raises(UserError, match=rf"class_blocks\.\d.*pass --layer {depth - 1} \(the last of them\)"):
            site_hook(tost, layer, "ista_in")
    with pytest.raises(UserError, match=f"outside this {total}-layer model"):
        site_hook(tost, total, "ista_in")


# ------------------------------------------------------------------- CRATE-MAE's decoder and ToST's class blocks
def _mae() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("mae_crate_digits").eval()


def _tost(**changes) -> ToST:
    torch.manual_seed(0)
    model = ToST(config=tost_preset("tost_debug").replace(**changes)).eval()
    with torch.no_grad():  # LayerScale away from its 0.1 init, so that the class blocks matter in the logits
        for block in model.class_blocks:
            block.gamma_attn.fill_(1.0)
            block.gamma_mlp.fill_(1.0)
    return model


def test_names_of_the_decoder_and_the_class_blocks():
    mae, tost = _mae(), _tost()
    names = hook_names(mae)
    encoder = [n for n in names if n.startswith("blocks.")]
    assert names[: len(encoder)] == encoder  # the encoder first, then the decoder: the order of the forward pass
    assert names[len(encoder) :] == [
        f"decoder_blocks.{i}.{p}" for i in range(len(mae.decoder_blocks)) for p in DECODER_POINTS
    ]
    assert list(DECODER_POINTS) == [
        "in", "norm1", "dictionary.out", "mid", "norm2", "mssa.proj", "mssa.pattern", "mssa.out", "out"
    ]  # fmt: skip
    assert [n for n in hook_names(tost) if n.startswith("class_blocks.1.")] == [
        f"class_blocks.1.{p}"
        for p in ("in", "norm1", "attn.proj", "attn.pattern", "attn.out", "mid", "norm2", "mlp.out", "out")
    ]
    assert "dictionary.out" in HOOK_POINTS
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(
        UserError, match=r"unknown hook name 'decoder_blocks\.3\.out'.*decoder_blocks\.L\.POINT with L in 0\.\.2"
    ):
        run_with_cache(mae, x, ["decoder_blocks.3.out"])
    with pytest.raises(UserError, match=r"unknown hook name 'decoder_blocks\.0\.ista\.code'"):
        run_with_cache(mae, x, ["decoder_blocks.0.ista.code"])
    with pytest.raises(UserError, match=r"unknown hook name 'class_blocks\.0\.mssa\.out'.*class_blocks\.L\.POINT"):
        run_with_cache(tost, x, ["class_blocks.0.mssa.out"])
    with pytest.raises(UserError, match=r"unknown hook name 'class_blocks\.0\.out'; names are blocks\.L\.POINT"):
        run_with_cache(create_model("crate_debug"), x, ["class_blocks.0.out"])  # CRATE has no class blocks
    assert _no_hooks(mae) and _no_hooks(tost)


def test_cache_equals_the_decoder_trace_of_crate_mae():
    mae = _mae()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, mae.config.num_patches, dtype=torch.bool)
    out, cache = run_with_cache(mae, x, mask=mask)  # every block explicit, as the trace (the encoder included)
    assert list(cache) == hook_names(mae)
    trace = mae.forward_trace(x)  # nothing masked, as the pass above
    assert len(trace.decoder) == 3 and torch.equal(out.pred, trace.pred)
    assert torch.equal(cache["decoder_blocks.0.in"], trace.latent)  # the encoder's output after its norm
    for i, (t, block) in enumerate(zip(trace.decoder, mae.decoder_blocks, strict=True)):
        at = {p: cache[f"decoder_blocks.{i}.{p}"] for p in DECODER_POINTS}
        expected = {"in": t.z_in, "dictionary.out": t.z_half, "mid": t.z_half, "out": t.z_out}
        expected |= {"mssa.proj": t.proj, "mssa.pattern": t.attn}
        for point, tensor in expected.items():
            assert torch.equal(at[point], tensor), (i, point)
        assert torch.equal(at["norm1"], block.norm1(t.z_in))
        assert torch.equal(at["dictionary.out"], at["norm1"] @ block.dictionary.T)  # LN1(Z^l) D^T
        assert torch.equal(at["norm2"], block.norm2(t.z_half))
        assert torch.equal(at["mssa.out"], block.mssa.trace(at["norm2"])[0])
        assert torch.equal(at["out"], at["mid"] - at["mssa.out"])  # the compression step undone
        n = 1 + mae.config.num_patches
        assert at["mssa.pattern"].shape == (2, mae.config.decoder_heads, n, n)
    assert _no_hooks(mae)


def test_cache_equals_the_class_block_trace_of_tost():
    tost = _tost()
    x = torch.randn(2, 3, 32, 32)
    out, cache = run_with_cache(tost, x)
    assert torch.equal(out, tost(x))
    trace, layers = tost.forward_trace(x), tost.trace_layers(x)
    depth, n = len(tost.blocks), 1 + 16  # the class token, 4 x 4 patches
    assert torch.equal(cache["class_blocks.0.in"][:, 1:], cache[f"blocks.{depth - 1}.out"])
    assert torch.equal(cache["class_blocks.0.in"][:, :1], tost.cls_token.expand(2, -1, -1))
    for j, block in enumerate(tost.class_blocks):
        at = {p: cache[f"class_blocks.{j}.{p}"] for p in block_points(block)}
        t = layers.layers[depth + j]
        assert t.kind == "class-attention"
        for point, tensor in {"in": t.z_in, "mid": t.z_half, "out": t.z_out}.items():
            assert torch.equal(at[point], tensor), (j, point)
        assert at["attn.pattern"].shape == (2, 2, 1, n)  # the class token's row only
        assert torch.equal(at["attn.pattern"].squeeze(2), trace.class_attention[j])
        torch.testing.assert_close(at["attn.proj"], t.proj, atol=1e-6, rtol=1e-6)  # the keys of LN1(x)
        assert torch.equal(at["norm1"], block.norm1(at["in"]))
        assert torch.equal(at["attn.out"][:, 1:], at["norm1"][:, 1:])  # the patch tokens pass the attention as LN1(x)
        assert torch.equal(at["mid"], at["in"] + block.gamma_attn * at["attn.out"])
        assert torch.equal(at["norm2"], block.norm2(at["mid"]))  # tokens_norm: every token
        assert at["mlp.out"].shape == (2, 1, 32) and torch.equal(at["mlp.out"], block.mlp(at["norm2"][:, :1]))
        assert torch.equal(at["out"][:, 1:], 2 * at["norm2"][:, 1:])  # XCiT's literal update of the patch tokens
    assert torch.equal(tost.norm(cache[f"class_blocks.{len(tost.class_blocks) - 1}.out"]), trace.features)
    assert _no_hooks(tost)


def test_a_class_block_without_tokens_norm_normalises_the_class_token_only():
    tost = _tost(tokens_norm=False)
    x = torch.randn(2, 3, 32, 32)
    out, cache = run_with_cache(tost, x, ["class_blocks.0.mid", "class_blocks.0.norm2"])
    assert torch.equal(out, tost(x))
    assert torch.equal(cache["class_blocks.0.norm2"][:, 1:], cache["class_blocks.0.mid"][:, 1:])
    assert not torch.allclose(cache["class_blocks.0.norm2"][:, :1], cache["class_blocks.0.mid"][:, :1])


@pytest.mark.parametrize("which", ["mae", "tost"])
def test_replacing_each_new_point_with_itself_leaves_the_output(which):
    model = _mae() if which == "mae" else _tost()
    x = torch.randn(2, 3, 32, 32)
    kwargs = {"mask": torch.zeros(2, model.config.num_patches, dtype=torch.bool)} if which == "mae" else {}

    def run(fns: dict) -> torch.Tensor:
        with hooks(model, fns):
            out = model(x, **kwargs)
        return out.pred if which == "mae" else out

    plain = run({})
    new = [n for n in hook_names(model) if n.startswith(("decoder_blocks.", "class_blocks."))]
    assert len(new) == (27 if which == "mae" else 18)
    for name in new:
        read = run({name: lambda a, _n: None})  # the hooked block, recomputed by its explicit step
        assert torch.equal(run({name: lambda a, _n: a.clone()}), read), name  # a new tensor of the same values
        # vs the fast forward: bit-equal for ToST's class blocks; the decoder's fused attention within float error
        torch.testing.assert_close(read, plain, atol=1e-5, rtol=1e-5, msg=name)
        if which == "tost":
            assert torch.equal(read, plain), name
    every = run(dict.fromkeys(new, lambda a, _n: a.clone()))  # every point at once
    torch.testing.assert_close(every, plain, atol=1e-5, rtol=1e-5)
    assert _no_hooks(model)


def test_replacing_decoder_and_class_block_points_changes_what_they_feed():
    mae, tost = _mae(), _tost()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, mae.config.num_patches, dtype=torch.bool)
    plain = mae(x, mask=mask).pred
    zero = {"decoder_blocks.2.dictionary.out": lambda a, _n: torch.zeros_like(a)}
    out, cache = run_with_cache(mae, x, ["decoder_blocks.2.mid", "decoder_blocks.2.out"], fwd_hooks=zero, mask=mask)
    assert torch.equal(cache["decoder_blocks.2.mid"], torch.zeros_like(cache["decoder_blocks.2.mid"]))
    # LN of a zero row is its bias (0 at init): MSSA of zeros is the output projection's bias, and Z^{l+1} its negative
    expected = -mae.decoder_blocks[2].mssa.out_proj.bias.expand_as(cache["decoder_blocks.2.out"])
    torch.testing.assert_close(cache["decoder_blocks.2.out"], expected)
    assert (out.pred - plain).abs().max() > 1e-3
    # the class token attends uniformly: its attended value is the mean of every token's value
    with torch.no_grad():  # queries and keys 20x larger: a peaked attention at random weights
        tost.class_blocks[0].attn.qkv.weight[: 2 * 32].mul_(20.0)
    uniform = {"class_blocks.0.attn.pattern": lambda a, _n: torch.full_like(a, 1.0 / a.shape[-1])}
    _, peaked = run_with_cache(tost, x, ["class_blocks.0.attn.pattern"])
    assert peaked["class_blocks.0.attn.pattern"].max() > 0.2  # 17 tokens: uniform would be 1/17
    logits, cache = run_with_cache(tost, x, ["class_blocks.0.norm1", "class_blocks.0.attn.out"], fwd_hooks=uniform)
    m, c = tost.class_blocks[0].attn, 32
    v = torch.nn.functional.linear(cache["class_blocks.0.norm1"], m.qkv.weight[2 * c :], m.qkv.bias[2 * c :])
    torch.testing.assert_close(cache["class_blocks.0.attn.out"][:, 0], m.out_proj(v.mean(dim=1)), atol=1e-6, rtol=1e-5)
    assert (logits - tost(x)).abs().max() > 1e-4
    wrong = {"class_blocks.1.mlp.out": lambda a, _n: a.expand(-1, 17, -1)}
    with (
        pytest.raises(UserError, match=r"class_blocks\.1\.mlp\.out returned \(2, 17, 32\).*\(2, 1, 32\)"),
        hooks(tost, wrong),
    ):
        tost(x)
    assert _no_hooks(mae) and _no_hooks(tost)


def test_patching_a_decoder_block_restores_the_clean_reconstruction():
    mae = _mae()
    clean, corrupted = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, mae.config.num_patches, dtype=torch.bool)
    names = ["decoder_blocks.2.out", "decoder_blocks.0.in", "decoder_blocks.1.mid", "decoder_blocks.1.mssa.out"]
    result = activation_patching(mae, clean, corrupted, names, mask=mask)
    assert result.clean.shape == (2, mae.config.num_patches, mae.config.patch_dim)  # the reconstruction
    assert torch.equal(result.patched["decoder_blocks.2.out"], result.clean)
    assert result.restored["decoder_blocks.2.out"] == 1.0
    assert result.restored["decoder_blocks.0.in"] == pytest.approx(1.0, abs=1e-5)  # the whole latent
    assert result.restored["decoder_blocks.1.mid"] == pytest.approx(1.0, abs=1e-5)  # the whole residual
    assert result.restored["decoder_blocks.1.mssa.out"] < 1.0 - 1e-3  # one branch: part of the way
    assert _no_hooks(mae)


def test_patching_a_class_block_restores_the_clean_logits():
    tost = _tost()
    clean, corrupted = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    result = activation_patching(tost, clean, corrupted, ["class_blocks.1.out", "class_blocks.0.in"])
    assert not torch.allclose(result.clean, result.corrupted)
    assert torch.equal(result.patched["class_blocks.1.out"], result.clean)
    assert result.restored["class_blocks.1.out"] == 1.0
    assert result.restored["class_blocks.0.in"] == pytest.approx(1.0, abs=1e-5)
    # the logits read the class token alone (pool "cls"), after a per-token LayerNorm: its row is all they see
    cls_only = activation_patching(tost, clean, corrupted, ["class_blocks.1.out"], positions=[0])
    assert cls_only.restored["class_blocks.1.out"] == 1.0
    patch_only = activation_patching(tost, clean, corrupted, ["class_blocks.1.out"], positions=[1, 2])
    assert torch.equal(patch_only.patched["class_blocks.1.out"], patch_only.corrupted)
    with pytest.raises(UserError, match=r"positions \[3\] do not all lie among the 1 token\(s\) of class_blocks"):
        activation_patching(tost, clean, corrupted, ["class_blocks.0.mlp.out"], positions=[3])
    assert _no_hooks(tost)
