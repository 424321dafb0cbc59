"""IoU, foreground masks from attention / PCA, the VOC folder reader and the `cratevit segeval` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from cratevit import create_model, save_checkpoint
from cratevit.analysis.segmentation import (
    VOCSegmentationFolder,
    attention_maps,
    evaluate,
    iou,
    load_vision_model,
    maps_and_features,
    patch_features,
    shapes_samples,
)
from cratevit.cli import main


def test_iou() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b[1:3] = True  # 8 pixels, 4 shared
    assert iou(a, b) == pytest.approx(4 / 12)
    assert iou(a, a) == 1.0 and iou(a, ~a) == 0.0
    assert iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    ignore = np.zeros((4, 4), bool)
    ignore[2] = True  # ignoring row 2 leaves 4 shared of 8
    assert iou(a, b, ignore) == pytest.approx(4 / 8)
    with pytest.raises(ValueError, match="shapes differ"):
        iou(a, np.zeros((3, 3)))


def test_crate_and_timm_maps_have_the_same_layout() -> None:
    crate = create_model("crate_debug", image_size=32, patch_size=8).eval()
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=6
    ).eval()
    x = torch.randn(3, 3, 32, 32)
    for model in (crate, vit):
        maps = attention_maps(model, x, -1)
        assert maps.shape == (3, 2, 4, 4)
        torch.testing.assert_close(maps.sum((-2, -1)) <= 1.0 + 1e-5, torch.ones(3, 2, dtype=torch.bool))
        assert patch_features(model, x, 0).shape == (3, 4, 4, 32)
    maps, feats = maps_and_features(crate, x, -1)
    torch.testing.assert_close(maps, attention_maps(crate, x, -1))
    torch.testing.assert_close(feats, patch_features(crate, x, -1))
    # timm's fused attention is restored after reading the maps
    assert vit.blocks[-1].attn.fused_attn == timm.layers.use_fused_attn()


def test_evaluate_summary_and_per_image() -> None:
    samples = list(shapes_samples("val", 6, 32, seed=0))
    model = create_model("crate_debug", image_size=32, patch_size=8)
    result = evaluate(model, samples, (32, 32), (8, 8), batch_size=4)
    summary = result.summary()
    assert summary["num_images"] == 6 and len(summary["miou_per_head"]) == 2
    assert 0 <= summary["miou_attention"] <= 1 and 0 <= summary["miou_pca"] <= 1
    assert summary["miou_best_head"] == max(summary["miou_per_head"])
    assert [r["image"] for r in result.per_image()] == [s.name for s in samples]


def _fake_voc(root, n: int = 3) -> None:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    ids = [f"2007_{i:06d}" for i in range(n)]
    for i, name in enumerate(ids):
        Image.fromarray(np.full((40 + i, 50, 3), 90 * i, np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        labels = np.zeros((40 + i, 50), np.uint8)
        labels[10:20, 10:30] = 15  # a person
        labels[9, 10:30] = 255  # boundary: ignored
        seg = Image.fromarray(labels, mode="P")
        seg.putpalette([0, 0, 0] * 256)
        seg.save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")


def test_voc_folder(tmp_path) -> None:
    _fake_voc(tmp_path / "VOCdevkit" / "VOC2012")
    voc = VOCSegmentationFolder(tmp_path, limit=2)  # found below the given folder
    samples = list(voc)
    assert len(voc) == 2 and [s.name for s in samples] == ["2007_000000", "2007_000001"]
    assert samples[1].foreground.shape == (41, 50) and samples[1].foreground.sum() == 200
    assert samples[0].ignore.sum() == 20
    with pytest.raises(FileNotFoundError, match="not a PASCAL VOC 2012 folder"):
        VOCSegmentationFolder(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=r"train\.txt"):
        VOCSegmentationFolder(tmp_path, split="train")


def test_segeval_command_shapes_voc_and_vit(tmp_path, capsys) -> None:
    torch.manual_seed(1)
    ckpt = save_checkpoint(
        tmp_path / "crate.pt", create_model("crate_debug", image_size=32, patch_size=8, num_classes=6)
    )
    vit = timm.create_model("test_vit", img_size=32, patch_size=8, num_classes=6)  # 64 wide, 6 deep, 2 heads
    vit_ckpt = tmp_path / "vit.pt"
    torch.save(
        {
            "format": "timm",
            "arch": "test_vit",
            "model": vit.state_dict(),
            "train_config": {"data": "shapes", "image_size": 32, "patch_size": 8},
        },
        vit_ckpt,
    )
    assert isinstance(load_vision_model(str(vit_ckpt)), timm.models.VisionTransformer)
    out = tmp_path / "seg"
    assert main(["segeval", str(ckpt), str(vit_ckpt), "--with-random", "--num-images", "10", "-o", str(out)]) == 0
    summary = json.loads((out / "segeval.json").read_text())
    assert list(summary) == [str(ckpt), str(vit_ckpt), f"{ckpt} (random init)"]
    for s in summary.values():
        assert s["num_images"] == 10 and 0 <= s["miou_attention"] <= 1 and len(s["miou_per_head"]) == 2
    assert summary[str(ckpt)]["miou_attention"] != summary[f"{ckpt} (random init)"]["miou_attention"]
    rows = (out / "per_image.csv").read_text().splitlines()
    assert len(rows) == 1 + 30 and rows[0].startswith("model,image,iou_attention,iou_pca")
    assert "| mIoU PCA |" in (out / "segeval.md").read_text()
    _fake_voc(tmp_path / "voc")
    out2 = tmp_path / "seg-voc"
    assert main(["segeval", str(ckpt), "--data", str(tmp_path / "voc"), "--image-size", "48", "-o", str(out2)]) == 0
    assert json.loads((out2 / "segeval.json").read_text())[str(ckpt)]["num_images"] == 3
    capsys.readouterr()
    assert main(["segeval", str(ckpt), "--data", str(tmp_path / "nothing"), "-o", str(out2)]) == 2
    assert "not a PASCAL VOC 2012 folder" in capsys.readouterr().err
