"""ToST as a family of the house: its record, presets, loading, and every command on a tiny ToST.

Commands: train (digits) and finetune (from an official-layout file), info, predict, analyze, attention, pca,
segeval (paper protocol), maskcut, explore, probe, export (ONNX, save_pretrained folder); the DDP hook; bad inputs
(a file of another family, an image size the stem cannot take) as one line through the library and the CLI.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cratevit.checkpoint import create_model, load_checkpoint, load_model, save_checkpoint
from cratevit.cli import main
from cratevit.errors import CheckpointError, UserError
from cratevit.models import ToST
from cratevit.models.reference_tost import ReferenceToST
from cratevit.presets import PRESET_INFO, PRESETS, timm_name
from cratevit.registry import ddp_prepare, get_family, layer_count, layer_label, trace_blocks

QUICK = ["--steps-per-epoch", "2", "--workers", "0", "--print-freq", "1", "--threads", "1"]


def photo(path, seed=0, size=(48, 64)):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`cratevit train --arch tost_debug` on the digits: two steps."""
    run = tmp_path_factory.mktemp("tost") / "run"
    args = ["train", "--arch", "tost_debug", "--epochs", "1", "--batch-size", "16", "--output", str(run), *QUICK]
    assert main(args) == 0
    return run / "last.pt"


def test_the_family_record_and_presets():
    family = get_family("tost")
    assert family.model_cls is ToST and family.card.loader == "ToST" and family.license == "mit"
    assert family.paper["paper_ids"] == "arXiv:2412.17810" and family.card.pipeline_tag == "image-classification"
    assert family.code_kind(PRESETS["tost_digits"]) is None  # TSSA + MLP: no ISTA code
    official = [n for n, info in PRESET_INFO.items() if info.family == "tost" and n.startswith("tost_cab_")]
    assert len(official) == 12 and {"tost_digits", "tost_shapes", "tost_debug"} <= set(PRESETS)
    assert timm_name("tost_cab_small_12_p16") == "tost_cab_small_12_p16_224"
    prep = PRESET_INFO["tost_cab_small_12_p16"].preprocessing
    assert (prep.crop_pct, prep.interpolation) == (0.875, "bicubic")  # the official datasets.py eval transform
    assert PRESET_INFO["tost_digits"].preprocessing.mean == (0.5, 0.5, 0.5)
    model = create_model("tost_digits")
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.pretrained_cfg["license"] == "mit" and model.pretrained_cfg["fixed_input_size"] is False


