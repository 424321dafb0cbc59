"""Everything cratevit does for CRATE, on CRATE-alpha: train, finetune, analyze, attention, pca, segeval."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cratevit import load_checkpoint
from cratevit.cli import main
from cratevit.models import CRATEAlpha
from tests.data.test_data import no_checksums, write_cifar10  # noqa: F401

QUICK = ["--steps-per-epoch", "2", "--workers", "0", "--print-freq", "1", "--threads", "1"]


def photo(path, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return str(path)


def test_train_finetune_and_study_a_crate_alpha(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--arch",
                "crate_alpha_debug",
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--output",
                str(run),
                *QUICK,
            ]
        )
        == 0
    )
    model = load_checkpoint(run / "last.pt")
    assert type(model) is CRATEAlpha and model.config.name == "crate_alpha_debug"
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # trained on the digits: their normalisation

    tuned = tmp_path / "tuned"
    assert (
        main(
            [
                "train",
                "--arch",
                "crate_alpha_debug",
                "--pretrained",
                str(run / "last.pt"),
                "--data",
                "shapes",
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--output",
                str(tuned),
                *QUICK,
            ]
        )
        == 0
    )
    start, after = model.state_dict(), load_checkpoint(tuned / "last.pt").state_dict()
    assert after["blocks.0.ista.decoder"].shape == start["blocks.0.ista.decoder"].shape
    assert 0 < (after["blocks.0.ista.decoder"] - start["blocks.0.ista.decoder"]).abs().max() < 0.1

    out = tmp_path / "analyze"
    assert main(["analyze", str(run / "last.pt"), "--num-images", "8", "-o", str(out)]) == 0
    assert "non-zeros of the code A_2" in capsys.readouterr().out
    (stats,) = json.loads((out / "layerwise.json").read_text()).values()
    layers = stats["layers"]
    assert len(layers) == 2 and all(0 < row["code_sparsity_mean"] < 1 for row in layers)
    assert (out / "code_sparsity.png").is_file()

    images = [photo(tmp_path / "a.png"), photo(tmp_path / "b.png", 1)]
    assert main(["attention", str(run / "last.pt"), *images, "-o", str(tmp_path / "att"), "--size", "64"]) == 0
    assert main(["pca", str(run / "last.pt"), *images, "-o", str(tmp_path / "pca"), "--size", "64"]) == 0
    assert any((tmp_path / "att").iterdir()) and any((tmp_path / "pca").iterdir())
    seg = tmp_path / "seg"
    assert main(["segeval", str(run / "last.pt"), "--num-images", "4", "-o", str(seg)]) == 0
    summary = json.loads((seg / "segeval.json").read_text())[str(run / "last.pt")]
    assert summary["num_images"] == 4 and 0 <= summary["miou_attention"] <= 1


@pytest.mark.slow  # one step, but the 72M-parameter model evaluates 360 images and writes two 290 MB checkpoints
def test_the_b16_preset_trains_one_step(tmp_path):
    """--arch crate_alpha_b16 (the released size) on 16 px digits with 8-pixel patches: one step, finite loss."""
    run = tmp_path / "b16"
    assert (
        main(
            [
                "train",
                "--arch",
                "crate_alpha_b16",
                "--image-size",
                "16",
                "--patch-size",
                "8",
                "--epochs",
                "1",
                "--batch-size",
                "2",
                "--steps-per-epoch",
                "1",
                "--workers",
                "0",
                "--threads",
                "1",
                "--output",
                str(run),
            ]
        )
        == 0
    )
    record = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert record and all(np.isfinite(r.get("loss", 0.0)) for r in record)
    model = load_checkpoint(run / "last.pt")
    assert model.config.dim == 768 and model.config.depth == 12 and model.config.num_classes == 10
    assert torch.isfinite(model(torch.randn(1, 3, 16, 16))).all()


def test_reference_style_finetune_of_an_official_file(tmp_path, no_checksums):  # noqa: F811
    """`cratevit finetune --net crate_alpha_debug --ckpt_dir OFFICIAL.pth`: the official layout, a new 10-way head."""
    from cratevit.models import ReferenceCRATEAlpha

    data = write_cifar10(tmp_path / "cifar")
    torch.manual_seed(0)
    ref = ReferenceCRATEAlpha(image_size=32, patch_size=8, num_classes=19, dim=32, depth=2, heads=2, dim_head=16)
    torch.save(ref.state_dict(), tmp_path / "official.pth")
    run = tmp_path / "ft"
    assert main(["finetune", "--net", "crate_alpha_debug", "--bs", "4", "--n_epochs", "1", "--lr", "1e-9",
                 "--ckpt_dir", str(tmp_path / "official.pth"), "--data_dir", str(data), "--output", str(run),
                 *QUICK]) == 0  # fmt: skip
    tuned = load_checkpoint(run / "last.pt").state_dict()
    assert tuned["head.weight"].shape == (10, 32)  # the 19-way head was replaced
    torch.testing.assert_close(tuned["blocks.1.ista.decoder"], ref.state_dict()["transformer.layers.1.1.fn.D1"])
