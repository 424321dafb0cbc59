"""Adding an architecture family takes a model file, one registry entry, one key table and presets: a toy family,
registered for one test, is built, saved, loaded and exported by the unchanged loaders."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import pytest
import torch
from torch import nn

from cratevit import CRATE, UserError, create_model, load_checkpoint, save_checkpoint, save_safetensors
from cratevit.checkpoint import KEY_TABLES, from_reference_keys, load_model, to_reference_keys
from cratevit.checkpoint.keys import KeyTable
from cratevit.interop.hub import attach_hub_methods
from cratevit.presets import HALF, PRESET_INFO, PRESETS, register_preset
from cratevit.registry import Family, families, family_for, get_family, is_family_model, trace_method


@dataclass
class ToyConfig:
    image_size: tuple[int, int] = (8, 8)
    patch_size: tuple[int, int] = (4, 4)
    channels: int = 3
    num_classes: int = 3
    dim: int = 6
    pool: str = "cls"
    dynamic_img_size: bool = False
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.image_size, self.patch_size = tuple(self.image_size), tuple(self.patch_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToyConfig:
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})

    def replace(self, **changes: Any) -> ToyConfig:
        return replace(self, **changes)


class ToyModel(nn.Module):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config, self.num_features = config, config.dim
        self.pretrained_cfg: dict[str, Any] = {}
        self.embed = nn.Linear(config.channels * config.image_size[0] * config.image_size[1], config.dim)
        self.head = nn.Linear(config.dim, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x.flatten(1)))


@pytest.fixture
def toy_family(monkeypatch):
    """The toy family and its preset ``toy_small``, registered for one test (the registries are restored)."""
    import cratevit.presets as presets
    import cratevit.registry as registry

    monkeypatch.setitem(registry._FAMILIES, "toy", Family("toy", ToyModel, ToyConfig, "a toy family", trace=None))
    monkeypatch.setitem(
        KEY_TABLES,
        "toy",
        KeyTable(body=(("emb.{p}", "embed.{p}"), ("fc.{p}", "head.{p}")), reference_markers=("emb.",)),
    )
    tables = (PRESETS, PRESET_INFO, presets._ALIASES)  # shared by every module: restored in place
    saved = [dict(t) for t in tables]
    register_preset("toy_small", ToyConfig(), preprocessing=HALF)
    attach_hub_methods()
    yield
    for table, before in zip(tables, saved, strict=True):
        table.clear()
        table.update(before)
    for name in ("save_pretrained", "push_to_hub", "from_pretrained"):
        delattr(ToyModel, name)


def test_a_registered_family_is_built_saved_loaded_and_exported(toy_family, tmp_path):
    model = create_model("toy_small")
    assert isinstance(model, ToyModel) and is_family_model(model) and family_for(model).name == "toy"
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # the preset's preprocessing
    x = torch.randn(2, 3, 8, 8)
    for path in (save_checkpoint(tmp_path / "toy.pt", model), save_safetensors(tmp_path / "toy.safetensors", model)):
        loaded = load_checkpoint(path)
        assert isinstance(loaded, ToyModel) and loaded.config == model.config
        assert torch.equal(loaded(x), model(x)) and loaded.pretrained_cfg["std"] == (0.5, 0.5, 0.5)
    model.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "toy"
    for loaded in (ToyModel.from_pretrained(tmp_path / "hf"), load_model(tmp_path / "hf")):
        assert isinstance(loaded, ToyModel) and torch.equal(loaded(x), model(x))
    reference = to_reference_keys(model.state_dict(), family="toy")
    assert sorted(reference) == ["emb.bias", "emb.weight", "fc.bias", "fc.weight"]
    assert from_reference_keys(reference, family="toy").keys() == model.state_dict().keys()
    with pytest.raises(UserError, match="toy models have no trace method"):
        trace_method(model)


def test_the_toy_family_is_gone_after_its_test():
    assert "toy" not in families() and "toy" not in KEY_TABLES and "toy_small" not in PRESETS
    assert not hasattr(ToyModel, "save_pretrained")
    with pytest.raises(UserError, match="unknown architecture family 'toy'"):
        get_family("toy")
    assert family_for(create_model("crate_debug")).model_cls is CRATE