def test_trace_layers_are_the_tssa_blocks_then_the_class_blocks():
    torch.manual_seed(0)
    model = create_model("tost_debug").eval()
    assert layer_count(model) == 4 and list(trace_blocks(model)) == [*model.blocks, *model.class_blocks]
    assert "TSSA" in layer_label(model, 1) and "class_blocks.1" in layer_label(model, -1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        trace = model.trace_layers(x)
        native = model.forward_trace(x)
        torch.testing.assert_close(model.forward_head(trace.features), model(x))
    assert [t.kind for t in trace.layers] == ["tssa", "tssa", "class-attention", "class-attention"]
    t = trace.layers[1]
    assert t.attn.shape == (2, 2, 17, 17) and t.proj.shape == (2, 2, 17, 16)
    pi = native.layers[1].membership  # (b, h, n): the class row is Pi normalised over the tokens
    torch.testing.assert_close(t.attn[:, :, 0, 1:], pi / pi.sum(-1, keepdim=True))
    torch.testing.assert_close(t.attn[:, :, 1:, 1:], torch.eye(16).expand(2, 2, 16, 16))
    torch.testing.assert_close(t.z_out[:, 1:], native.layers[1].z_out)
    torch.testing.assert_close(t.z_in[:, 0], model.cls_token[:, 0].expand(2, -1))  # the class token waits
    last = trace.layers[-1]
    torch.testing.assert_close(last.attn[:, :, 0], native.class_attention[-1])
    torch.testing.assert_close(last.attn[:, :, 0].sum(-1), torch.ones(2, 2))


def test_ddp_hook_converts_the_stem_batchnorm_on_accelerators_only():
    model = create_model("tost_debug")
    assert type(ddp_prepare(model, "cpu").patch_embed.stages[0].norm) is torch.nn.BatchNorm2d
    synced = ddp_prepare(model, "cuda")
    assert all(type(s.norm) is torch.nn.SyncBatchNorm for s in synced.patch_embed.stages)
    crate = create_model("crate_debug")
    assert ddp_prepare(crate, "cuda") is crate


def test_train_then_every_command(trained, tmp_path, capsys):
    model = load_checkpoint(trained)
    assert type(model) is ToST and model.config.name == "tost_debug"
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # trained on the digits: their normalisation
    capsys.readouterr()

    assert main(["info", str(trained), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "tost" and info["params"] == model.num_params() and info["gflops_per_image"] > 0

    images = [photo(tmp_path / "a.png"), photo(tmp_path / "b.png", 1)]
    assert main(["predict", str(trained), images[0], "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out.splitlines()[0])["top"]) == 5

    out = tmp_path / "analyze"
    assert main(["analyze", str(trained), "--num-images", "8", "-o", str(out)]) == 0
    assert "membership entropy" in capsys.readouterr().out
    (stats,) = json.loads((out / "layerwise.json").read_text()).values()
    rows = stats["layers"]
    assert len(rows) == 4 and all(np.isfinite(r["rc_in_mean"]) for r in rows)
    assert all(0 < r["pi_entropy_mean"] <= 1 and r["second_moment_mean"] > 0 for r in rows[:2])
    assert all("pi_entropy_mean" not in r for r in rows[2:])  # the class-attention blocks have no TSSA statistics
    assert (out / "pi_entropy.png").is_file() and (out / "second_moment.png").is_file()

    for layer in ("0", "-1"):
        att = tmp_path / f"att{layer}"
        assert main(["attention", str(trained), *images, "-o", str(att), "--size", "32", "--layer", layer]) == 0
        maps = np.load(att / "a" / "attention.npy")  # 64x48 -> 40x32: 4x5 patches
        mass = maps.sum(axis=(1, 2))  # Pi normalised over the tokens; the class token also attends to itself
        assert maps.shape == (2, 4, 5) and (np.allclose(mass, 1, atol=1e-5) if layer == "0" else (mass < 1).all())
    assert main(["attention", str(trained), images[0], "-o", str(tmp_path / "x"), "--layer", "4"]) == 2
    assert "out of range for a 4-layer model" in capsys.readouterr().err

    assert main(["pca", str(trained), *images, "-o", str(tmp_path / "pca"), "--size", "32"]) == 0
    seg = tmp_path / "seg"
    assert main(["segeval", str(trained), "--protocol", "paper", "--num-images", "4", "-o", str(seg)]) == 0
    assert "paper mIoU" in capsys.readouterr().out
    mc = tmp_path / "maskcut"
    assert main(["maskcut", str(trained), images[0], "-o", str(mc), "--size", "32"]) == 0
    assert json.loads((mc / "results.json").read_text())
    probe = tmp_path / "probe"
    assert main(["probe", str(trained), "--output", str(probe), "--no-cache", "--layer", "1"]) == 0
    assert "linear probe: top-1" in capsys.readouterr().out


def test_finetune_from_an_official_file(tmp_path):
    """`cratevit finetune --arch tost_debug --pretrained OFFICIAL.pth`: the official layout, a new 6-way head."""
    torch.manual_seed(0)
    ref = ReferenceToST(patch_size=8, num_classes=19, dim=32, depth=2, heads=2, eta=1.0)
    torch.save({"model": ref.state_dict(), "epoch": 3}, tmp_path / "official.pth")
    run = tmp_path / "ft"
    assert main(["finetune", "--arch", "tost_debug", "--pretrained", str(tmp_path / "official.pth"), "--lr", "1e-9",
                 "--data", "shapes", "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--output",
                 str(run), *QUICK]) == 0  # fmt: skip
    tuned = load_checkpoint(run / "last.pt").state_dict()
    assert tuned["head.weight"].shape == (6, 32)  # the 19-way head was replaced by a 6-way one (shapes)
    torch.testing.assert_close(tuned["blocks.1.tssa.temperature"], ref.state_dict()["blocks.1.attn.temp"])


def test_explore_page_shows_membership_and_class_attention():
    from cratevit.explore import load_explorer
    from tests.explore.test_explore import _client, _open

    torch.manual_seed(0)
    client = _client(load_explorer("tost_debug"))
    info = client.get("/api/info").json
    assert info["family"] == "tost" and info["depth"] == 4 and not info["has_code"] and info["resizable"]
    assert info["facets"] == ["token", "key", "attn"]
    image_id = _open(client, sample="chelsea")["image_id"]
    for layer in (1, 3):  # a TSSA block's membership, the last class-attention block's map
        v = client.get(f"/api/view?image_id={image_id}&layer={layer}&facet=key&protocol=mass").json
        assert "error" not in v and len(v["attention"]["heads"]) == 2 and len(v["curves"]["image"]["rc"]) == 4


def test_hub_folder_and_onnx_round_trip(tmp_path):
    from cratevit.interop.export import export_onnx
    from tests.interop.test_onnx import run_onnx

    torch.manual_seed(0)
    model = create_model("tost_debug").eval()
    model.save_pretrained(tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "license: mit" in card and "ToST" in card
    again = ToST.from_pretrained(tmp_path / "hf")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
        expected = model(x).numpy()
    path = export_onnx(model, tmp_path / "tost.onnx", batch_size=2)
    assert np.abs(run_onnx(path, x) - expected).max() <= 1e-4  # another batch size than the exported one


def test_bad_inputs_get_one_line(tmp_path, capsys):
    crate = tmp_path / "crate.pt"
    save_checkpoint(crate, create_model("crate_debug"))
    with pytest.raises(CheckpointError, match="holds a crate model, not a tost one") as err:
        load_checkpoint(crate, arch="tost_debug")
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(str(crate), arch="tost_digits")
    with pytest.raises(UserError, match="not a multiple of the patch size 8") as err:
        load_model("tost_debug", image_size=30)
    assert "\n" not in str(err.value)
    tost = tmp_path / "tost.pt"
    save_checkpoint(tost, create_model("tost_debug"))
    with pytest.raises(UserError, match="multiple of 8"):
        load_checkpoint(tost, image_size=36)
    image = photo(tmp_path / "a.png")
    capsys.readouterr()
    assert main(["predict", str(crate), image, "--arch", "tost_debug"]) == 2
    err_text = capsys.readouterr().err
    assert "holds a crate model" in err_text and len(err_text.strip().splitlines()) == 1
    assert main(["info", "tost_debug", "--image-size", "30"]) == 2
    err_text = capsys.readouterr().err
    assert "not a multiple of the patch size 8" in err_text and len(err_text.strip().splitlines()) == 1
    with torch.no_grad(), pytest.raises(UserError, match="image size 30x32 is not a multiple of 8"):
        create_model("tost_debug")(torch.randn(1, 3, 30, 32))
