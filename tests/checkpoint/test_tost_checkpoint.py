"""Official ToST files (bare state_dicts and DeiT/XCiT training checkpoints) load with ``load_checkpoint(path)`` and
``load_model(path)`` and no other arguments, strictly, weights_only, and the loaded model computes what the literal
formulation computes with the same official-layout weights."""

from __future__ import annotations

import argparse

import pytest
import torch

from cratevit.checkpoint import load_checkpoint, load_model, read_checkpoint
from cratevit.errors import CheckpointError
from cratevit.models.reference_tost import ReferenceToST


def official_model(seed: int = 0, **kw) -> ReferenceToST:
    """A model in the official module tree (ReferenceToST carries the official names) with random values."""
    torch.manual_seed(seed)
    args = {"patch_size": 8, "num_classes": 10, "dim": 32, "depth": 2, "heads": 4, "eta": 1.0, **kw}
    model = ReferenceToST(**args)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(0.3 * torch.randn_like(t))
                if name.endswith("running_var"):
                    t.abs_().add_(0.5)
    return model.eval()


def deit_file(model: ReferenceToST, prefix: str = "") -> dict:
    """What the official main.py saves each epoch (utils.save_on_master)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 10)
    args = argparse.Namespace(model="custom", input_size=32, epochs=400, drop_path=0.05, lr=5e-4)
    weights = {prefix + k: v for k, v in model.state_dict().items()}
    return {
        "model": weights,
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "epoch": 12,
        "model_ema": {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()},
        "scaler": {"scale": 65536.0, "growth_factor": 2.0},
        "args": args,
    }


@pytest.mark.parametrize("prefix", ["", "module."])
def test_training_checkpoint_loads_and_matches_the_literal_formulation(tmp_path, prefix):
    ref = official_model()
    path = tmp_path / "checkpoint.pth"
    torch.save(deit_file(ref, prefix), path)
    model = load_checkpoint(path)
    _, _, meta = read_checkpoint(path)
    assert meta["family"] == "tost-official" and meta["model_family"] == "tost"
    assert meta["epoch"] == 12 and meta["args"]["drop_path"] == 0.05 and "optimizer" in meta
    assert meta["key_prefix"] == prefix
    cfg = model.config
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.patch_size, cfg.num_classes, cfg.image_size) == (
        32, 2, 4, (8, 8), 10, (32, 32)
    )  # fmt: skip
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    again = load_model(str(path))
    torch.testing.assert_close(again(x), model(x))


def test_bare_state_dict_of_an_official_preset_loads(tmp_path):
    ref = official_model(seed=1, patch_size=16, dim=64, depth=3, heads=2, num_classes=5, eta=1e-5)
    path = tmp_path / "weights.pth"
    torch.save(ref.state_dict(), path)
    model = load_checkpoint(path)
    assert read_checkpoint(path)[2]["family"] == "tost-state-dict"
    assert (model.config.patch_size, model.config.depth, model.config.class_blocks) == ((16, 16), 3, 2)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_a_named_official_preset_is_built_and_checked_against_the_tensors(tmp_path):
    ref = official_model()
    args = argparse.Namespace(model="tost_debug", input_size=32)
    named = tmp_path / "named.pth"
    torch.save({"model": ref.state_dict(), "epoch": 1, "args": args}, named)
    with pytest.raises(CheckpointError, match="does not fit") as err:  # tost_debug has 2 heads, the file 4
        load_checkpoint(named)
    assert "\n" not in str(err.value) and "arch='auto'" in str(err.value)
    model = load_checkpoint(named, arch="auto")
    assert model.config.heads == 4


def test_files_of_other_families_and_broken_files_get_one_line(tmp_path):
    from cratevit.models import CRATE

    crate = tmp_path / "crate.pth"
    torch.save({"model": CRATE(image_size=32, patch_size=8, dim=32, depth=1, heads=2, dim_head=16).state_dict()}, crate)
    with pytest.raises(CheckpointError, match="does not fit") as err:
        load_checkpoint(crate, arch="tost_debug")
    assert "\n" not in str(err.value)

    state = official_model().state_dict()
    state.pop("blocks.1.mlp.fc2.bias")
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    with pytest.raises(CheckpointError, match=r"missing \['blocks.1.mlp.fc2.bias'\]"):
        load_checkpoint(partial)

    truncated = tmp_path / "truncated.pth"
    torch.save(official_model().state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(truncated)

    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing.pth")
