"""Adding an architecture family takes a model file (its record holds the key table of its foreign layout and its
shape reader), one registry entry and presets: a toy family, registered for one test, is built, saved, loaded and
exported by the unchanged loaders."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import pytest
import torch
from torch import nn

from cratevit import CRATE, UserError, create_model, load_checkpoint, save_checkpoint, save_safetensors
from cratevit.checkpoint import KEY_TABLES, from_reference_keys, load_model, to_reference_keys
from cratevit.interop.hub import attach_hub_methods
from cratevit.models import KeyTable
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

    keys = KeyTable(body=(("emb.{p}", "embed.{p}"), ("fc.{p}", "head.{p}")), reference_markers=("emb.",))
    toy = Family("toy", ToyModel, ToyConfig, "a toy family", trace=None, key_table=keys)
    monkeypatch.setitem(registry._FAMILIES, "toy", toy)  # its key table comes with it (KEY_TABLES reads the registry)
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


# ------------------------------------------------------------------ a family built from the shared blocks
# Everything a real family has, in the lines below: a config (the backbone's fields + its block's), the block
# choice, the model class and the record. The rest of cratevit reaches it through the registry.
from cratevit.models import BackboneConfig, WhiteBoxBackbone, WhiteBoxBlock  # noqa: E402
from cratevit.models.family import Card  # noqa: E402
from cratevit.models.shapes import (  # noqa: E402
    ShapeReading,
    backbone_head_facts,
    backbone_heads,
    backbone_with_heads,
    class_count,
    head_split,
    layer_count,
    need,
    square_grid,
)


@dataclass
class ToyWBConfig(BackboneConfig):
    """Attention-only layers with standard q/k/v attention (a toy white-box family)."""

    label = "toy white-box"

    def make_block(self, drop_path: float) -> WhiteBoxBlock:
        return WhiteBoxBlock(self.dim, self.heads, self.dim_head, "mhsa", "none", drop_path=drop_path)

    def sparse_code_flops(self, n: int, ista_matmuls: int = 2) -> int:
        return 0


class ToyWB(WhiteBoxBackbone):
    def __init__(self, *, config: ToyWBConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config if config is not None else ToyWBConfig(**kwargs))


def _toy_shapes(state: dict[str, torch.Tensor], heads: int | None) -> ShapeReading:
    """The shape reader: dim and grid from pos_embed, the patch from the stem, depth from the block indices; the
    head count from ``heads`` or, as the shapes cannot tell it, from the presets (checkpoint.infer's part)."""
    dim, grid = state["pos_embed"].shape[2], square_grid(state["pos_embed"])
    patch = int((state["patch_embed.proj.weight"].shape[1] // 3) ** 0.5)
    inner = need(state, "blocks.0.attn.qkv.weight", 2).shape[0] // 3
    n_heads = backbone_heads(dim, inner, True, heads)
    depth = layer_count(state, probe="attn.qkv.weight")
    cfg = ToyWBConfig(image_size=grid * patch, patch_size=patch, dim=dim, depth=depth, **head_split(inner, n_heads),
                      num_classes=class_count(state))  # fmt: skip
    return ShapeReading(cfg, heads_read=n_heads is not None)


TOY_WB = Family(
    "toy_wb",
    ToyWB,
    ToyWBConfig,
    "a toy white-box family: MHSA-only layers",
    paper={"license": "mit", "paper_name": "none", "origin_url": "https://example.org/toy"},
    card=Card(
        title="a toy attention-only network",
        blurb="Attention only.",
        paper_url="https://example.org/toy",
        license="mit",
        loader="ToyWB",
    ),
    code_kind=lambda cfg: None,
    activation_bytes=lambda cfg, amp, ckpt: cfg.depth * 4 * 8 * (cfg.num_patches + 1) * cfg.dim,
    shape_reader=_toy_shapes,
    head_facts=backbone_head_facts,
    with_heads=backbone_with_heads,
)


@pytest.fixture
def toy_wb(monkeypatch):
    """The family ``toy_wb`` and its preset ``toy_wb_tiny``, registered for one test (the registries restored)."""
    import cratevit.presets as presets
    import cratevit.registry as registry
    from cratevit.interop import timm_models  # first import registers every preset: before the toy's exists

    monkeypatch.setitem(registry._FAMILIES, "toy_wb", TOY_WB)
    tables = (PRESETS, PRESET_INFO, presets._ALIASES)
    saved = [dict(t) for t in tables]
    register_preset("toy_wb_tiny", ToyWBConfig(image_size=16, patch_size=4, num_classes=3, dim=16, depth=2,
                                               heads=2, dim_head=8), preprocessing=HALF)  # fmt: skip
    attach_hub_methods()
    import copy

    import timm.models._registry as timm_registry

    timm_tables = {k: v for k, v in vars(timm_registry).items() if isinstance(v, (dict, set)) and k.startswith("_m")}
    timm_saved = {k: copy.deepcopy(v) for k, v in timm_tables.items()}
    cfgs_saved = dict(timm_models.default_cfgs)
    yield
    for table, before in zip(tables, saved, strict=True):
        table.clear()
        table.update(before)
    for name in ("save_pretrained", "push_to_hub", "from_pretrained"):
        delattr(ToyWB, name)
    for k, table in timm_tables.items():  # timm's registry, as it was (the toy's timm name gone)
        table.clear()
        table.update(timm_saved[k])
    timm_models.default_cfgs.clear()
    timm_models.default_cfgs.update(cfgs_saved)


def test_a_family_from_the_shared_blocks_goes_through_everything(toy_wb, tmp_path, capsys):
    import timm

    from cratevit.analysis.inspection import family_of, inspect_model
    from cratevit.analysis.segmentation import attention_maps
    from cratevit.checkpoint import peek, resolve_config
    from cratevit.cli import main
    from cratevit.interop.timm_models import register_timm_models
    from cratevit.train.memory import estimate_training_memory, per_image_bytes

    model = create_model("toy_wb_tiny").eval()
    x = torch.randn(2, 3, 16, 16)
    # timm: registered under its timm name, built by timm, the contract's shapes
    register_timm_models()  # idempotent: registers the presets timm does not know yet
    assert timm.is_model("toy_wb_tiny_patch4_16")
    via_timm = timm.create_model("toy_wb_tiny_patch4_16", num_classes=5)
    assert isinstance(via_timm, ToyWB) and via_timm(x).shape == (2, 5)
    assert via_timm.forward_features(x).shape == (2, 17, 16) and len(via_timm.forward_intermediates(x)[1]) == 2
    via_timm.reset_classifier(0)
    assert via_timm(x).shape == (2, 16)
    # the card and the Hub methods, the license in three places
    model.save_pretrained(tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "license: mit" in card and "ToyWB.from_pretrained(" in card and model.pretrained_cfg["license"] == "mit"
    assert torch.equal(ToyWB.from_pretrained(tmp_path / "hf")(x), model(x))
    # the shape reader: a bare state dict of this family -> its configuration
    cfg = resolve_config(tmp_path / "bare.pth", model.state_dict(), None, {"model_family": "toy_wb"}, arch="auto")
    assert cfg == model.config and cfg.name == "toy_wb_tiny"  # the heads and the name from the toy's preset
    cfg = resolve_config(tmp_path / "bare.pth", model.state_dict(), None, {"model_family": "toy_wb"}, heads=4)
    assert (cfg.heads, cfg.dim_head, cfg.name) == (4, 4, None)
    save_checkpoint(tmp_path / "toy.pt", model)
    assert peek(tmp_path / "toy.pt").family == "toy_wb" and peek(tmp_path / "hf").family == "toy_wb"
    # cratevit info, the memory model
    assert main(["info", "toy_wb_tiny"]) == 0 and "toy_wb_tiny" in capsys.readouterr().out
    assert per_image_bytes(model.config, None) == 2 * 4 * 8 * 17 * 16
    assert estimate_training_memory(model.config, model.num_params(), 4, None) > 0
    # analysis: attention maps, the inspection behind explore (no code: no atoms)
    assert attention_maps(model, x).shape == (2, 2, 4, 4)
    ins = inspect_model(model, x)
    assert ins.family == "toy_wb" and len(ins.layers) == 2 and "code" not in ins.layers[0].facets
    assert not family_of(model).has_code
    from PIL import Image

    Image.new("RGB", (20, 16), (200, 30, 30)).save(tmp_path / "red.png")
    out = tmp_path / "att"
    assert main(["attention", str(tmp_path / "toy.pt"), str(tmp_path / "red.png"), "-o", str(out), "--size", "16"]) == 0
    assert any(out.iterdir())
    assert main(["analyze", str(tmp_path / "toy.pt"), "--num-images", "4", "-o", str(tmp_path / "an")]) == 0


def test_the_toy_white_box_family_is_gone_after_its_test():
    import timm

    assert "toy_wb" not in families() and "toy_wb_tiny" not in PRESETS
    assert not timm.is_model("toy_wb_tiny_patch4_16") and not hasattr(ToyWB, "save_pretrained")


# ------------------------------------------------------------------ everything of a family in its record
@pytest.mark.parametrize(
    "family, preset",
    [("crate", "crate_tiny"), ("crate_alpha", "crate_alpha_b16"), ("crate_mae", "mae_crate_tiny"),
     ("tost", "tost_cab_tiny_12_p16")],
)  # fmt: skip
def test_each_record_holds_its_key_table_and_reads_its_shapes(family, preset):
    """The key table and the shape reader of every built-in family are in its record; checkpoint/ only asks: the
    shapes of a real-size state dict (meta tensors) give back the preset, named after it by checkpoint.infer."""
    from cratevit.checkpoint import read_config
    from cratevit.checkpoint.keys import state_family
    from cratevit.presets import get_config

    record = get_family(family)
    assert KEY_TABLES[family] is record.key_table and isinstance(record.key_table, KeyTable)
    with torch.device("meta"):
        state = record.build(get_config(preset)).state_dict()
    reading = record.shape_reader(state, None)
    assert reading.heads_read == (family == "tost")  # U's width cannot be split into heads from its shape alone
    cfg = read_config(state, family)
    assert cfg == get_config(preset) and cfg.name == preset
    assert state_family(to_reference_keys(state, family)) == (family, "reference")  # the table tells it apart


def test_key_tables_are_a_read_only_view_of_the_records():
    from pathlib import Path

    with pytest.raises(TypeError):
        KEY_TABLES["toy"] = KEY_TABLES["crate"]  # a family brings its table in its record
    src = Path(__file__).resolve().parents[2] / "src" / "cratevit"
    tables = sorted(str(p.relative_to(src)) for p in src.rglob("*.py") if "KeyTable(\n" in p.read_text())
    assert tables == ["models/crate.py", "models/crate_alpha.py", "models/crate_mae.py", "models/tost.py"]


def test_the_timm_contract_is_written_once():
    """The backbone and ToST share timm's contract through one mixin; neither writes it again."""
    from cratevit.models import ToST
    from cratevit.models.contract import TimmContract

    shared = [name for name, value in vars(TimmContract).items() if callable(value)]
    assert {"forward_intermediates", "prune_intermediate_layers", "reset_classifier", "forward_blocks"} <= set(shared)
    for cls in (WhiteBoxBackbone, ToST):
        assert issubclass(cls, TimmContract) and not set(shared) & set(vars(cls))
    for family in families().values():
        assert not family.classifier or issubclass(family.model_cls, TimmContract)
