"""timm's model contract, run over EVERY registered preset (as timm's tests/test_models.py runs it over its models).

Two parts. The first builds each preset through ``timm.create_model`` at a small input size (two patches a side)
and checks forward shape without NaNs, a gradient for every parameter, the per-weight metadata
(``pretrained_cfg``), pooled / unpooled features after ``reset_classifier(0)``, ``forward_head``, and
``forward_intermediates`` against ``forward_features``.

The second mirrors timm's own model tests one by one (``tests/test_models.py`` of huggingface/pytorch-image-models;
each test names the one it mirrors): forward (with gradient checkpointing), backward, default cfgs (the non-std
variant timm runs for its ViTs), TorchScript, features_only, forward_intermediates, FX forward, FX backward and
FX + TorchScript. There each preset keeps its patch size, head count, pooling, class count and head layout, with
3 layers, 8-wide heads and a 4 x 4 patch grid.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import timm
import timm.data
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import cratevit  # noqa: F401  (registers the presets with timm)
from cratevit.presets import PRESET_INFO, PRESETS, classifier_presets, timm_name
from cratevit.registry import get_family, layer_count

BATCH = 2
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
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
    assert {timm_name(p) for p in PRESET_NAMES} <= set(timm.list_models("crate_*")) | set(timm.list_models("tost_*"))


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
        if layer_count(model) == len(model.blocks):  # ToST's class-attention blocks follow its last block (XCiT's)
            torch.testing.assert_close(inter[-1].flatten(2).transpose(1, 2), features[:, 1:])
        model.reset_classifier(0)
        pooled = model(x)
    assert pooled.shape == (BATCH, model.head_hidden_size)
    assert model.num_classes == 0 and model.pretrained_cfg["num_classes"] == PRESETS[preset].num_classes


# ---------------------------------------------------------------- timm's tests/test_models.py, one by one
PRESET_OF = {timm_name(p): p for p in PRESET_NAMES}  # the classifier presets: timm models
NAMES = sorted(PRESET_OF)


def small_kwargs(name: str) -> dict:
    """The preset at a CI size: same patch, heads, pooling, classes and head layout; 3 layers, 4 x 4 patches."""
    cfg = PRESETS[PRESET_OF[name]]
    kwargs = {
        "depth": 3,
        "dim_head": 8,
        "dim": cfg.heads * 8,
        "img_size": (cfg.patch_size[0] * 4, cfg.patch_size[1] * 4),
    }
    if "dim_head" not in {f.name for f in dataclasses.fields(cfg)}:  # ToST: the head width is dim / heads
        del kwargs["dim_head"]
    if getattr(cfg, "head_hidden_dim", None):  # crate_base_demo's two-stage head, hidden width = dim as in the preset
        kwargs["head_hidden_dim"] = kwargs["dim"] * cfg.head_hidden_dim // cfg.dim
    return kwargs


def create(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, **{**small_kwargs(name), **kwargs})


def input_size(model: torch.nn.Module) -> tuple[int, int, int]:
    """timm's resolution of the input a built model accepts (its traits: channels and the built image size)."""
    return timm.data.resolve_input_data_config(model)["input_size"]


