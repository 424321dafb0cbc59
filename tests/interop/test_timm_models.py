"""timm registry and model contract: every preset is a timm model that behaves like one."""

import subprocess
import sys

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image

import cratevit
from cratevit import CRATE, create_model
from cratevit.interop.timm_models import checkpoint_filter_fn, timm_name
from cratevit.presets import PRESETS, classifier_presets
from reference_crate import ReferenceCRATE

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_preset_names_follow_timm_style():
    assert timm_name("crate_tiny") == "crate_tiny_patch16_224"
    assert timm_name("crate_small") == "crate_small_patch16_224"
    assert timm_name("crate_large") == "crate_large_patch16_224"
    assert timm_name("crate_debug") == "crate_debug_patch8_32"


def test_every_preset_is_registered_from_cratevit_and_nothing_of_timm_is_overwritten():
    ours = {timm_name(p) for p in classifier_presets()}
    assert ours <= set(timm.list_models("crate_*")) | set(timm.list_models("tost_*"))
    assert set(timm.list_models(module="timm_models")) == ours
    # timm's own model names are untouched: none of ours is registered by a timm module
    assert not ours & {m for mod in timm.list_modules() if mod != "timm_models" for m in timm.list_models(module=mod)}
    assert cratevit.register_timm_models() == []  # idempotent


@pytest.mark.parametrize("preset", classifier_presets())
def test_every_preset_has_pretrained_metadata(preset):
    cfg = PRESETS[preset]
    meta = timm.models.get_pretrained_cfg(timm_name(preset)).to_dict()
    assert meta["input_size"] == (cfg.channels, *cfg.image_size)
    # the digits preset carries its data's normalisation, 0.5/0.5 (cratevit.presets; issue #10); the rest ImageNet's
    tost = preset.startswith("tost_")  # ToST: bicubic as its official evaluation; any multiple of the patch fits
    # crate_digits, crate_alpha_digits and the ablations (crate_mlp_digits, ...); ToST's shapes preset too
    digits = preset.endswith("_digits") or preset == "tost_shapes"
    mean, std = ((0.5, 0.5, 0.5),) * 2 if digits else (IMAGENET_MEAN, IMAGENET_STD)
    assert meta["mean"] == mean and meta["std"] == std
    assert meta["classifier"] == "head" and meta["num_classes"] == cfg.num_classes
    large = cfg.image_size[0] >= 224
    assert meta["interpolation"] == ("bicubic" if tost and large else "bilinear")
    assert meta["fixed_input_size"] is (not tost)
    assert meta["crop_pct"] == (0.875 if large else 1.0)
    paper = "arXiv:2405.20299" if preset.startswith("crate_alpha") else "arXiv:2306.01129"  # CRATE-alpha / CRATE
    paper = "arXiv:2412.17810" if tost else paper  # ToST
    assert meta["architecture"] == timm_name(preset) and meta["paper_ids"] == paper


def test_registration_happens_on_import_cratevit():
    code = (
        "import timm, cratevit; m = timm.create_model('crate_tiny_patch16_224'); "
        "print(type(m).__module__, type(m).__name__, m.num_classes, m.config.dim, m.config.name)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cratevit.models.crate", "CRATE", "1000", "384", "crate_tiny"]


def test_create_model_small_with_ten_classes():
    model = timm.create_model("crate_small_patch16_224", num_classes=10)
    assert isinstance(model, CRATE)
    assert model.config == create_model("crate_small", num_classes=10).config
    assert model.num_classes == 10 and model.get_classifier().out_features == 10
    assert model.num_params() == create_model("crate_small", num_classes=10).num_params()
    assert model.pretrained_cfg["architecture"] == "crate_small_patch16_224"
    assert model.default_cfg is model.pretrained_cfg


def test_timm_keyword_arguments_map_onto_the_config():
    model = timm.create_model(
        "crate_debug_patch8_32",
        num_classes=3,
        img_size=48,
        in_chans=1,
        global_pool="avg",
        drop_rate=0.2,
        pos_drop_rate=0.1,
        ista=0.3,
    )
    cfg = model.config
    assert (cfg.num_classes, cfg.image_size, cfg.channels, cfg.pool) == (3, (48, 48), 1, "mean")
    assert (cfg.dropout, cfg.emb_dropout, cfg.ista) == (0.2, 0.1, 0.3)
    assert model(torch.randn(2, 1, 48, 48)).shape == (2, 3)


