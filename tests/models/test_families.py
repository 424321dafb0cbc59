"""Every registered family: its record agrees with itself (card, pretrained_cfg, license), its saved folder's card
names the class that loads it, its configuration declares only what it honours, and its classes carry the Hub
methods as soon as ``cratevit.models`` is imported."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cratevit import create_model
from cratevit.models import CRATEAlphaConfig
from cratevit.models.blocks import DropPath
from cratevit.presets import PRESETS
from cratevit.registry import families, family_for, objective

SMALLEST = {
    "crate": "crate_debug",
    "crate_alpha": "crate_alpha_debug",
    "crate_mae": "mae_crate_digits",
    "tost": "tost_debug",
}


def test_every_family_has_a_small_preset_here():
    assert set(SMALLEST) == set(families())
    assert all(family_for(PRESETS[p]).name == f for f, p in SMALLEST.items())


@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_card_pretrained_cfg_and_license_agree(name, tmp_path):
    family = families()[name]
    model = create_model(SMALLEST[name])
    assert family.card is not None and family.card.license == family.paper["license"] == family.license
    assert model.pretrained_cfg["license"] == family.card.license
    model.save_pretrained(tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    assert f"\nlicense: {family.card.license}\n" in card and f"pipeline_tag: {family.card.pipeline_tag}" in card
    loader = family.card.loader
    assert loader == family.model_cls.__name__ and f"{loader}.from_pretrained(" in card
    import cratevit.models

    loaded = getattr(cratevit.models, loader).from_pretrained(tmp_path / "m")  # the class the card names loads it
    assert type(loaded) is family.model_cls and loaded.config == model.config


def test_mae_has_no_classifier_and_trains_as_an_autoencoder():
    model = create_model("mae_crate_digits")
    assert model.pretrained_cfg["classifier"] is None and model.pretrained_cfg["num_classes"] == 0
    assert objective(model) == "masked_autoencoding" and objective(create_model("crate_debug")) == "classification"
    assert families()["crate_mae"].card.pipeline_tag == "image-feature-extraction"
    assert create_model("crate_debug").pretrained_cfg["classifier"] == "head"


def test_alpha_config_declares_only_what_it_honours():
    assert "patch_embed" not in {f for f in CRATEAlphaConfig.__dataclass_fields__}
    model = create_model("crate_alpha_debug", drop_path_rate=0.5)
    rates = [m.p for m in model.modules() if isinstance(m, DropPath)]
    assert rates == [0.5]  # the linear rule over 2 layers: 0 (identity) then 0.5
    legacy = {**create_model("crate_alpha_debug").config.to_dict(), "patch_embed": "linear"}  # older files
    assert CRATEAlphaConfig.from_dict(legacy) == create_model("crate_alpha_debug").config


def test_hub_methods_exist_as_soon_as_models_is_imported():
    code = (
        "import sys\nfrom cratevit.models import CRATE, CRATEAlpha, CRATEMAE\n"
        "print(all(hasattr(c, m) for c in (CRATE, CRATEAlpha, CRATEMAE) for m in "
        "('save_pretrained', 'from_pretrained', 'push_to_hub')), 'timm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]


def test_alpha_and_crate_blocks_are_one_block_class():
    from cratevit.models.blocks import WhiteBoxBlock

    for name in ("crate_debug", "crate_alpha_debug"):
        model = create_model(name)
        assert all(isinstance(b, WhiteBoxBlock) for b in model.blocks)
    x = torch.randn(2, 3, 32, 32)
    alpha = create_model("crate_alpha_debug").eval()
    trace = alpha.forward_trace(x)
    assert trace.layers[0].code.shape == (2, 17, 4 * 32) and (trace.layers[0].code >= 0).all()
    torch.testing.assert_close(trace.features, alpha.forward_features(x))


def test_peek_answers_in_one_read(tmp_path):
    from cratevit import save_checkpoint, save_safetensors
    from cratevit.checkpoint import FILE_KINDS, peek, read_checkpoint

    model = create_model("crate_alpha_debug")
    model.save_pretrained(tmp_path / "hf")
    paths = [save_checkpoint(tmp_path / "a.pt", model, epoch=3), save_safetensors(tmp_path / "a.safetensors", model)]
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    for path in [*paths, tmp_path / "hf", tmp_path / "bare.pth"]:
        p = peek(path)
        assert p.family == "crate_alpha" and p.layout == "cratevit" and p.kind in FILE_KINDS and p.num_tensors == 24
    assert peek(paths[0]).epoch == 3 and peek(paths[0]).config["name"] == "crate_alpha_debug"
    assert peek(paths[1]).pretrained_cfg["license"] == "apache-2.0" and peek(tmp_path / "bare.pth").config is None
    assert (
        peek(tmp_path / "bare.pth").kind == "cratevit-state-dict" == read_checkpoint(tmp_path / "bare.pth")[2]["kind"]
    )
