"""``cratevit ablation``: the emergence paper's Table 2 ablation on the built-in data, run end to end on a tiny
budget (crate_debug, one epoch of one step, a few images and scenes): the table's rows and columns, figures in
range, the paper's rows as printed, and bad input refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cratevit.analysis.ablation import (
    PAPER_ROWS,
    TABLE_COLUMNS,
    AblationConfig,
    paper_table,
    run_ablation,
)
from cratevit.cli import main
from cratevit.errors import UserError


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ablation")
    argv = ["ablation", "-o", str(out), "--base", "crate_debug", "--variants", "crate", "crate_vit"]
    argv += ["--epochs", "1", "--steps-per-epoch", "1", "--num-images", "6", "--num-scenes", "3", "--threads", "1"]
    assert main(argv) == 0
    return out


def test_tiny_ablation_writes_the_table_and_json(tiny_run: Path) -> None:
    data = json.loads((tiny_run / "ablation.json").read_text())
    rows = data["rows"]
    assert [(r["model"], r["attention"], r["second_half"], r["weights"]) for r in rows] == [
        ("CRATE", "MSSA", "ISTA", "trained"),
        ("CRATE", "MSSA", "ISTA", "random weights"),
        ("ViT", "MHSA", "MLP", "trained"),
        ("ViT", "MHSA", "MLP", "random weights"),
    ]
    for r in rows:
        assert 0.0 <= r["shapes_miou"] <= 100.0 and 0.0 <= r["multishapes_miou"] <= 100.0
        for kind in ("box", "mask"):
            assert set(r[kind]) == {"AP50", "AP75", "AP"}
            assert all(0.0 <= v <= 100.0 for v in r[kind].values())
            assert r[kind]["AP50"] >= r[kind]["AP75"]
        assert 1 <= r["maskcut_masks"] <= 3 * 3  # at most --rounds (3) masks per scene
        if r["weights"] == "trained":
            assert 0.0 <= r["val_top1"] <= 100.0 and (tiny_run / r["variant"] / "best.pt").is_file()
        else:
            assert r["val_top1"] is None
    assert data["config"]["variants"] == ["crate", "crate_vit"] and data["config"]["epochs"] == 1
    assert [row["model"] for row in data["paper"]["rows"]] == ["CRATE", "CRATE-MLP", "CRATE-MHSA", "ViT"]

    text = (tiny_run / "ablation.md").read_text()
    assert "layer 1 (0-based, block index)" in text and "crate_debug" in text  # crate_debug has 2 blocks
    table = text.splitlines()[2:]
    assert table[0] == "| " + " | ".join(TABLE_COLUMNS) + " |"
    body = table[2:6]
    assert all(line.count("|") == len(TABLE_COLUMNS) + 1 for line in body)
    assert body[1].startswith("| CRATE | MSSA | ISTA | random weights | - |")
    assert "| ViT | MHSA | MLP | 0.1 | 0.1 | 0.0 | 14.1 |" in table  # the paper's rows follow the measured ones
    assert (tiny_run / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paper_rows_as_printed_in_table_2() -> None:
    assert PAPER_ROWS[0] == ("CRATE", "MSSA", "ISTA", 2.1, 0.7, 0.8, 23.9)
    assert [r[-1] for r in PAPER_ROWS] == [23.9, 22.0, 18.4, 14.1]  # VOC Seg. mIoU falls row by row
    lines = paper_table().splitlines()
    assert lines[2] == "| CRATE | MSSA | ISTA | 2.1 | 0.7 | 0.8 | 23.9 |"
    assert lines[3] == "| CRATE-MLP | MSSA | MLP | 0.2 | 0.2 | 0.2 | 22.0 |"
    assert "arXiv 2308.16271" in lines[-1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variants": ("crate", "crate_resnet")}, "unknown variant"),
        ({"variants": ("crate", "crate")}, "named twice"),
        ({"epochs": 0}, "--epochs must be a positive integer"),
        ({"threshold": 1.5}, "--threshold"),
        ({"base": "crate_nope"}, "crate_nope"),
        ({"base": "crate_debug", "layer": 2}, "--layer 2 is out of range"),
    ],
)
def test_bad_configuration_is_one_clear_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    def never_trains(*_: object) -> None:
        raise AssertionError("training must not start on a bad configuration")

    with pytest.raises(UserError, match=message):
        run_ablation(AblationConfig(out=tmp_path, **kwargs), never_trains)
    assert not (tmp_path / "multishapes").exists()


def test_cli_refuses_an_unknown_variant_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["ablation", "-o", str(tmp_path), "--variants", "crate", "crate_resnet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown variant(s) ['crate_resnet']" in err[0] and "crate_mhsa_only" in err[0]
    assert not (tmp_path / "crate").exists()  # refused before any training
