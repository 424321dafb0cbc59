"""save_pretrained / from_pretrained (huggingface_hub's mixin), offline."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import cratevit
from cratevit import CRATE, CRATEConfig, create_model
from cratevit.checkpoint import CheckpointError


def outputs_equal(a: CRATE, b: CRATE, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_save_pretrained_writes_config_and_safetensors(tmp_path):
    model = create_model("crate_debug", num_classes=7)
    assert model.save_pretrained(tmp_path / "m") is None
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "crate" and config["architecture"] == "crate_debug_patch8_32"
    assert config["num_classes"] == 7 and config["num_features"] == 32
    assert CRATEConfig.from_dict(config["model_args"]) == model.config
    assert config["model_args"]["name"] == "crate_debug"
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["pretrained_cfg"]["num_classes"] == 7
    assert "library_name: cratevit" in (tmp_path / "m" / "README.md").read_text()
    # the weights file is a cratevit safetensors file too
    loaded = cratevit.load_checkpoint(tmp_path / "m" / "model.safetensors")
    assert outputs_equal(loaded, model, torch.randn(2, 3, 32, 32))


def test_round_trip_gives_identical_outputs_and_config(tmp_path):
    model = create_model("crate_debug")
    model.save_pretrained(tmp_path)
    loaded = CRATE.from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.config.name == "crate_debug"
    assert isinstance(loaded.config.image_size, tuple) and isinstance(loaded.config.patch_size, tuple)
    assert not loaded.training
    assert outputs_equal(loaded, model, torch.randn(3, 3, 32, 32))
    assert loaded.pretrained_cfg["input_size"] == (3, 32, 32)


def test_round_trip_of_the_original_constructor_with_every_field_changed(tmp_path):
    model = CRATE(32, 8, 6, 48, 2, 3, 16, "mean", 1, 0.0, 0.0, 0.2, lambd=0.05, head_hidden_dim=24, attn_impl="math")
    assert model.config.name is None
    model.save_pretrained(tmp_path)
    loaded = CRATE.from_pretrained(str(tmp_path))
    assert loaded.config == model.config and loaded.config.name is None
    assert (loaded.config.pool, loaded.config.ista, loaded.config.lambd) == ("mean", 0.2, 0.05)
    assert outputs_equal(loaded, model, torch.randn(2, 1, 32, 32))


def test_classifier_reset_before_saving_is_what_gets_saved(tmp_path):
    model = create_model("crate_debug")
    model.reset_classifier(4)
    model.save_pretrained(tmp_path)
    loaded = CRATE.from_pretrained(tmp_path)
    assert loaded.num_classes == 4 and loaded.config.num_classes == 4
    assert outputs_equal(loaded, model, torch.randn(2, 3, 32, 32))


def test_overrides_when_loading(tmp_path):
    model = create_model("crate_debug").eval()
    model.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    three = CRATE.from_pretrained(tmp_path, num_classes=3)
    assert three(x).shape == (2, 3)
    with torch.no_grad():
        torch.testing.assert_close(three.forward_features(x), model.forward_features(x), atol=0, rtol=0)
    flexible = CRATE.from_pretrained(tmp_path, dynamic_img_size=True)
    assert flexible(torch.randn(1, 3, 48, 40)).shape == (1, 10)
    with pytest.raises(ValueError, match=r"unknown CRATE.from_pretrained arguments \['bogus'\]"):
        CRATE.from_pretrained(tmp_path, bogus=1)


def test_saved_folder_loads_with_timm_local_dir(tmp_path):
    model = create_model("crate_debug", num_classes=6)
    model.save_pretrained(tmp_path)
    via_timm = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert isinstance(via_timm, CRATE) and via_timm.config == model.config
    assert outputs_equal(via_timm, model, torch.randn(2, 3, 32, 32))


def test_config_json_of_another_architecture_is_one_clear_error(tmp_path):
    create_model("crate_debug").save_pretrained(tmp_path)
    timm_vit = {"architecture": "vit_tiny_patch16_224", "num_classes": 1000, "pretrained_cfg": {}}
    (tmp_path / "config.json").write_text(json.dumps(timm_vit))
    with pytest.raises(ValueError, match=r"describes another architecture \('vit_tiny_patch16_224'\)"):
        CRATE.from_pretrained(tmp_path)
    transformers_vit = {"model_type": "vit", "architectures": ["ViTForImageClassification"], "hidden_size": 768}
    (tmp_path / "config.json").write_text(json.dumps(transformers_vit))
    with pytest.raises(ValueError, match=r"another architecture \(\['ViTForImageClassification'\]\)"):
        CRATE.from_pretrained(tmp_path)


def test_weights_that_do_not_fit_the_config_are_one_clear_error(tmp_path):
    create_model("crate_debug").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_args"]["dim"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"does not fit the model \(shape mismatch .*file \(32, 32\) vs model \(64, 64\)"
    ):
        CRATE.from_pretrained(tmp_path)


def test_missing_folder_or_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        CRATE.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        CRATE.from_pretrained(tmp_path)
    create_model("crate_debug").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has config\.json but no model\.safetensors"):
        CRATE.from_pretrained(tmp_path / "m")


def test_unreachable_hub_id_is_one_clear_error():
    code = "import cratevit; cratevit.CRATE.from_pretrained('someone/crate-not-there')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # never touches the network
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("FileNotFoundError: cannot fetch 'someone/crate-not-there' from the Hugging Face Hub")