def create_fx_model(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """timm's ``_create_fx_model``: a torchvision feature extractor returning the graph's output node(s), traced
    with timm's not-traced modules and functions."""
    tracer_kwargs = {
        "leaf_modules": get_notrace_modules(),
        "autowrap_functions": get_notrace_functions(),
        "param_shapes_constant": True,
    }
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes, train_return_nodes = [eval_nodes[-1]], [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_names = [n.name for n in graph_nodes[0]._input_nodes]
        node_names = [n.name for n in graph_nodes]
        train_return_nodes = [train_nodes[-node_names.index(n)] for n in output_names]
    return create_feature_extractor(
        model,
        train_return_nodes=train_return_nodes,
        eval_return_nodes=eval_return_nodes,
        tracer_kwargs=tracer_kwargs,
    )


def test_every_classifier_preset_is_in_the_contract():
    assert len(NAMES) == len(PRESET_NAMES)
    assert set(NAMES) <= set(timm.list_models("crate_*")) | set(timm.list_models("tost_*"))


@pytest.mark.parametrize("name", NAMES)
def test_model_forward(name):
    """timm's test_model_forward: one forward pass without NaNs; gradient checkpointing gives the same output."""
    model = create(name).eval()
    x = torch.randn(1, *input_size(model))
    out = model(x)
    assert out.shape[0] == 1 and not torch.isnan(out).any()
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_model_backward(name):
    """timm's test_model_backward: with num_classes=42, every parameter gets a gradient."""
    model = create(name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    out = model(torch.randn(2, *input_size(model)))
    out.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
    assert sum(p.grad.numel() for p in model.parameters()) == num_params
    assert out.shape[-1] == 42 and not torch.isnan(out).any()


@pytest.mark.parametrize("name", NAMES)
def test_model_default_cfgs_non_std(name):
    """timm's test_model_default_cfgs_non_std (the test timm runs for its ViTs): features, pre-logits and pooled
    widths; num_classes=0 at creation and by reset_classifier; classifier and first_conv names exist as weights.
    Also the keys timm's data config and pretrained loading read."""
    model = create(name).eval()
    state_dict = model.state_dict()
    cfg = model.default_cfg
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    x = torch.randn(1, *input_size(model))

    tokens = model.forward_features(x)
    pre = model.forward_head(tokens, pre_logits=True)
    assert tokens.shape[-1] == model.num_features and pre.shape[1] == model.head_hidden_size

    model.reset_classifier(0)
    assert model.num_classes == 0
    out = model(x)
    assert out.shape[-1] == model.head_hidden_size and out.shape == pre.shape

    headless = create(name, num_classes=0).eval()
    assert headless(x).shape[-1] == headless.num_features

    if cfg.get("num_classes"):
        classifier = cfg["classifier"]
        for c in (classifier,) if isinstance(classifier, str) else classifier:
            assert c + ".weight" in state_dict, f"{c} not in model params"
    first_conv = cfg["first_conv"]
    assert isinstance(first_conv, (str, tuple, list))
    for fc in (first_conv,) if isinstance(first_conv, str) else first_conv:
        assert fc + ".weight" in state_dict, f"{fc} not in model params"

    for key in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode", "num_classes", "pool_size",
                "first_conv", "classifier", "fixed_input_size", "architecture", "license"):  # fmt: skip
        assert key in cfg, key
    assert len(cfg["input_size"]) == 3 and len(cfg["mean"]) == len(cfg["std"]) == cfg["input_size"][0]


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_torchscript(name):
    """timm's test_model_forward_torchscript: torch.jit.script (under set_scriptable) runs one forward pass, and
    (beyond timm) gives the eager model's output."""
    with timm.set_scriptable(True):
        model = create(name).eval()
    x = torch.randn(1, *input_size(model))
    scripted = torch.jit.script(model)
    out = scripted(x)
    assert out.shape[0] == 1 and not torch.isnan(out).any()
    torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_features(name):
    """timm's test_model_forward_features: features_only=True gives at least 3 maps of the announced channels,
    within the announced reduction."""
    model = create(name, features_only=True).eval()
    channels, reduction = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 3
    size = input_size(model)
    outputs = model(torch.randn(1, *size))
    assert len(outputs) == len(channels)
    for c, r, o in zip(channels, reduction, outputs, strict=True):
        assert o.shape[1] == c and o.shape[0] == 1 and not torch.isnan(o).any()
        assert o.shape[2] <= math.ceil(size[1] / r) + 1 and o.shape[3] <= math.ceil(size[2] / r) + 1


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_intermediates(name):
    """timm's test_model_forward_intermediates: forward_intermediates gives one NCHW map per feature_info entry,
    its final output equals forward_features, also with gradient checkpointing."""
    model = create(name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    size = input_size(model)
    x = torch.randn(1, *size)
    final, maps = model.forward_intermediates(x, output_fmt="NCHW")
    assert len(maps) == len(info.channels()) >= 3
    for c, r, o in zip(info.channels(), info.reduction(), maps, strict=True):
        assert o.shape[1] == c and o.shape[2] <= math.ceil(size[1] / r) + 1 and not torch.isnan(o).any()
    torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
    model.set_grad_checkpointing()
    torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_fx(name):
    """timm's test_model_forward_fx: the torch.fx feature extractor gives exactly the eager output."""
    model = create(name).eval()
    with torch.inference_mode():
        x = torch.randn(1, *input_size(model))
        out = model(x)
        fx_out = torch.cat(tuple(create_fx_model(model)(x).values()))
    assert torch.equal(fx_out, out) and not torch.isnan(out).any()


@pytest.mark.parametrize("name", NAMES)
def test_model_backward_fx(name):
    """timm's test_model_backward_fx: the traced training graph gives every parameter a gradient."""
    model = create(name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    fx_model = create_fx_model(model, train=True)
    out = torch.cat(tuple(fx_model(torch.randn(2, *input_size(model))).values()))
    out.mean().backward()
    for n, p in fx_model.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
    assert sum(p.grad.numel() for p in fx_model.parameters()) == num_params
    assert out.shape[-1] == 42 and not torch.isnan(out).any()


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_fx_torchscript(name):
    """timm's test_model_forward_fx_torchscript: the fx feature extractor compiles with torch.jit.script."""
    with timm.set_scriptable(True):
        model = create(name).eval()
    scripted = torch.jit.script(create_fx_model(model))
    with torch.inference_mode():
        out = torch.cat(tuple(scripted(torch.randn(1, *input_size(model))).values()))
    assert out.shape[0] == 1 and not torch.isnan(out).any()


def test_fx_symbolic_trace_and_timm_feature_extractor():
    """torch.fx.symbolic_trace and timm's create_feature_extractor on a full-size layout (crate_tiny)."""
    model = timm.create_model("crate_tiny_patch16_224", depth=2).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x), rtol=0, atol=0)
        feats = timm.models.create_feature_extractor(model, {"blocks.1.ista": "last", "fc_norm": "pooled"})(x)
        torch.testing.assert_close(feats["last"], model.forward_features(x), rtol=0, atol=0)
    assert feats["pooled"].shape == (1, 384)


def test_traced_and_scripted_models_still_check_their_input():
    model = create("crate_debug_patch8_32").eval()
    traced = torch.fx.symbolic_trace(model)
    scripted = torch.jit.script(model)
    for m in (model, traced):
        with pytest.raises(ValueError, match="expected 32x32 images, got 40x40"):
            m(torch.randn(1, 3, 40, 40))
    with pytest.raises(torch.jit.Error, match="expected 32x32 images, got 40x40"):
        scripted(torch.randn(1, 3, 40, 40))
    model.dynamic_img_size = True  # a plain attribute that forward reads
    assert model(torch.randn(1, 3, 40, 40)).shape == (1, 10)
