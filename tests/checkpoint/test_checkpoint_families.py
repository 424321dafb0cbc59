"""Every checkpoint family loads with one call and gives the literal reference formulation's logits.

Each test writes a small file in the family's exact layout (same keys, nesting, ``module.`` prefix and side
entries as the original scripts write), loads it through the public API and compares outputs.
"""

import pytest
import torch
from safetensors.torch import save_file

from cratevit import (
    CRATE,
    CheckpointError,
    CRATEConfig,
    create_model,
    load_checkpoint,
    save_checkpoint,
    save_safetensors,
)
from cratevit.checkpoint import FAMILIES, infer_config, read_checkpoint, to_reference_keys
from cratevit.presets import get_config
from reference_crate import ReferenceCRATE
from reference_crate_demo import ReferenceDemoCRATE

# crate_debug's shapes: the presets tell the head count, so these files load with no argument at all.
DEBUG = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, dim_head=16)
# shapes no preset has: the head count must be given.
ODD = dict(image_size=32, patch_size=8, num_classes=7, dim=48, depth=2, heads=4, dim_head=12)
# the demo's structure in small: heads x dim_head == dim, a dim -> hidden -> classes two-stage head.
DEMO = dict(image_size=32, patch_size=8, num_classes=21, dim=32, depth=2, heads=2, dim_head=16, hidden=32)


def prefixed(state):
    return {f"module.{k}": v for k, v in state.items()}