def test_bad_timm_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"drop_path_rate must lie in \[0, 1\)"):
        timm.create_model("crate_debug_patch8_32", drop_path_rate=1.5)
    with pytest.raises(ValueError, match=r"does not take \['bogus'\]"):
        timm.create_model("crate_debug_patch8_32", bogus=1)
    with pytest.raises(ValueError, match="global_pool must be"):
        timm.create_model("crate_debug_patch8_32", global_pool="max")
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("crate_debug_patch8_32", pretrained=True)
    assert timm.create_model("crate_debug_patch8_32", drop_path_rate=0.0).num_classes == 10


def test_drop_path_rate_is_stochastic_depth_on_the_mssa_branch():
    """timm's train.py --drop-path 0.1: an option (not in the paper), rising linearly to the last layer."""
    model = timm.create_model("crate_nano_patch4_32", drop_path_rate=0.1)
    assert model.config.drop_path_rate == 0.1
    rates = [getattr(b.drop_path, "p", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.1 * i / 5 for i in range(6)])
    x = torch.randn(8, 3, 32, 32)
    model.eval()  # evaluation: no dropping, the same function as without the option
    plain = timm.create_model("crate_nano_patch4_32").eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), plain(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))  # training: per-sample branches dropped at random


@pytest.mark.parametrize("name", ["crate_debug_patch8_32", "crate_nano_patch4_32", "crate_alpha_debug_patch8_32"])
def test_timm_model_contract(name):
    model = timm.create_model(name, num_classes=5)
    cfg = model.config
    x = torch.randn(2, cfg.channels, *cfg.image_size)
    n_tokens = 1 + cfg.num_patches

    # forward: shape, finite, every parameter gets a gradient
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, n_tokens, model.num_features) and model.num_features == cfg.dim
        pre = model.forward_head(tokens, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        torch.testing.assert_close(model.get_classifier()(pre), model(x))

        model.reset_classifier(0)
        assert model.num_classes == 0 and isinstance(model.get_classifier(), torch.nn.Identity)
        torch.testing.assert_close(model(x), pre)  # no classifier: the pooled, normalised features

        model.reset_classifier(7, global_pool="avg")
        assert model(x).shape == (2, 7) and model.get_classifier().out_features == 7
        pooled = model.fc_norm(tokens.mean(dim=1))
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), pooled)


def test_grad_checkpointing_gives_the_same_gradients():
    model = timm.create_model("crate_debug_patch8_32")
    x = torch.randn(3, 3, 32, 32)

    def grads():
        model.zero_grad()
        model(x).logsumexp(-1).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_resolve_data_config_and_create_transform_224():
    model = timm.create_model("crate_tiny_patch16_224")
    data_cfg = timm.data.resolve_data_config(model=model)
    assert data_cfg == {
        "input_size": (3, 224, 224),
        "interpolation": "bilinear",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "crop_pct": 0.875,
        "crop_mode": "center",
    }
    transform = timm.data.create_transform(**data_cfg)
    # the reference evaluation: Resize(256) (bilinear) -> CenterCrop(224) -> ToTensor -> Normalize(ImageNet)
    steps = [type(t).__name__ for t in transform.transforms]
    assert steps[:2] == ["Resize", "CenterCrop"] and transform.transforms[0].size == 256
    rgb = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    x = transform(Image.fromarray(rgb))
    assert x.shape == (3, 224, 224)
    from torchvision.transforms import v2

    expected = v2.Compose(
        [
            v2.Resize(256),
            v2.CenterCrop(224),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )(Image.fromarray(rgb))
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)
    train = timm.data.create_transform(**data_cfg, is_training=True)
    assert train(Image.fromarray(rgb)).shape == (3, 224, 224)


def test_resolve_data_config_small_preset_feeds_the_model():
    model = timm.create_model("crate_debug_patch8_32").eval()
    data_cfg = timm.data.resolve_data_config(model=model)
    assert data_cfg["input_size"] == (3, 32, 32) and data_cfg["crop_pct"] == 1.0
    transform = timm.data.create_transform(**data_cfg)
    rgb = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    x = transform(Image.fromarray(rgb))
    assert x.shape == (3, 32, 32)
    assert model(x[None]).shape == (1, 10)


def test_models_built_without_timm_carry_the_same_metadata():
    direct = create_model("crate_tiny").pretrained_cfg
    via_timm = timm.create_model("crate_tiny_patch16_224").pretrained_cfg
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation", "classifier", "num_classes"):
        assert direct[key] == via_timm[key], key
    assert timm.data.resolve_data_config(model=create_model("crate_debug"))["input_size"] == (3, 32, 32)


