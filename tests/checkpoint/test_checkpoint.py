import os

import pytest
import torch

from cratevit import CRATE, CheckpointError, create_model, load_checkpoint, save_checkpoint, save_safetensors
from cratevit.checkpoint import atomic_save, load_into, read_checkpoint
from cratevit.presets import get_config
from reference_crate import ReferenceCRATE

KW = dict(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4, dim_head=16)
DEBUG = get_config("crate_debug")


def reference_checkpoint(path, module_prefix=True, whole=True, **kw):
    ref = ReferenceCRATE(**{**KW, **kw}).eval()
    state = ref.state_dict()
    if module_prefix:
        state = {f"module.{k}": v for k, v in state.items()}
    obj = (
        {
            "epoch": 100,
            "arch": "CRATE_small",
            "state_dict": state,
            "best_acc1": torch.tensor(70.5),
            "optimizer": {"state": {}, "param_groups": []},
            "scheduler": {"last_epoch": 3},
        }
        if whole
        else state
    )
    torch.save(obj, path)
    return ref


@pytest.mark.parametrize("module_prefix", [True, False])
@pytest.mark.parametrize("whole", [True, False])
def test_reference_checkpoint_loads_strictly_with_same_logits(tmp_path, module_prefix, whole):
    path = tmp_path / "crate.pth"
    ref = reference_checkpoint(path, module_prefix, whole)
    model = CRATE(**KW).eval()
    meta = load_into(model, path)
    assert meta["family"] == ("reference" if whole else "reference-state-dict")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_reference_checkpoint_for_another_architecture_lists_keys(tmp_path):
    path = tmp_path / "crate.pth"
    reference_checkpoint(path, dim=32, heads=2)
    with pytest.raises(CheckpointError, match=r"shape mismatch pos_embed: file \(1, 17, 32\) vs model \(1, 17, 64\)"):
        load_into(CRATE(**KW), path)
    reference_checkpoint(path, depth=3)
    with pytest.raises(CheckpointError, match=r"unexpected \['blocks.2"):
        load_into(CRATE(**KW), path)


def test_head_of_another_size_is_dropped_only_when_asked(tmp_path):
    path = tmp_path / "crate.pth"
    ref = reference_checkpoint(path, num_classes=1000)
    with pytest.raises(CheckpointError, match="classifier has another class count"):
        load_into(CRATE(**KW), path)
    model = CRATE(**KW)
    load_into(model, path, drop_head=True)
    torch.testing.assert_close(model.blocks[1].ista.dictionary, ref.transformer.layers[1][1].fn.weight)
    assert model.head.weight.shape == (10, 64)


def test_own_checkpoint_describes_itself(tmp_path):
    model = create_model("crate_debug", num_classes=3).eval()
    path = save_checkpoint(tmp_path / "run" / "last.pt", model, epoch=4)
    loaded = load_checkpoint(path).eval()
    assert loaded.config == model.config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    _state, cfg, meta = read_checkpoint(path)
    assert meta["epoch"] == 4 and meta["family"] == "cratevit" and cfg.num_classes == 3


def test_create_model_with_checkpoint_replaces_head_for_finetuning(tmp_path):
    src = create_model("crate_debug")
    path = save_checkpoint(tmp_path / "a.pt", src)
    model = create_model("crate_debug", num_classes=4, checkpoint=path)
    assert model.head.out_features == 4
    assert torch.equal(model.blocks[0].ista.dictionary, src.blocks[0].ista.dictionary)


@pytest.mark.parametrize("reference_keys", [False, True])
def test_safetensors_round_trip(tmp_path, reference_keys):
    model = create_model("crate_debug").eval()
    path = save_safetensors(tmp_path / "m.safetensors", model, reference_keys=reference_keys)
    loaded = load_checkpoint(path).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_reference_checkpoint_needs_arch_when_file_has_none(tmp_path):
    path = tmp_path / "bare.pth"
    reference_checkpoint(path, whole=False)
    with pytest.raises(CheckpointError, match="does not record its architecture; pass arch="):
        load_checkpoint(path)
    cfg = DEBUG.replace(**{k: v for k, v in KW.items()})
    model = load_checkpoint(path, arch=cfg)
    assert model.config.dim == 64


def test_unreadable_files_get_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        read_checkpoint(tmp_path / "nope.pt")
    text = tmp_path / "notes.pt"
    text.write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(text)
    good = save_checkpoint(tmp_path / "good.pt", create_model("crate_debug"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(truncated)
    st = tmp_path / "bad.safetensors"
    st.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_checkpoint(st)
    torch.save({"weights": [1, 2, 3]}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="is not a CRATE checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_into(CRATE(**KW), tmp_path / "foreign.pt")


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_timm_training_run_is_named_as_such_and_built_by_the_analysis_loader(tmp_path):
    import timm

    from cratevit.analysis.segmentation import load_vision_model

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
    train_config = {"arch": "vit_tiny_patch16_224", "image_size": 32, "patch_size": 8, "model_kwargs": kwargs}
    run = {"format": "timm", "arch": "vit_tiny_patch16_224", "model": vit.state_dict(), "train_config": train_config}
    torch.save(run, tmp_path / "best.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "best.pt")
    message = str(err.value)
    assert "\n" not in message and "run of a timm model" in message and "vit_tiny_patch16_224" in message
    assert "load_vision_model" in message and "damaged" not in message
    built = load_vision_model(str(tmp_path / "best.pt"))
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(built.eval()(x), vit.eval()(x))


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="never runs code"):
        read_checkpoint(path)


def test_atomic_save_keeps_previous_file_when_save_fails(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"a": torch.ones(2)}, path)
    assert path.stat().st_mode & 0o044  # readable by others like any new file (mkstemp alone gives 0600)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"a": Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
