"""CRATE-alpha: the fast model against the literal formulation, the official key layout, the presets."""

import pytest
import torch

from cratevit import load_checkpoint
from cratevit.checkpoint.keys import CRATE_ALPHA_KEYS, from_reference_keys, state_family, to_reference_keys
from cratevit.errors import CheckpointError, UserError
from cratevit.models import CRATEAlpha, CRATEAlphaConfig, ReferenceCRATEAlpha, alpha_forward_flops
from cratevit.presets import PRESETS

ALPHA_PRESETS = {n: c for n, c in PRESETS.items() if isinstance(c, CRATEAlphaConfig)}

EXACT_PARAMS = {"crate_alpha_b16": 72_328_936, "crate_alpha_l14": 253_650_920}
SMALL = dict(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4, dim_head=16)


def from_official(state):
    return from_reference_keys(state, "crate_alpha")


def to_official(state):
    return to_reference_keys(state, "crate_alpha")


def paired(**kw):
    """The literal formulation and the fast model holding the same weights."""
    args = {**SMALL, **kw}
    ref = ReferenceCRATEAlpha(**args).eval()
    model = CRATEAlpha(**args).eval()
    model.load_state_dict(from_official(ref.state_dict()))
    return ref, model


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_exact_parameter_counts(name):
    with torch.device("meta"):
        model = CRATEAlpha(config=ALPHA_PRESETS[name])
    assert model.num_params() == EXACT_PARAMS[name]


def test_presets_sizes():
    assert sorted(n for n in ALPHA_PRESETS if not n.endswith(("_in21k", "_digits", "_debug"))) == [
        "crate_alpha_b16",
        "crate_alpha_b32",
        "crate_alpha_b8",
        "crate_alpha_l14",
        "crate_alpha_l32",
        "crate_alpha_l8",
    ]
    for name, cfg in ALPHA_PRESETS.items():
        if name.endswith("_in21k"):
            assert cfg.num_classes == 19167
            assert cfg.replace(num_classes=1000, name=None) == ALPHA_PRESETS[name.removesuffix("_in21k")]


@pytest.mark.parametrize("kw", [{}, {"heads": 1, "dim_head": 64}, {"depth": 3, "patch_size": 4}])
def test_fast_path_equals_literal_float32(kw):
    ref, model = paired(**kw)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert max_rel(model(x), ref(x)) <= 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_gradients_equal_literal_float32(impl):
    ref, model = paired()
    for block in model.blocks:
        block.mssa.attn_impl = impl
    x = torch.randn(2, 3, 32, 32)
    ref(x).square().sum().backward()
    model(x).square().sum().backward()
    ref_grads = from_official({k: p.grad for k, p in ref.named_parameters()})
    for k, p in model.named_parameters():
        assert p.grad is not None, k
        assert max_rel(p.grad, ref_grads[k]) <= 1e-5, k