def test_reference_weights_load_through_timm_pretrained_cfg_overlay(tmp_path):
    ref = ReferenceCRATE(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, dim_head=16).eval()
    path = tmp_path / "reference.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}, "epoch": 1}, path)
    model = timm.create_model("crate_debug_patch8_32", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model.eval()(x) - ref(x)).abs().max().item() <= 1e-5
    # a new class count keeps the body and re-initialises the head
    five = timm.create_model(
        "crate_debug_patch8_32", pretrained=True, num_classes=5, pretrained_cfg_overlay={"file": str(path)}
    )
    torch.testing.assert_close(five.blocks[0].ista.dictionary, model.blocks[0].ista.dictionary)
    assert five.get_classifier().out_features == 5


def test_our_checkpoint_loads_through_timm_checkpoint_path(tmp_path):
    source = create_model("crate_debug").eval()
    cratevit.save_checkpoint(tmp_path / "ours.pth", source, epoch=3)
    model = timm.create_model("crate_debug_patch8_32", checkpoint_path=str(tmp_path / "ours.pth")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), atol=0, rtol=0)


def test_checkpoint_filter_fn_accepts_each_layout():
    ref = ReferenceCRATE(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, dim_head=16)
    ours = create_model("crate_debug").state_dict()
    for state in (
        ours,
        {"model": ours},
        {"module." + k: v for k, v in ours.items()},
        ref.state_dict(),
        {"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}},
    ):
        assert set(checkpoint_filter_fn(state)) == set(ours)


def test_forward_intermediates_agree_with_the_trace():
    model = timm.create_model("crate_nano_patch4_32").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        trace = model.forward_trace(x)
        final, maps = model.forward_intermediates(x, indices=[0, -1])
        tokens = model.forward_intermediates(x, indices=2, output_fmt="NLC", norm=True, intermediates_only=True)
    torch.testing.assert_close(final, model.forward_features(x))
    assert [m.shape for m in maps] == [(2, 96, 8, 8)] * 2
    for got, layer in zip(maps, (0, 5), strict=True):
        patches = trace.layers[layer].z_out[:, 1:]  # (b, 64, 96), row-major over the 8 x 8 grid
        torch.testing.assert_close(got.flatten(2).transpose(1, 2), patches)
    torch.testing.assert_close(tokens[1], model.fc_norm(trace.layers[5].z_out[:, 1:]))
    assert len(tokens) == 2 and tokens[0].shape == (2, 64, 96)
    with pytest.raises(ValueError, match="last 7 layers of a 6-layer model"):
        model.forward_intermediates(x, indices=7)
    with pytest.raises(ValueError, match=r"layer indices \[6\] must lie in -6..5"):
        model.forward_intermediates(x, indices=[6])


def test_features_only_backbone():
    backbone = timm.create_model("crate_nano_patch4_32", features_only=True)
    assert backbone.feature_info.channels() == [96, 96, 96] and backbone.feature_info.reduction() == [4, 4, 4]
    feats = backbone(torch.randn(2, 3, 32, 32))
    assert [f.shape for f in feats] == [(2, 96, 8, 8)] * 3
    early = timm.create_model("crate_nano_patch4_32", features_only=True, out_indices=(0, 1))
    assert len(early.model.blocks) == 2 and early.model.config.depth == 2  # later layers pruned
    assert [f.shape for f in early(torch.randn(1, 3, 32, 32))] == [(1, 96, 8, 8)] * 2


def test_layer_wise_lr_decay_groups_one_layer_at_a_time():
    import timm.optim

    model = timm.create_model("crate_nano_patch4_32")
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    scale_of = {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    decay_of = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert set(scale_of) == set(names.values())
    assert scale_of["head.weight"] == 1.0 and scale_of["fc_norm.weight"] == 0.5
    for i in range(6):  # embedding at 0.5**7, layer i at 0.5**(6 - i)
        assert scale_of[f"blocks.{i}.ista.dictionary"] == scale_of[f"blocks.{i}.norm1.weight"] == 0.5 ** (6 - i)
    assert scale_of["cls_token"] == scale_of["patch_embed.proj.weight"] == 0.5**7
    assert decay_of["pos_embed"] == decay_of["cls_token"] == 0.0 and decay_of["blocks.0.ista.dictionary"] == 0.05
