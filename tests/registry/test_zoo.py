"""The model zoo table and ``cratevit zoo``."""

import json
from pathlib import Path

import pytest
import torch

from cratevit import CRATE, CRATEConfig, create_model
from cratevit.checkpoint import FAMILIES
from cratevit.cli import main
from cratevit.presets import get_config
from cratevit.zoo import ZOO, count_params, describe_config, get_entry, zoo_rows
from reference_crate import ReferenceCRATE

# Addresses confirmed in the authors' own pages (the CRATE README); nothing else may appear in the table.
PUBLISHED = (
    "https://github.com/Ma-Lab-Berkeley/CRATE",
    "https://drive.google.com/file/d/1hYgDJl4EKHYfKprwhEjmWmWHuxnK6_h8/view?usp=share_link",
    "https://colab.research.google.com/drive/1rYn_NlepyW7Fu5LDliyBDmFZylHco7ss?usp=sharing",
)


def test_zoo_lists_every_released_family_with_its_configuration():
    names = [e.name for e in ZOO]
    assert names == [
        "crate_tiny",
        "crate_small",
        "crate_base",
        "crate_large",
        "crate_base_demo",
        "crate_small_21k",
        "crate_base_21k",
        "crate_base_768",
        "crate_alpha_b16",
        "crate_alpha_l14",
        "crate_alpha_b32_in21k",
        "crate_alpha_b16_in21k",
        "crate_alpha_b8_in21k",
        "crate_alpha_l32_in21k",
        "crate_alpha_l14_in21k",
        "crate_alpha_l8_in21k",
    ]
    demo = get_entry("CRATE_base_demo").config
    assert (demo.dim, demo.depth, demo.heads, demo.dim_head, demo.head_hidden_dim) == (768, 12, 6, 128, 768)
    assert demo.patch_size == (8, 8) and demo.image_size == (224, 224) and demo.num_classes == 21842
    small21k, base21k, base768 = (get_config(n) for n in ("crate_small_21k", "crate_base_21k", "crate_base_768"))
    assert (small21k.dim, small21k.heads, small21k.dim_head, small21k.num_classes) == (384, 6, 64, 21842)
    assert (base21k.dim, base21k.heads, base21k.dim_head, base21k.num_classes) == (768, 12, 64, 21842)
    assert base768.replace(num_classes=21842) == base21k.replace(name=None) and base768.num_classes == 768
    for entry in ZOO:
        assert entry.family in FAMILIES
        if entry.name.startswith("crate_alpha"):  # the authors' Hub repository (see test_crate_alpha_hub.py)
            assert entry.weights.startswith("hf-hub:UCSC-VLAA/CRATE-alpha/torch/"), entry.weights
            continue
        urls = [w for w in entry.weights.replace(";", " ").split() if w.startswith("http")]
        assert urls and all(u in PUBLISHED for u in urls), entry.weights


def test_patch8_variants_match_the_patch16_sizes():
    for size in ("tiny", "small", "base", "large"):
        p16, p8 = get_config(f"crate_{size}"), get_config(f"CRATE_{size}_patch8")
        assert p8.patch_size == (8, 8) and p8.num_patches == 784
        assert p8.replace(patch_size=16, name=None) == p16.replace(name=None)


def test_parameter_counts_are_exact():
    # by hand for CRATE_base_demo: embedding 753,792 + 12 layers x 1,773,312 + fc_norm 1,536
    # + pre_logits 590,592 + head 16,796,498
    assert get_entry("crate_base_demo").params == 39_422_162
    assert get_entry("crate_tiny").params == 6_090_856
    for cfg in (
        get_config("crate_debug"),
        CRATEConfig(
            image_size=32, patch_size=8, dim=32, depth=2, heads=2, dim_head=16, num_classes=5, head_hidden_dim=24
        ),
    ):
        assert count_params(cfg) == CRATE(config=cfg).num_params()
    ref = ReferenceCRATE(image_size=224, patch_size=8, num_classes=21842, dim=384, depth=12, heads=6, dim_head=64)
    assert get_entry("crate_small_21k").params == sum(p.numel() for p in ref.parameters())


def test_describe_config():
    assert (
        describe_config(get_config("crate_base_demo"))
        == "768d x12, 6x128 heads, p8/224, 21842 classes, 2-stage head (768)"
    )
    assert describe_config(get_config("crate_small")) == "576d x12, 12x48 heads, p16/224, 1000 classes"


def test_cratevit_zoo_prints_the_table(capsys):
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["name", "model", "configuration"]
    for row in zoo_rows():
        assert any(line.startswith(row["name"] + " ") and f"{row['params']:,}" in line for line in lines)
        assert f"  {row['name']}" in out and row["weights"] in out
    assert "39,422,162" in out and "ImageNet-21k (21,842 classes)" in out


def test_cratevit_zoo_one_entry_and_json(capsys):
    assert main(["zoo", "CRATE_base_demo", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["name"] == "crate_base_demo" and row["params"] == 39_422_162 and row["family"] == "emergence-demo"
    assert main(["zoo", "crate_small"]) == 0
    out = capsys.readouterr().out
    assert "cratevit.create_model('crate_small', checkpoint=FILE)" in out and "13,116,328" in out
    assert main(["zoo", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == [e.name for e in ZOO]


def test_cratevit_zoo_unknown_name_is_one_line_error(capsys):
    assert main(["zoo", "crate_huge"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint named 'crate_huge' in the zoo" in err[0]


@pytest.mark.parametrize("module_prefix", [False, True])
def test_cratevit_info_reads_a_reference_file_without_arch(tmp_path, capsys, module_prefix):
    ref = ReferenceCRATE(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, dim_head=16)
    state = {("module." if module_prefix else "") + k: v for k, v in ref.state_dict().items()}
    path = tmp_path / "demo.pth"
    torch.save({"model": state}, path)
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "crate_debug" and info["params"] == create_model("crate_debug").num_params()


def test_docs_model_zoo_tables_match_the_zoo():
    docs = Path(__file__).resolve().parents[2] / "docs"
    section = (docs / "zoo.md").read_text() + (docs / "crate-alpha.md").read_text()
    for row in zoo_rows():
        line = next(line for line in section.splitlines() if line.startswith(f"| `{row['name']}` |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:4] == [row["title"], row["config"], f"{row['params']:,}"], line
