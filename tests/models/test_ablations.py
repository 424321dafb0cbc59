"""The emergence paper's ablations as configurations of one backbone: attention (MSSA | MHSA) x second half
(ISTA | MLP | none). Each builds, traces consistently with its fast path, scripts, and the MHSA + MLP block is
timm's ViT block to the last digit."""

from __future__ import annotations

import pytest
import timm.models.vision_transformer as vit
import torch

from cratevit import create_model
from cratevit.errors import UserError
from cratevit.models import CRATEConfig
from cratevit.presets import ABLATIONS, PRESETS
from cratevit.registry import code_kind

VARIANTS = {
    "crate_digits": "CRATE",
    "crate_mlp_digits": "CRATE-MLP",
    "crate_mhsa_digits": "CRATE-MHSA",
    "crate_vit_digits": "ViT",
    "crate_mssa_only_digits": "MSSA only",
    "crate_mhsa_only_digits": "MHSA only",
}


def test_every_ablation_has_a_digits_and_a_paper_size_preset():
    for stem, (attention, feedforward) in ABLATIONS.items():
        for name in (f"{stem}_digits", f"{stem}_base_patch8"):
            cfg = PRESETS[name]
            assert (cfg.attn_kind, cfg.feedforward) == (attention, feedforward)
        assert PRESETS[f"{stem}_base_patch8"].dim == 768 and PRESETS[f"{stem}_base_patch8"].patch_size == (8, 8)
    assert {PRESETS[n].variant for n in VARIANTS} == set(VARIANTS.values())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_forward_trace_and_keys(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    cfg = model.config
    assert cfg.variant == VARIANTS[name]
    x = torch.randn(2, 3, 32, 32)
    trace = model.forward_trace(x)
    torch.testing.assert_close(trace.features, model.forward_features(x), atol=2e-5, rtol=1e-5)
    assert trace.layers[0].attn.shape == (2, 3, 17, 17) and trace.layers[0].proj.shape == (2, 3, 17, 32)
    torch.testing.assert_close(trace.layers[0].attn.sum(-1), torch.ones(2, 3, 17))
    keys = set(model.state_dict())
    assert ("blocks.0.mssa.subspace_proj.weight" in keys) == (cfg.attn_kind == "mssa")
    assert ("blocks.0.attn.qkv.weight" in keys) == (cfg.attn_kind == "mhsa")
    assert ("blocks.0.ista.dictionary" in keys) == (cfg.feedforward == "ista")
    assert ("blocks.0.mlp.fc1.weight" in keys) == (cfg.feedforward == "mlp")
    assert ("blocks.0.norm2.weight" in keys) == (cfg.feedforward != "none")
    assert code_kind(model) == ("output" if cfg.feedforward == "ista" else None)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))


def test_mhsa_mlp_block_is_timms_vit_block():
    torch.manual_seed(0)
    ours = create_model("crate_vit_digits", attn_impl="math").eval().blocks[0]
    theirs = vit.Block(dim=96, num_heads=3, mlp_ratio=4.0, qkv_bias=True).eval()
    theirs.load_state_dict(ours.state_dict())  # the same key names: norm1, attn.qkv, attn.proj, norm2, mlp.fc1/fc2
    z = torch.randn(2, 17, 96)
    torch.testing.assert_close(ours(z), theirs(z), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.trace(z)[0], theirs(z), atol=1e-5, rtol=1e-5)


def test_flops_count_each_half():
    base = CRATEConfig(image_size=32, patch_size=8, dim=96, heads=3, dim_head=32, depth=1, num_classes=0)
    n = 17
    mlp = base.replace(feedforward="mlp")
    assert (
        mlp.sparse_code_flops(n) == 2 * 2 * n * 96 * 384 and base.replace(feedforward="none").sparse_code_flops(n) == 0
    )
    mhsa = base.replace(attn_kind="mhsa")
    assert mhsa.attention_flops(n) - base.attention_flops(n) == 2 * n * 96 * 96 * 2  # q and k are extra maps


def test_bad_choices_are_one_line():
    with pytest.raises(UserError, match="attn_kind must be 'mssa' or 'mhsa'"):
        CRATEConfig(attn_kind="linear")
    with pytest.raises(UserError, match="feedforward must be 'ista', 'mlp' or 'none'"):
        create_model("crate_debug", feedforward="moe")


def test_an_ablation_trains_and_is_analysed_by_every_command(tmp_path, capsys):
    """`cratevit train --arch crate_vit_digits`, then analyze, attention, pca, segeval and maskcut on the file, and
    the inspection behind explore (no sparse code: no atoms, and the code facet says why)."""
    import numpy as np
    from PIL import Image

    from cratevit import load_checkpoint
    from cratevit.analysis.facets import facet_features
    from cratevit.analysis.inspection import family_of, inspect_model
    from cratevit.cli import main

    run = tmp_path / "run"
    quick = ["--steps-per-epoch", "2", "--workers", "0", "--print-freq", "1", "--threads", "1"]
    assert main(["train", "--arch", "crate_vit_digits", "--epochs", "1", "--batch-size", "16", "--output", str(run),
                 *quick]) == 0  # fmt: skip
    ckpt = str(run / "last.pt")
    model = load_checkpoint(ckpt)
    assert model.config.variant == "ViT" and model.config.name == "crate_vit_digits"
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    assert main(["analyze", ckpt, "--num-images", "8", "-o", str(tmp_path / "an")]) == 0
    assert main(["attention", ckpt, str(image), "-o", str(tmp_path / "att"), "--size", "64"]) == 0
    assert main(["pca", ckpt, str(image), "-o", str(tmp_path / "pca"), "--size", "64"]) == 0
    assert main(["segeval", ckpt, "--num-images", "4", "-o", str(tmp_path / "seg")]) == 0
    assert main(["maskcut", ckpt, str(image), "-o", str(tmp_path / "mc")]) == 0
    assert (tmp_path / "mc" / "results.json").is_file()
    x = torch.randn(1, 3, 32, 32)
    assert not family_of(model).has_code and "code" not in inspect_model(model, x).layers[0].facets
    with pytest.raises(UserError, match="this ViT model has no sparse code"):
        facet_features(model, x, 0, "code")