def optimizer_state(model):
    """A real optimizer state (tensors, ints, floats), as the original scripts save next to the weights."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    opt.step()
    model.zero_grad()
    return opt.state_dict()


def write_main_py(path, ref, arch="CRATE_debug"):
    """main.py (ImageNet-1K training): DistributedDataParallel keys under 'state_dict', and the run state."""
    torch.save(
        {
            "epoch": 90,
            "arch": arch,
            "state_dict": prefixed(ref.state_dict()),
            "best_acc1": torch.tensor(71.3),
            "optimizer": optimizer_state(ref),
            "scheduler": {"last_epoch": 89, "base_lrs": [2e-4]},
        },
        path,
    )


def write_finetune_py(path, ref):
    """finetune.py: DataParallel keys under 'model', the optimizer and the AMP GradScaler."""
    scaler = {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 7,
    }
    torch.save({"model": prefixed(ref.state_dict()), "optimizer": optimizer_state(ref), "scaler": scaler}, path)


def write_demo(path, ref):
    """The emergence-demo files: the weights under 'model', no prefix."""
    torch.save({"model": ref.state_dict()}, path)


def reference(kw):
    if "hidden" in kw:
        return ReferenceDemoCRATE(**kw).eval()
    return ReferenceCRATE(**kw).eval()


def reference_logits(ref, x):
    return ref.logits(x) if isinstance(ref, ReferenceDemoCRATE) else ref(x)


FAMILY_CASES = {
    "reference": (write_main_py, DEBUG, {}),
    "reference-finetune": (write_finetune_py, ODD, {"heads": 4}),
    "emergence-demo": (write_demo, DEMO, {"heads": 2}),
}


@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_each_reference_family_loads_with_one_call_and_gives_reference_logits(tmp_path, family):
    write, kw, extra = FAMILY_CASES[family]
    ref = reference(kw)
    path = tmp_path / "weights.pth"
    write(path, ref)
    _, _, meta = read_checkpoint(path)
    assert meta["family"] == family and family in FAMILIES
    model = load_checkpoint(path, **extra).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(ref, x), rtol=1e-5, atol=1e-5)
    assert model.config.num_classes == kw["num_classes"] and model.config.patch_size == (8, 8)


def test_demo_two_stage_head_maps_to_pre_logits_and_head(tmp_path):
    ref = reference(DEMO)
    path = tmp_path / "crate_demo.pth"
    write_demo(path, ref)
    model = load_checkpoint(path, heads=2).eval()
    assert model.config.head_hidden_dim == 32 and model.config.heads == 2 and model.config.dim_head == 16
    torch.testing.assert_close(model.pre_logits.weight, ref.mlp_head[1].weight)
    torch.testing.assert_close(model.head.weight, ref.head.weight)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the demo code's forward is the pre-logits; the logits are head() of it
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), ref(x))
        torch.testing.assert_close(model(x), ref.logits(x), rtol=1e-5, atol=1e-5)
    exported = to_reference_keys(model.state_dict())  # and back: the demo's own key layout
    assert {"mlp_head.1.weight", "head.weight"} <= exported.keys() and exported["mlp_head.1.weight"].shape == (32, 32)
    again = ReferenceDemoCRATE(**DEMO).eval()
    again.load_state_dict(exported, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(again.logits(x), ref.logits(x))


def test_demo_files_at_preset_shapes_need_no_argument(tmp_path):
    """A one-stage emergence-demo file (the layout of CRATE_small_21k / base_21k / base_768) of crate_debug shapes."""
    ref = reference(DEBUG)
    path = tmp_path / "demo_small.pth"
    write_demo(path, ref)
    model = load_checkpoint(path).eval()
    assert model.config == get_config("crate_debug") and model.config.name == "crate_debug"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("write", [write_main_py, write_finetune_py, write_demo])
def test_create_model_with_checkpoint_reads_every_family(tmp_path, write):
    ref = reference(DEBUG)
    path = tmp_path / "w.pth"
    write(path, ref)
    model = create_model("crate_debug", checkpoint=path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    finetune = create_model("crate_debug", num_classes=3, checkpoint=path)  # new head, body kept
    assert finetune.head.out_features == 3
    torch.testing.assert_close(finetune.blocks[1].ista.dictionary, ref.transformer.layers[1][1].fn.weight)


def test_main_py_arch_entry_that_is_no_preset_falls_back_to_the_shapes(tmp_path):
    ref = reference(ODD)
    path = tmp_path / "vit.pth"
    write_main_py(path, ref, arch="CRATE_custom")
    model = load_checkpoint(path, heads=4).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_own_checkpoints_and_safetensors_without_config(tmp_path):
    model = create_model("crate_debug", num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        for path in (
            save_checkpoint(tmp_path / "run" / "last.pt", model, epoch=1),
            save_safetensors(tmp_path / "m.safetensors", model, reference_keys=True),
        ):
            assert torch.equal(load_checkpoint(path).eval()(x), want)
        bare = tmp_path / "bare.safetensors"  # no configuration in the metadata: read from the shapes
        save_file(to_reference_keys(model.state_dict()), str(bare))
        loaded = load_checkpoint(bare).eval()
        assert loaded.config.num_classes == 4 and loaded.config.heads == 2
        assert torch.equal(loaded(x), want)


def damaged(family, kw, tmp_path, edit):
    write, _, _ = FAMILY_CASES.get(family, (None, None, None))
    ref = reference(kw)
    path = tmp_path / f"{family}.pth"
    if family == "cratevit":
        model = CRATE(**kw)
        obj = {"format": "cratevit", "config": model.config.to_dict(), "model": edit(model.state_dict(), "")}
        torch.save(obj, path)
        return path
    write(path, ref)
    obj = torch.load(path, weights_only=True)
    entry = "state_dict" if "state_dict" in obj else "model"
    obj[entry] = edit(dict(obj[entry]), "module." if family in ("reference", "reference-finetune") else "")
    torch.save(obj, path)
    return path


def drop(key_ref, key_ours):
    def edit(state, prefix):
        key = prefix + (key_ours if "pos_embed" in state or "blocks.0.norm1.weight" in state else key_ref)
        del state[key]
        return state

    return edit


def reshape(key_ref, key_ours):
    def edit(state, prefix):
        key = prefix + (key_ours if "blocks.0.norm1.weight" in state else key_ref)
        state[key] = state[key].reshape(4, -1)
        return state

    return edit


CASES = [
    ("reference", DEBUG, {}),
    ("reference-finetune", ODD, {"heads": 4}),
    ("emergence-demo", DEMO, {"heads": 2}),
    ("cratevit", DEBUG, {}),
]


@pytest.mark.parametrize(("family", "kw", "extra"), CASES, ids=[c[0] for c in CASES])
def test_removed_tensor_gets_one_error_naming_the_key(tmp_path, family, kw, extra):
    path = damaged(family, kw, tmp_path, drop("transformer.layers.1.1.fn.weight", "blocks.1.ista.dictionary"))
    with pytest.raises(CheckpointError, match=r"missing \['blocks\.1\.ista\.dictionary'\]") as err:
        load_checkpoint(path, **extra)
    assert "\n" not in str(err.value) and "damaged" in str(err.value)
    if family != "cratevit":
        prefix = "module." if family != "emergence-demo" else ""
        assert f"in the file: ['{prefix}transformer.layers.1.1.fn.weight']" in str(err.value)


@pytest.mark.parametrize(("family", "kw", "extra"), CASES, ids=[c[0] for c in CASES])
def test_reshaped_tensor_gets_one_error_naming_the_key(tmp_path, family, kw, extra):
    path = damaged(family, kw, tmp_path, reshape("to_patch_embedding.3.weight", "patch_embed.norm_out.weight"))
    dim = kw["dim"]
    with pytest.raises(
        CheckpointError,
        match=rf"shape mismatch patch_embed\.norm_out\.weight: file \(4, {dim // 4}\) "
        rf"vs model \({dim},\)",
    ) as err:
        load_checkpoint(path, **extra)
    if family != "cratevit":
        prefix = "module." if family != "emergence-demo" else ""
        assert f"({prefix}to_patch_embedding.3.weight in the file)" in str(err.value)


def test_tensor_needed_for_the_shapes_missing_is_named(tmp_path):
    path = damaged("reference-finetune", ODD, tmp_path, drop("pos_embedding", "pos_embed"))
    with pytest.raises(CheckpointError, match=r"tensor pos_embed \(module\.pos_embedding in the file\) is missing"):
        load_checkpoint(path, heads=4)


def test_head_count_ambiguity_is_an_explicit_error(tmp_path):
    ref = reference(ODD)
    path = tmp_path / "ft.pth"
    write_finetune_py(path, ref)
    with pytest.raises(CheckpointError, match="does not record its architecture; pass arch=") as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "heads=N" in message and "shapes alone cannot tell the head count" in message
    assert "no preset has dim 48, depth 2 and a 48-wide projection" in message
    with pytest.raises(CheckpointError, match=r"heads=5 does not divide the 48-wide subspace projection"):
        load_checkpoint(path, heads=5)
    state, _, _ = read_checkpoint(path)
    a, b = CRATEConfig(**{**ODD, "heads": 2, "dim_head": 24}), CRATEConfig(**ODD)
    with pytest.raises(CheckpointError, match=r"presets of these shapes disagree \(a: 2, b: 4\)"):
        infer_config(state, presets={"a": a, "b": b})
    assert infer_config(state, presets={"b": b}).heads == 4  # one preset of these shapes: its head count


@pytest.mark.parametrize(
    "name",
    [
        "crate_base_demo",
        "crate_small_21k",
        "crate_base_21k",
        "crate_base_768",
        "crate_tiny",
        "crate_small",
        "crate_base",
        "crate_large",
        "crate_tiny_patch8",
        "crate_small_patch8",
        "crate_base_patch8",
        "crate_large_patch8",
    ],
)
def test_auto_reads_every_zoo_configuration_from_real_size_shapes(name):
    """Full-size state_dicts on the meta device (shapes only, no memory): arch='auto' recovers the preset."""
    with torch.device("meta"):
        state = CRATE(config=get_config(name)).state_dict()
    cfg = infer_config(state)
    assert cfg == get_config(name) and cfg.name == name
    reference_layout = to_reference_keys(state)
    assert ("head.weight" in reference_layout) == (name == "crate_base_demo")


def test_arch_auto_is_explicit_too(tmp_path):
    ref = reference(DEBUG)
    path = tmp_path / "main.pth"
    write_main_py(path, ref, arch="CRATE_tiny")  # a wrong arch entry: "auto" ignores it and reads the shapes
    with pytest.raises(CheckpointError, match="load_checkpoint\\(path, arch='auto'\\)"):
        load_checkpoint(path)
    model = load_checkpoint(path, arch="auto").eval()
    assert model.config.name == "crate_debug"
