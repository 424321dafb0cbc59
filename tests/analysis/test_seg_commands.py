"""`cratevit segeval --protocol`, `cratevit maskcut`, `cratevit detect-eval` and `cratevit pca --method`."""

import json

import numpy as np
import pytest
from PIL import Image

from cratevit import create_model
from cratevit.checkpoint import save_checkpoint
from cratevit.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "crate.pt"
    return save_checkpoint(path, create_model("crate_debug", image_size=32, patch_size=8, num_classes=6))


def test_segeval_protocols(tmp_path, ckpt, capsys) -> None:
    out = tmp_path / "seg"
    assert main(["segeval", str(ckpt), "--num-images", "8", "-o", str(out)]) == 0
    s = json.loads((out / "segeval.json").read_text())[str(ckpt)]
    assert set(s["paper"]) >= {"miou", "miou_head_mean"} and s["paper"]["miou"] >= s["paper"]["miou_head_mean"]
    assert s["threshold_kind"] == "entries" and 0 <= s["dino"]["jaccard_best_head"] <= 1
    assert 0 <= s["miou_attention"] <= 1  # the cratevit protocol, where the first segeval put it
    table = (out / "segeval.md").read_text()
    assert (
        "paper mIoU (best head per class)" in table and "DINO J (best head per object)" in table and "mIoU PCA" in table
    )
    header = (out / "per_image.csv").read_text().splitlines()[0]
    assert header.endswith(
        "paper_iou_best_head,paper_iou_head_mean,dino_j_mean_map,dino_j_best_head,dino_j_best_head_foreground"
    )

    out2 = tmp_path / "seg-paper"
    args = [
        "segeval",
        str(ckpt),
        "--data",
        "multishapes",
        "--num-images",
        "6",
        "--protocol",
        "paper",
        "--threshold-kind",
        "mass",
        "--layer",
        "-2",
        "-o",
        str(out2),
    ]
    assert main(args) == 0
    s2 = json.loads((out2 / "segeval.json").read_text())[str(ckpt)]
    assert "dino" not in s2 and "miou_attention" not in s2 and s2["threshold_kind"] == "mass"
    assert s2["input_size"] == [48, 48] and s2["layer"] == -2
    assert "DINO" not in (out2 / "segeval.md").read_text()
    with pytest.raises(SystemExit):  # argparse rejects an unknown protocol
        main(["segeval", str(ckpt), "--protocol", "voc", "-o", str(out2)])


def test_maskcut_and_detect_eval_commands(tmp_path, ckpt, capsys) -> None:
    out = tmp_path / "mc"
    assert main(["maskcut", str(ckpt), "--data", "multishapes", "--num-scenes", "6", "-o", str(out)]) == 0
    info = json.loads((out / "maskcut.json").read_text())
    assert info["images"] == 6 and info["input_size"] == 48 and info["crf"] is False
    assert set(info["ap"]) == {"bbox", "segm"}
    results = json.loads((out / "results.json").read_text())
    assert len(results) == info["masks"] and all(r["category_id"] == 1 for r in results)
    assert len(list((out / "overlays").glob("*.png"))) == 6
    capsys.readouterr()

    gt = out / "multishapes" / "annotations.json"
    assert (
        main(["detect-eval", "--gt", str(gt), "--results", str(out / "results.json"), "-o", str(out / "ap.json")]) == 0
    )
    ap = json.loads((out / "ap.json").read_text())
    assert ap["segm"]["AP"] == pytest.approx(info["ap"]["segm"]["AP"])
    perfect = [dict(a, score=1.0) for a in json.loads(gt.read_text())["annotations"]]
    (tmp_path / "gt-as-results.json").write_text(json.dumps(perfect))
    assert main(["detect-eval", "--gt", str(gt), "--results", str(tmp_path / "gt-as-results.json")]) == 0
    assert "| segm | 100.0 | 100.0 | 100.0 |" in capsys.readouterr().out

    # plain images: ids in order, no AP
    img = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(img)
    out2 = tmp_path / "mc-img"
    assert main(["maskcut", str(ckpt), str(img), "--size", "64", "-o", str(out2)]) == 0
    info2 = json.loads((out2 / "maskcut.json").read_text())
    assert "ap" not in info2 and info2["per_image"][0]["image_id"] == 1
    shown = Image.open(next((out2 / "overlays").glob("*.png")))  # 56x40 enlarged 7x (nearest), a legend below
    assert shown.width == 56 * 7 and 40 * 7 < shown.height <= 40 * 7 + 44
    capsys.readouterr()
    assert main(["maskcut", str(ckpt), str(img), "--size", "60", "-o", str(out2)]) == 2
    assert "multiple of the patch size" in capsys.readouterr().err
    assert main(["detect-eval", "--gt", str(img), "--results", str(out / "results.json")]) == 2


def test_pca_paper_and_whole(tmp_path, ckpt) -> None:
    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        a = np.full((48, 48, 3), 60, np.uint8) + rng.integers(0, 20, (48, 48, 3), dtype=np.uint8)
        a[10 + 3 * i : 34, 12:36] = (220, 40, 30)
        files.append(tmp_path / f"im{i}.png")
        Image.fromarray(a).save(files[-1])
    for method in ("paper", "whole"):
        out = tmp_path / method
        assert main(["pca", str(ckpt), *map(str, files), "--method", method, "-o", str(out)]) == 0
        info = json.loads((out / "pca.json").read_text())
        assert info["method"] == method and info["facet"] == ("key" if method == "paper" else "token")
        assert Image.open(out / "im0" / "pca.png").size == (48, 48)


def test_missing_pycocotools_is_one_line(tmp_path, ckpt, capsys, monkeypatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "pycocotools", None)  # as if not installed
    assert main(["detect-eval", "--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'cratevit[coco]'" in err and "Traceback" not in err
