"""CRATE-MAE: the fast model against the literal formulation, masking, positional table, traces, presets."""

from __future__ import annotations

import pytest
import torch

from cratevit.models import CRATE, WhiteBoxBackbone
from cratevit.models.crate_mae import (
    AUTOENCODER_ONLY_KEYS,
    CRATEMAE,
    ENCODER_TO_CLASSIFIER,
    MAE_PRESETS,
    CRATEMAEConfig,
    crate_classifier_from_mae,
    mae_crate_base,
    masked_mse,
    patchify,
    random_masking,
    sincos_pos_embed_2d,
    unpatchify,
)
from reference_crate_mae import ReferenceCRATEMAE, sincos_2d_numpy

TINY = dict(
    image_size=32,
    patch_size=8,
    dim=32,
    depth=2,
    heads=2,
    dim_head=16,
    decoder_depth=2,
    decoder_heads=4,
    decoder_dim_head=8,
)


def official_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An independent, spelled-out mapping of the official names (the test's own; the library has its table)."""
    out = {}
    for key, value in state.items():
        k = key
        if k in ("pos_embed", "decoder_embed.weight", "decoder_embed.bias"):
            continue  # never used by the official forward pass
        k = k.replace("decoder_pos_embed", "pos_embed")
        for prefix in ("blocks.", "decoder_blocks."):
            if k.startswith(prefix):
                i, rest = k[len(prefix) :].split(".", 1)
                enc = prefix == "blocks."
                rest = (
                    {
                        "layers.0.0.norm.weight": "norm1.weight",
                        "layers.0.0.norm.bias": "norm1.bias",
                        "layers.0.1.norm.weight": "norm2.weight",
                        "layers.0.1.norm.bias": "norm2.bias",
                        "layers.0.0.fn.qkv.weight": "mssa.subspace_proj.weight",
                        "layers.0.0.fn.to_out.0.weight": "mssa.out_proj.weight",
                        "layers.0.0.fn.to_out.0.bias": "mssa.out_proj.bias",
                        "layers.0.1.fn.weight": "ista.dictionary",
                    }[rest]
                    if enc
                    else {
                        "layers.0.0.norm.weight": "norm1.weight",
                        "layers.0.0.norm.bias": "norm1.bias",
                        "layers.0.1.norm.weight": "norm2.weight",
                        "layers.0.1.norm.bias": "norm2.bias",
                        "layers.0.0.fn.weight": "dictionary",
                        "layers.0.1.fn.qkv.weight": "mssa.subspace_proj.weight",
                        "layers.0.1.fn.to_out.0.weight": "mssa.out_proj.weight",
                        "layers.0.1.fn.to_out.0.bias": "mssa.out_proj.bias",
                    }[rest]
                )
                k = f"{prefix}{i}.{rest}"
        out[k] = value
    return out


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (LayerNorm affine, biases, tokens and positional tables included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def pair(norm_pix: bool = False, seed: int = 0) -> tuple[CRATEMAE, ReferenceCRATEMAE]:
    ref = ReferenceCRATEMAE(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_depth=2,
        decoder_num_heads=4,
        norm_pix_loss=norm_pix,
    )
    randomize(ref, seed)
    model = CRATEMAE(CRATEMAEConfig(**TINY, norm_pix_loss=norm_pix))
    model.load_state_dict(official_to_ours(ref.state_dict()), strict=True)
    return model.double(), ref.double()


def test_sincos_table_matches_mae_numpy_layout():
    for dim, grid in ((32, 4), (768, 14)):
        ours = sincos_pos_embed_2d(dim, (grid, grid))
        theirs = torch.from_numpy(sincos_2d_numpy(dim, grid)).float()
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert torch.equal(sincos_pos_embed_2d(8, (2, 3))[0], torch.zeros(8))  # class token row


@pytest.mark.parametrize("norm_pix", [False, True])
def test_fast_model_equals_literal_formulation_outputs_and_gradients(norm_pix):
    model, ref = pair(norm_pix)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss_ref, pred_ref, mask_ref = ref(x, 0.75, noise)
    mask = random_masking(3, 16, 0.75, noise=noise)
    out = model(x, mask=mask)
    assert torch.equal(out.mask, mask_ref.bool())
    assert out.mask.sum(1).tolist() == [12, 12, 12]
    torch.testing.assert_close(out.pred, pred_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.loss, loss_ref, rtol=1e-10, atol=1e-10)
    loss_ref.backward()
    out.loss.backward()
    ref_grads = official_to_ours({k: p.grad for k, p in ref.named_parameters() if p.requires_grad})
    ours = dict(model.named_parameters())
    assert set(ref_grads) == set(ours)
    for name, g in ref_grads.items():
        torch.testing.assert_close(ours[name].grad, g, rtol=1e-9, atol=1e-10, msg=name)


def test_every_parameter_gets_a_gradient_and_loss_uses_only_masked_patches():
    torch.manual_seed(0)
    model = CRATEMAE(CRATEMAEConfig(**TINY))
    x = torch.randn(2, 3, 32, 32)
    out = model(x, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # changing the prediction on visible patches does not change the loss
    pred = out.pred.detach().clone()
    pred[~out.mask] += 5.0
    target = model.patchify(x)
    assert torch.allclose(masked_mse(pred, target, out.mask), masked_mse(out.pred.detach(), target, out.mask))


def test_seeded_masks_are_reproducible_and_have_the_exact_ratio():
    a = random_masking(4, 49, 0.75, generator=torch.Generator().manual_seed(3))
    b = random_masking(4, 49, 0.75, generator=torch.Generator().manual_seed(3))
    c = random_masking(4, 49, 0.75, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.sum(1).tolist() == [49 - int(49 * 0.25)] * 4
    assert not random_masking(2, 10, 0.0).any()


def test_patchify_round_trip_and_order():
    x = torch.randn(2, 3, 16, 24)
    p = patchify(x, (8, 8))
    assert p.shape == (2, 6, 192)
    assert torch.equal(unpatchify(p, (8, 8), (2, 3), 3), x)
    # patch (row 1, col 2), pixel (p1=3, p2=5), channel 1 sits at index (3 * 8 + 5) * 3 + 1
    assert p[0, 1 * 3 + 2, (3 * 8 + 5) * 3 + 1] == x[0, 1, 8 + 3, 16 + 5]


def test_trace_agrees_with_forward_and_intermediates():
    torch.manual_seed(0)
    model = CRATEMAE(CRATEMAEConfig(**TINY)).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = model.make_mask(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tr = model.forward_trace(x, mask)
        out = model(x, mask=mask)
        torch.testing.assert_close(tr.pred, out.pred, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tr.latent, model.forward_encoder(x, mask), rtol=1e-5, atol=1e-5)
        assert len(tr.encoder) == 2 and len(tr.decoder) == 2
        # each layer's output feeds the next; the decoder starts from the latent
        torch.testing.assert_close(tr.encoder[1].z_in, tr.encoder[0].z_out)
        assert torch.equal(tr.decoder[0].z_in, tr.latent)
        assert tr.encoder[0].attn.shape == (2, 2, 17, 17) and tr.decoder[0].attn.shape == (2, 4, 17, 17)
        assert tr.decoder[0].proj.shape == (2, 4, 17, 8)
        # decoder: z_half = LN(z) D^T, z_out = z_half - MSSA(LN(z_half))
        blk = model.decoder_blocks[0]
        torch.testing.assert_close(tr.decoder[0].z_half, blk.norm1(tr.latent) @ blk.dictionary.t())
        assert (tr.encoder[0].z_out >= 0).all()  # ISTA output is non-negative
        clean = model.forward_trace(x, encoder_layers=[-1], decoder_layers=[])
        assert len(clean.encoder) == 1 and not clean.decoder
        inter = model.forward_intermediates(x, indices=[-1], output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(inter[0], clean.encoder[0].z_out[:, 1:])
        latent, maps = model.forward_intermediates(x, indices=1)
        torch.testing.assert_close(latent, model.forward_encoder_features(x))
        assert maps[0].shape == (2, 32, 4, 4)
        feats = model.forward_encoder_features(x)
        torch.testing.assert_close(feats, model.norm(clean.encoder[0].z_out))


def test_the_encoder_is_the_shared_backbone_and_its_classifier_is_a_key_rename():
    torch.manual_seed(0)
    mae = CRATEMAE(CRATEMAEConfig(**TINY, name="tiny")).eval()
    assert isinstance(mae, WhiteBoxBackbone) and mae.num_classes == 0 and isinstance(mae.head, torch.nn.Identity)
    keys = list(mae.state_dict())
    # the released layout: no classifier keys, the encoder's LayerNorm is "norm", positions a fixed buffer
    assert not [k for k in keys if k.startswith(("fc_norm", "head", "pre_logits"))]
    assert {"norm.weight", "pos_embed", "mask_token", "blocks.1.ista.dictionary", "decoder_pred.bias"} <= set(keys)
    assert "pos_embed" not in dict(mae.named_parameters())
    clf = crate_classifier_from_mae(mae, 5).eval()
    assert isinstance(clf, CRATE) and clf.config == mae.config.encoder.replace(num_classes=5)
    assert clf.config.name == "tiny_encoder" and clf.config.patch_embed == "conv" and clf.config.lambd == 0.5
    renamed = [ENCODER_TO_CLASSIFIER.get(k, k) for k in keys if not k.startswith(AUTOENCODER_ONLY_KEYS)]
    assert sorted(clf.state_dict()) == sorted([*renamed, "head.weight", "head.bias"])
    for k in keys:
        if not k.startswith(AUTOENCODER_ONLY_KEYS):
            assert torch.equal(clf.state_dict()[ENCODER_TO_CLASSIFIER.get(k, k)], mae.state_dict()[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the same blocks on the same tokens; the class token's LayerNorm differs only by eps
        torch.testing.assert_close(clf.forward_features(x), mae.forward_blocks(mae.embed(x)[0]))
        assert torch.equal(mae.forward_features(x), mae.forward_encoder_features(x))
    with pytest.raises(ValueError, match="no mask token"):
        clf.embed(x, mask=torch.zeros(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="to_classifier"):
        mae.reset_classifier(3)
    mae.reset_classifier(0)  # timm's feature extraction: still no classifier


def test_presets_are_the_official_sizes():
    sizes = {n: (c.dim, c.depth, c.heads, c.dim_head, c.decoder_depth, c.decoder_heads) for n, c in MAE_PRESETS.items()}
    assert sizes == {
        "mae_crate_tiny": (384, 12, 6, 64, 12, 6),
        "mae_crate_small": (576, 12, 12, 48, 12, 12),
        "mae_crate_base": (768, 12, 12, 64, 12, 12),
        "mae_crate_large": (1024, 24, 16, 64, 24, 16),
    }
    assert all(c.lambd == 0.5 and c.ista == 0.1 and c.mask_ratio == 0.75 for c in MAE_PRESETS.values())
    model = mae_crate_base()
    assert model.num_params() == 43_745_280
    assert model.pos_embed.shape == (1, 197, 768) and not model.pos_embed.requires_grad


def test_bad_inputs_name_the_problem():
    model = CRATEMAE(CRATEMAEConfig(**TINY))
    with pytest.raises(ValueError, match="resize the input"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="multiple of the patch"):
        CRATEMAEConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="mask_ratio"):
        CRATEMAEConfig(mask_ratio=1.0)
    with pytest.raises(ValueError, match="unknown CRATE-MAE config keys"):
        CRATEMAEConfig.from_dict({"depht": 3})


def test_reconstruction_panels_and_figure(tmp_path):
    from cratevit.analysis.reconstruction import reconstruct, reconstruction_figure
    from cratevit.analysis.visualize import save_figure

    torch.manual_seed(0)
    model = CRATEMAE(CRATEMAEConfig(**TINY, norm_pix_loss=True))
    x = torch.randn(2, 3, 32, 32)
    a = reconstruct(model, x, mean=(0.5,) * 3, std=(0.5,) * 3, seed=3)
    b = reconstruct(model, x, mean=(0.5,) * 3, std=(0.5,) * 3, seed=3)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.pasted, b.pasted)  # seeded
    assert not torch.equal(a.mask, reconstruct(model, x, (0.5,) * 3, (0.5,) * 3, seed=4).mask)
    assert a.mask.sum(1).tolist() == [12, 12]
    shown = (x * 0.5 + 0.5).clamp(0, 1)
    torch.testing.assert_close(a.original, shown)
    visible = ~a.mask[0].view(4, 4).repeat_interleave(8, 0).repeat_interleave(8, 1)  # pixel map of visible patches
    torch.testing.assert_close(a.pasted[0][:, visible], shown[0][:, visible])  # visible patches pasted back
    torch.testing.assert_close(a.pasted[0][:, ~visible], a.reconstruction[0][:, ~visible])
    torch.testing.assert_close(a.masked[0][:, ~visible], torch.full_like(a.masked[0][:, ~visible], 0.5))
    # norm_pix_loss: the prediction is mapped back with each true patch's mean and variance
    out = model(x, mask=a.mask)
    pred = out.pred * (model.patchify(x).var(-1, keepdim=True) + 1e-6).sqrt() + model.patchify(x).mean(-1, keepdim=True)
    torch.testing.assert_close(a.reconstruction, (model.unpatchify(pred) * 0.5 + 0.5).clamp(0, 1).detach())
    paths = save_figure(reconstruction_figure(a, names=["one", "two"], title="t"), tmp_path / "rec")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in paths)


def test_layerwise_stats_of_encoder_and_decoder():
    from cratevit import create_model
    from cratevit.analysis import layerwise_stats

    torch.manual_seed(0)
    model = CRATEMAE(CRATEMAEConfig(**TINY))
    x = torch.randn(5, 3, 32, 32)
    enc = layerwise_stats(model, x, batch_size=2)
    dec = layerwise_stats(model, x, batch_size=2, part="decoder")
    assert enc.rc_in.shape == (5, 2) and dec.rc_in.shape == (5, 2)
    with torch.no_grad():
        tr = model.eval().forward_trace(x)
        blk = model.decoder_blocks[1]
        expect = blk.mssa.project(blk.norm2(tr.decoder[1].z_out))
    from cratevit.analysis.layerwise import compression

    torch.testing.assert_close(dec.rc_half[:, 1], compression(expect).double(), rtol=1e-5, atol=1e-5)
    assert (enc.sparsity < 1).all() and torch.equal(dec.sparsity, torch.ones(5, 2, dtype=dec.sparsity.dtype))
    with pytest.raises(ValueError, match="decoder"):
        layerwise_stats(create_model("crate_debug"), x, part="decoder")


def test_attention_maps_and_patch_features_of_encoder_and_decoder():
    from cratevit.analysis.segmentation import attention_maps, model_geometry, patch_features

    torch.manual_seed(0)
    model = CRATEMAE(CRATEMAEConfig(**TINY)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tr = model.forward_trace(x)
        enc, dec = attention_maps(model, x, -1), attention_maps(model, x, 0, decoder=True)
        assert enc.shape == (2, 2, 4, 4) and dec.shape == (2, 4, 4, 4)
        torch.testing.assert_close(dec, tr.decoder[0].attn[:, :, 0, 1:].reshape(2, 4, 4, 4))
        feats = patch_features(model, x, 1, decoder=True)
        torch.testing.assert_close(feats, tr.decoder[1].z_out[:, 1:].reshape(2, 4, 4, 32))
    assert model_geometry(model) == ((32, 32), (8, 8))


def test_attention_maps_need_no_gradients():
    from cratevit import create_model
    from cratevit.analysis.segmentation import attention_maps

    assert not attention_maps(create_model("crate_debug"), torch.randn(1, 3, 32, 32)).requires_grad
    assert not attention_maps(CRATEMAE(CRATEMAEConfig(**TINY)), torch.randn(1, 3, 32, 32), decoder=True).requires_grad


def test_facets_of_encoder_and_decoder_and_crate_style_trace():
    from cratevit.analysis.facets import facet_features

    torch.manual_seed(0)
    model = CRATEMAE(CRATEMAEConfig(**TINY)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tr = model.forward_trace(x)
        crate_style = model.forward_trace(x, layers=[-1])
        assert len(crate_style.layers) == 1 and not crate_style.decoder
        torch.testing.assert_close(crate_style.layers[0].z_out, tr.encoder[1].z_out)
        key = facet_features(model, x, 0, "key", decoder=True)
        torch.testing.assert_close(key, tr.decoder[0].proj.transpose(1, 2).flatten(2)[:, 1:].reshape(2, 4, 4, 32))
        token = facet_features(model, x, -1, "token")
        torch.testing.assert_close(token, tr.encoder[1].z_out[:, 1:].reshape(2, 4, 4, 32))
