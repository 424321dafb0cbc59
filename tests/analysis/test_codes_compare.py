"""``cratevit codes compare`` on a tiny budget: the report folder, its six rows, and the pieces it is made of."""

from __future__ import annotations

import json

import pytest

from cratevit.analysis.codes_compare import COLUMNS, matched_layer, render_table
from cratevit.cli import main
from cratevit.errors import UserError


def test_matched_layer_keeps_the_relative_depth():
    assert matched_layer(3, 6, 6) == 3
    assert matched_layer(3, 6, 12) == 7  # 3/5 of the way down 12 blocks: 6.6 -> 7
    assert matched_layer(5, 6, 3) == 2
    assert matched_layer(0, 1, 4) == 0


def test_render_table_formats_every_column():
    row = {"network": "CRATE", "weights": "trained", "code": "ISTA code", "layer": 3, "features": 96, "l0": 3.5}
    row |= {"fve": -0.5, "dead_fraction": 0.0, "dense_fraction": 1.0, "loss_recovered": None, "probe_top1": 40.25}
    row |= {"mono": 0.8, "mono_adjusted": float("nan")}
    table = render_table([row]).splitlines()
    assert len(table) == 3 and table[0].count("|") == len(COLUMNS) + 5
    assert (
        table[2] == "| CRATE | trained | 3 | ISTA code | 96 | 3.50 | -0.500 | 0.0% | 100.0% | - | 40.2% | 0.800 | - |"
    )


def test_codes_compare_writes_the_report(tmp_path, capsys, torch_threads):  # --threads sets torch's count
    out = tmp_path / "cmp"
    argv = ["codes", "compare", "crate_debug", "vit_tiny_patch16_224", "--layer", "0", "--images", "24"]
    assert main([*argv, "--steps", "3", "-b", "64", "--threads", "1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "random weights" in printed and "layer 0 (0-based)" in printed
    report = json.loads((out / "compare.json").read_text())
    rows = report["rows"]
    assert [(r["network"], r["code"]) for r in rows] == [
        ("CRATE", "ISTA code"), ("CRATE", "SAE topk (k 16)"), ("ViT", "SAE topk (k 16)"),
    ] * 2  # fmt: skip
    assert all(r["weights"] == "random weights" for r in rows)  # a preset and a timm name: no trained weights
    for r in rows:
        assert r["features"] == (32 if r["code"] == "ISTA code" else 256)  # crate_debug is 32 wide, expansion 8
        assert 0.0 <= r["dead_fraction"] <= 1.0 and r["l0"] > 0
        assert r["loss_recovered"] is not None  # layer 0's patch tokens reach the class token
        assert 0.0 <= r["probe_top1"] <= 100.0 and 0.0 < r["mono"] <= 1.0
    assert rows[1]["l0"] == pytest.approx(16.0)  # TopK keeps k features per token
    assert "fve_identity" in rows[0]
    md = (out / "compare.md").read_text()
    assert md.count("\n| CRATE |") == 4 and md.count("\n| ViT |") == 2
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    for run in ("crate-trained", "vit-trained", "crate-random", "vit-random"):
        assert (out / run / "eval.json").is_file() and (out / run / "sae.pt").is_file()


def test_codes_compare_refuses_a_model_without_ista(tmp_path):
    from cratevit.analysis.codes_compare import CompareConfig, compare_codes

    with pytest.raises(UserError, match="no ISTA step"):
        compare_codes("crate_mlp_digits", "vit_tiny_patch16_224", tmp_path, CompareConfig(layer=0, steps=1))
    with pytest.raises(UserError, match="neither a checkpoint file nor a timm model"):
        compare_codes("crate_debug", "no_such_vit", tmp_path, CompareConfig(layer=0, steps=1))
