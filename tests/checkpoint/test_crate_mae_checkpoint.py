"""CRATE-MAE files: the official layout (FAIR MAE main_pretrain.py: model, optimizer, epoch, scaler, args) loads with
no arguments, strictly, with weights_only; our own format round-trips; the preset table knows the family."""

from __future__ import annotations

import argparse

import pytest
import torch

from cratevit import create_model, load_checkpoint
from cratevit.checkpoint import read_checkpoint, save_checkpoint
from cratevit.errors import CheckpointError
from cratevit.models.crate_mae import CRATEMAE, MAE_PRESETS, random_masking
from cratevit.presets import get_config
from reference_crate_mae import ReferenceCRATEMAE
from tests.models.test_crate_mae import randomize


def official_file(path, ref: torch.nn.Module, args: argparse.Namespace | None) -> None:
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95))
    obj = {
        "model": ref.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 399,
        "scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 17,
        },
    }
    if args is not None:
        obj["args"] = args
    torch.save(obj, path)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_official_mae_crate_base_file_loads_with_no_arguments_and_matches_the_literal_formulation(tmp_path):
    torch.manual_seed(0)
    ref = ReferenceCRATEMAE(norm_pix_loss=True)  # mae_crate_base: 768 wide, 12 + 12 layers, 12 heads
    randomize(ref, seed=1)
    args = argparse.Namespace(
        model="mae_crate_base",
        mask_ratio=0.75,
        norm_pix_loss=True,
        input_size=224,
        blr=1.5e-4,
        weight_decay=0.05,
        batch_size=64,
        data_path="/data/imagenet",
    )
    official_file(tmp_path / "checkpoint-399.pth", ref, args)

    model = load_checkpoint(tmp_path / "checkpoint-399.pth")
    assert isinstance(model, CRATEMAE)
    assert model.config == MAE_PRESETS["mae_crate_base"].replace(norm_pix_loss=True)
    _, _, meta = read_checkpoint(tmp_path / "checkpoint-399.pth")
    assert meta["family"] == "mae-pretrain" and meta["epoch"] == 399 and meta["args"]["blr"] == 1.5e-4
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    noise = torch.rand(2, 196, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss_ref, pred_ref, mask_ref = ref(x, 0.75, noise)
        out = model.eval()(x, mask=random_masking(2, 196, 0.75, noise=noise))
    assert torch.equal(out.mask, mask_ref.bool())
    assert rel_err(out.pred, pred_ref) < 1e-5 and rel_err(out.loss, loss_ref) < 1e-5


def test_official_layout_without_args_reads_the_architecture_from_the_shapes(tmp_path):
    ref = ReferenceCRATEMAE(
        img_size=32, patch_size=8, embed_dim=384, depth=2, num_heads=6, decoder_depth=1, decoder_num_heads=6
    )
    randomize(ref, seed=4)
    official_file(tmp_path / "ckpt.pth", ref, None)
    model = load_checkpoint(tmp_path / "ckpt.pth")
    cfg = model.config
    assert (cfg.image_size, cfg.patch_size, cfg.dim, cfg.depth, cfg.decoder_depth, cfg.heads, cfg.dim_head) == (
        (32, 32),
        (8, 8),
        384,
        2,
        1,
        6,
        64,
    )  # heads from mae_crate_tiny, the preset 384 wide
    x, noise = torch.randn(1, 3, 32, 32), torch.rand(1, 16)
    with torch.no_grad():
        _, pred_ref, _ = ref(x, 0.75, noise)
        out = model(x, mask=random_masking(1, 16, 0.75, noise=noise))
    assert rel_err(out.pred, pred_ref) < 1e-5
    torch.save(ref.state_dict(), tmp_path / "bare.pth")  # a bare state_dict in the official layout
    assert read_checkpoint(tmp_path / "bare.pth")[2]["family"] == "mae-state-dict"
    assert isinstance(load_checkpoint(tmp_path / "bare.pth"), CRATEMAE)


def test_official_layout_errors_name_the_key_in_both_layouts(tmp_path):
    ref = ReferenceCRATEMAE(
        img_size=32, patch_size=8, embed_dim=384, depth=1, num_heads=6, decoder_depth=1, decoder_num_heads=6
    )
    state = ref.state_dict()
    del state["decoder_blocks.0.layers.0.0.fn.weight"]
    torch.save({"model": state, "epoch": 0}, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match=r"decoder_blocks\.0\.dictionary.*decoder_blocks\.0\.layers\.0\.0\.fn"):
        load_checkpoint(tmp_path / "cut.pth")
    state = ref.state_dict()
    del state["decoder_embed.weight"]
    torch.save({"model": state}, tmp_path / "no_embed.pth")
    with pytest.raises(CheckpointError, match=r"lacks.*decoder_embed\.weight"):
        load_checkpoint(tmp_path / "no_embed.pth")


def test_our_format_round_trips_and_presets_build_the_family(tmp_path):
    model = create_model("mae_crate_digits")
    assert isinstance(model, CRATEMAE) and model.config.image_size == (32, 32)
    randomize(model, seed=5)
    save_checkpoint(tmp_path / "ours.pt", model)
    back = load_checkpoint(tmp_path / "ours.pt")
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert get_config("mae_crate_large").depth == 24 and get_config("MAE_CRATE_BASE").dim == 768


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    from cratevit.checkpoint import load_model

    model = create_model("mae_crate_digits", norm_pix_loss=True)
    randomize(model, seed=6)
    model.save_pretrained(tmp_path / "hf")
    for back in (CRATEMAE.from_pretrained(tmp_path / "hf"), load_model(tmp_path / "hf")):
        assert isinstance(back, CRATEMAE) and back.config == model.config
        assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
