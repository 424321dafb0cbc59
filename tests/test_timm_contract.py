"""timm's model contract, run over EVERY registered preset (as timm's tests/test_models.py runs it over its models).

Each preset is built through ``timm.create_model`` at a small input size (two patches a side) so that the widest
presets stay fast on a CPU. Checks: forward shape without NaNs, a gradient for every parameter, the per-weight
metadata (``pretrained_cfg``), pooled / unpooled features after ``reset_classifier(0)``, ``forward_head``, and
``forward_intermediates`` against ``forward_features``. Further contract checks (FX, TorchScript) belong here too.
"""

from __future__ import annotations

import pytest
import timm
import timm.data
import torch

import cratevit  # noqa: F401  (registers the presets with timm)
from cratevit.presets import PRESET_INFO, PRESETS, classifier_presets, timm_name
from cratevit.registry import get_family

BATCH = 2
PRESET_NAMES = classifier_presets()  # timm models: every preset of a classifier family (not the autoencoders)


def small_model(preset: str, **kwargs) -> torch.nn.Module:
    """The preset through timm, at two patches per side."""
    ph, pw = PRESETS[preset].patch_size
    return timm.create_model(timm_name(preset), img_size=(2 * ph, 2 * pw), **kwargs)


def images(model: torch.nn.Module) -> torch.Tensor:
    cfg = model.config
    return torch.randn(BATCH, cfg.channels, *cfg.image_size)


def test_every_registered_preset_is_covered():
    autoencoders = {p for p, info in PRESET_INFO.items() if not get_family(info.family).classifier}
    assert set(PRESET_NAMES) == set(PRESET_INFO) - autoencoders and len(PRESET_NAMES) >= 16
    assert not {timm_name(p) for p in autoencoders} & set(timm.list_models("*"))  # not timm models
    assert {timm_name(p) for p in PRESET_NAMES} <= set(timm.list_models("crate_*"))


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_forward_and_backward(preset):
    model = small_model(preset).train()
    out = model(images(model))
    assert out.shape == (BATCH, PRESETS[preset].num_classes)
    assert torch.isfinite(out).all()
    out.mean().backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_pretrained_cfg_drives_the_data_pipeline(preset):
    model = small_model(preset)
    cfg = model.pretrained_cfg
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation", "classifier", "num_classes"):
        assert key in cfg, key
    assert cfg["classifier"] == "head" and model.get_classifier() is model.head
    assert model.head.out_features == cfg["num_classes"] == PRESETS[preset].num_classes
    prep = PRESET_INFO[preset].preprocessing
    assert (tuple(cfg["mean"]), tuple(cfg["std"])) == (prep.mean, prep.std)
    assert tuple(cfg["input_size"]) == (3, *PRESETS[preset].image_size)  # the weights' size, as timm keeps it
    data_cfg = timm.data.resolve_data_config(model=model)
    assert data_cfg["input_size"] == tuple(cfg["input_size"]) and data_cfg["crop_pct"] == prep.crop_pct


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_features_head_intermediates_and_reset_classifier(preset):
    model = small_model(preset).eval()
    x = images(model)
    gh, gw = model.config.grid_size
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (BATCH, 1 + gh * gw, model.num_features)
        assert model.forward_head(features, pre_logits=True).shape == (BATCH, model.head_hidden_size)
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, features)
        assert len(inter) == model.config.depth
        assert inter[-1].shape == (BATCH, model.num_features, gh, gw)
        torch.testing.assert_close(inter[-1].flatten(2).transpose(1, 2), features[:, 1:])
        model.reset_classifier(0)
        pooled = model(x)
    assert pooled.shape == (BATCH, model.head_hidden_size)
    assert model.num_classes == 0 and model.pretrained_cfg["num_classes"] == PRESETS[preset].num_classes