def test_bfloat16_autocast_matches_literal():
    ref, model = paired()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        full = ref(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast, literal = model(x), ref(x)
    assert fast.dtype == literal.dtype == torch.bfloat16
    # both round to bfloat16 (8 bits of mantissa) at every product; they agree as well as each agrees with fp32
    assert max_rel(literal.float(), full) < 0.05
    assert max_rel(fast.float(), full) < 0.05
    assert max_rel(fast.float(), literal.float()) < 0.05


def test_bfloat16_autocast_gradients_match_literal():
    ref, model = paired()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref(x).float().square().sum().backward()
        model(x).float().square().sum().backward()
    ref_grads = from_official({k: p.grad for k, p in ref.named_parameters()})
    for k, p in model.named_parameters():
        assert p.grad.dtype == torch.float32, k
        assert max_rel(p.grad, ref_grads[k]) < 0.1, k


def test_block_is_the_equations():
    model = CRATEAlpha(**SMALL).eval()
    block = model.blocks[0]
    z = torch.randn(2, 17, 64)
    eta = lam = 0.1
    with torch.no_grad():
        z_half = z + block.mssa(block.norm1(z))
        x = torch.nn.functional.layer_norm(z_half, (64,), block.norm2.weight, block.norm2.bias, eps=1e-6)
        d, d_hat = block.ista.dictionary, block.ista.decoder
        a1 = torch.relu(eta * x @ d - eta * lam)
        a2 = torch.relu(a1 - eta * (a1 @ d.T - x) @ d - eta * lam)
        torch.testing.assert_close(block.ista.sparse_code(block.norm2(z_half)), a2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(block(z), z_half + a2 @ d_hat.T, rtol=1e-5, atol=1e-5)
    assert block.norm1.eps == block.norm2.eps == 1e-6 and model.fc_norm.eps == 1e-5
    assert block.mssa.out_proj.bias is None
    assert d.shape == d_hat.shape == (64, 256)


def test_trace_matches_forward_and_holds_the_sparse_code():
    ref, model = paired()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        trace = model.forward_trace(x)
        logits = model.forward_head(trace.features)
        torch.testing.assert_close(trace.features, model.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, ref(x), rtol=1e-5, atol=1e-5)
        for i, t in enumerate(trace.layers):
            block = model.blocks[i]
            assert t.proj.shape == (2, 4, 17, 16) and t.attn.shape == (2, 4, 17, 17)
            assert t.code.shape == (2, 17, 256) and (t.code >= 0).all()
            torch.testing.assert_close(t.proj, block.mssa.project(block.norm1(t.z_in)))
            torch.testing.assert_close(t.code, block.ista.sparse_code(block.norm2(t.z_half)))
            torch.testing.assert_close(t.z_out, block(t.z_in), rtol=1e-5, atol=1e-5)
    assert torch.equal(trace.layers[1].z_in, trace.layers[0].z_out)
    assert (trace.layers[-1].code == 0).float().mean() > 0  # relu codes: some atoms are off


def test_key_table_round_trips_and_covers_the_official_layout():
    official = ReferenceCRATEAlpha(**SMALL).state_dict()
    ours = from_official(official)
    assert set(ours) == set(CRATEAlpha(**SMALL).state_dict())
    back = to_official(ours)
    assert list(back) == list(official)
    assert all(back[k] is v for k, v in official.items())  # renaming only: the very same tensors
    pairs = CRATE_ALPHA_KEYS.body + CRATE_ALPHA_KEYS.head_one_stage
    assert len({o for o, _ in pairs}) == len({u for _, u in pairs}) == len(pairs)
    assert state_family(official) == ("crate_alpha", "reference")
    assert state_family(ours) == ("crate_alpha", "cratevit")
    with pytest.raises(CheckpointError, match=r"unexpected key 'transformer\.layers\.0\.1\.fn\.weight'"):
        from_official({"transformer.layers.0.1.fn.weight": torch.zeros(1)})


def test_bad_config_is_a_clear_error():
    with pytest.raises(UserError, match="overcomplete must be a positive integer"):
        CRATEAlphaConfig(overcomplete=0)
    with pytest.raises(UserError, match="CRATEAlphaConfig"):
        from cratevit.models import CRATEConfig

        CRATEAlpha(config=CRATEConfig())


def test_flops_count_four_dictionary_products():
    cfg = ALPHA_PRESETS["crate_alpha_b16"]
    # 12 layers x 197 tokens x (768 x 3072) x 4 products x 2 FLOPs, plus attention, stem and head
    ista = 12 * 197 * 768 * 3072 * 4 * 2
    assert alpha_forward_flops(cfg) > ista
    # ViT-B/16's 17.56 GMACs, less the key and value projections (2.79), plus two more d x 4d products (11.16)
    assert alpha_forward_flops(cfg) / 2e9 == pytest.approx(17.56 - 2.79 + 11.16, abs=0.02)


def official_state_dict(name, seed=0):
    """Random tensors with the official names and shapes of a preset, scaled like a trained network's."""
    cfg = ALPHA_PRESETS[name]
    with torch.device("meta"):
        shapes = {
            k: v.shape
            for k, v in ReferenceCRATEAlpha(
                image_size=cfg.image_size[0],
                patch_size=cfg.patch_size[0],
                num_classes=cfg.num_classes,
                dim=cfg.dim,
                depth=cfg.depth,
                heads=cfg.heads,
                dim_head=cfg.dim_head,
            )
            .state_dict()
            .items()
        }
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if key.endswith("norm.weight") or key == "mlp_head.0.weight":
            t = 1 + 0.1 * t
        elif t.ndim >= 2 and key not in ("pos_embedding", "cls_token"):
            t = t * (shape[-1] if t.ndim == 2 else t[0].numel()) ** -0.5
        else:
            t = 0.1 * t
        state[key] = t
    return state


@pytest.mark.parametrize("name", ["crate_alpha_b16", pytest.param("crate_alpha_l14", marks=pytest.mark.slow)])
def test_official_file_loads_with_no_arguments_and_gives_the_literal_logits(name, tmp_path):
    official = official_state_dict(name)
    path = tmp_path / "official.pth"
    torch.save(official, path)
    model = load_checkpoint(path).eval()  # no arguments: the architecture from the shapes, strictly
    assert type(model) is CRATEAlpha and model.config == ALPHA_PRESETS[name]
    assert model.config.name == name
    with torch.device("meta"):
        ref = ReferenceCRATEAlpha(
            image_size=224,
            patch_size=model.config.patch_size[0],
            num_classes=1000,
            dim=model.config.dim,
            depth=model.config.depth,
            heads=model.config.heads,
        )
    ref.load_state_dict(official, strict=True, assign=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_rel(model(x), ref.eval()(x)) <= 1e-5
    assert model.pretrained_cfg["crop_pct"] == 0.875 and model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)


def small_official_file(tmp_path):
    """An official-layout file of the debug size (a bare state_dict, as the Hub's .pth files are)."""
    torch.manual_seed(0)
    ref = ReferenceCRATEAlpha(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, dim_head=16)
    path = tmp_path / "official.pth"
    torch.save(ref.state_dict(), path)
    return path, ref.eval()


def test_export_reference_keys_round_trips_bit_for_bit(tmp_path, capsys):
    from safetensors.torch import load_file

    from cratevit.cli import main

    path, _ = small_official_file(tmp_path)
    out = tmp_path / "official.safetensors"
    assert main(["export", str(path), "--format", "safetensors", "--reference-keys", "-o", str(out)]) == 0
    assert "crate_alpha_debug" in capsys.readouterr().out
    original, exported = torch.load(path, weights_only=True), load_file(out)
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], v) and exported[k].dtype == v.dtype for k, v in original.items())
    again = load_checkpoint(out)  # the export loads back, as CRATE-alpha, from its official names
    assert type(again) is CRATEAlpha and again.config.name == "crate_alpha_debug"


def test_hugging_face_folder_and_onnx(tmp_path):
    from cratevit.interop.export import export_onnx, verify_onnx

    path, ref = small_official_file(tmp_path)
    model = load_checkpoint(path).eval()
    model.save_pretrained(tmp_path / "folder")
    again = CRATEAlpha.from_pretrained(tmp_path / "folder")
    assert type(again) is CRATEAlpha and again.config == model.config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ref(x), rtol=1e-5, atol=1e-6)
    onnx = export_onnx(model, tmp_path / "m.onnx")
    assert max(verify_onnx(model, onnx).values()) < 1e-4


def test_timm_names_and_preprocessing_of_the_released_sizes():
    import timm
    import timm.data

    model = timm.create_model("crate_alpha_b16_224", pretrained=False)
    assert type(model) is CRATEAlpha and model.num_params() == EXACT_PARAMS["crate_alpha_b16"]
    data_cfg = timm.data.resolve_data_config(model=model)
    assert data_cfg == {
        "input_size": (3, 224, 224),
        "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 0.875,
        "crop_mode": "center",
    }
    transform = timm.data.create_transform(**data_cfg)
    assert [type(t).__name__ for t in transform.transforms][:2] == ["Resize", "CenterCrop"]
    assert transform.transforms[0].size == 256
    assert model.pretrained_cfg["first_conv"] == "patch_embed.proj"
    assert timm.create_model("crate_alpha_l14_in21k_224", pretrained=False).num_classes == 19167


@pytest.mark.parametrize("name", sorted(n for n in ALPHA_PRESETS if not n.endswith(("_digits", "_debug"))))
def test_every_released_size_is_read_from_its_official_shapes(name):
    """Shapes only (meta tensors): the official names of each size, IN-21K heads included, give back its preset."""
    from cratevit.checkpoint.infer import infer_alpha_config

    cfg = ALPHA_PRESETS[name]
    with torch.device("meta"):
        official = ReferenceCRATEAlpha(image_size=224, patch_size=cfg.patch_size[0], num_classes=cfg.num_classes,
                                       dim=cfg.dim, depth=cfg.depth, heads=cfg.heads).state_dict()  # fmt: skip
    assert state_family(official) == ("crate_alpha", "reference")
    inferred = infer_alpha_config(from_official(official))
    assert inferred == cfg and inferred.name == name
