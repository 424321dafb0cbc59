"""Attention maps, masks, PCA maps and the `cratevit attention` / `cratevit pca` commands on real photographs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from cratevit import create_model, save_checkpoint
from cratevit.analysis.images import load_image, prepare
from cratevit.analysis.visualize import (
    cls_attention,
    first_component_foreground,
    head_grid_figure,
    layerwise_figure,
    mass_mask,
    math_label,
    pca_figure,
    pca_maps,
    save_figure,
    upsample,
)
from cratevit.cli import main


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, object]:
    """scikit-image photographs in the modes users have: RGB PNG, JPEG, grayscale, palette, RGBA (non-square)."""
    d = tmp_path_factory.mktemp("photos")
    files = {
        "astronaut": d / "astronaut.png",  # 512x512 RGB
        "chelsea": d / "chelsea.jpg",  # 451x300 JPEG
        "camera": d / "camera.png",  # 512x512 grayscale
        "coffee": d / "coffee.png",  # 600x400 palette PNG
        "rocket": d / "rocket.png",  # RGBA, 300x180
    }
    Image.fromarray(data.astronaut()).save(files["astronaut"])
    Image.fromarray(data.chelsea()).save(files["chelsea"], quality=90)
    Image.fromarray(data.camera()).save(files["camera"])
    Image.fromarray(data.coffee()).convert("P", palette=Image.Palette.ADAPTIVE).save(files["coffee"])
    rgba = Image.fromarray(data.rocket()).convert("RGBA").resize((300, 180))
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (180, 1))))
    rgba.save(files["rocket"])
    (d / "notes.png").write_text("not an image")
    return {**files, "not_image": d / "notes.png"}


def test_load_image_modes(photos) -> None:
    sizes = {
        "astronaut": (512, 512),
        "chelsea": (451, 300),
        "camera": (512, 512),
        "coffee": (600, 400),
        "rocket": (300, 180),
    }
    for name, size in sizes.items():
        img = load_image(photos[name])
        assert img.mode == "RGB" and img.size == size
    # transparent pixels are composited on white
    assert np.asarray(load_image(photos["rocket"]))[:, 0].min() == 255
    with pytest.raises(ValueError, match=r"notes\.png is not a readable image file"):
        load_image(photos["not_image"])
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        load_image(photos["not_image"].parent / "missing.png")


def test_prepare_sizes(photos) -> None:
    img = load_image(photos["chelsea"])  # 451 x 300
    p = prepare(img, (224, 224), (16, 16), "keep-aspect")
    assert p.input_size == (224, 336) and p.tensor.shape == (3, 224, 336) and "interpolated" in p.how
    p = prepare(img, (224, 224), (16, 16), "model")
    assert p.input_size == (224, 224) and p.original_size == (300, 451)
    assert abs(float(p.tensor.mean())) < 2.5


def test_mass_mask_keeps_the_top_mass() -> None:
    maps = torch.tensor([[[0.5, 0.3], [0.15, 0.05]]])
    assert mass_mask(maps, 0.6).tolist() == [[[True, True], [False, False]]]  # 0.5 < 0.6 <= 0.8
    assert mass_mask(maps, 0.5).tolist() == [[[True, False], [False, False]]]
    assert mass_mask(maps, 1.0).all()
    with pytest.raises(ValueError, match="threshold"):
        mass_mask(maps, 0.0)
    random = torch.rand(3, 7, 9).softmax(-1)
    masks = mass_mask(random, 0.6)
    kept = (random * masks).flatten(1).sum(1) / random.flatten(1).sum(1)
    assert (kept >= 0.6).all()
    # dropping the smallest kept entry falls below the threshold: the mask is minimal
    smallest = torch.where(masks, random, torch.inf).flatten(1).min(1).values
    assert ((kept - smallest / random.flatten(1).sum(1)) < 0.6).all()


def test_cls_attention_and_upsample() -> None:
    attn = torch.rand(2, 3, 1 + 4 * 6, 1 + 4 * 6)
    maps = cls_attention(attn, (4, 6))
    assert maps.shape == (2, 3, 4, 6) and maps[1, 2, 3, 5] == attn[1, 2, 0, -1]
    up = upsample(maps, (40, 60))
    assert up.shape == (2, 3, 40, 60) and up[0, 0, 9, 9] == maps[0, 0, 0, 0] and up[0, 0, 39, 59] == maps[0, 0, 3, 5]
    with pytest.raises(ValueError, match="does not match"):
        cls_attention(attn, (5, 5))


def test_pca_maps_and_foreground() -> None:
    g = torch.Generator().manual_seed(0)
    feats = []
    for _ in range(2):
        f = torch.randn(8, 10, 16, generator=g) * 0.1
        f[2:6, 3:7] += torch.ones(16)  # an "object" in the middle
        feats.append(f)
    maps = pca_maps(feats, 3)
    assert maps.rgb[0].shape == (8, 10, 3) and maps.rgb[0].min() >= 0 and maps.rgb[1].max() <= 1
    assert maps.explained_variance_ratio[0] > 0.5
    fg = first_component_foreground(maps.scores[0][..., 0])
    expected = np.zeros((8, 10), bool)
    expected[2:6, 3:7] = True
    assert (fg == expected).all()
    assert (first_component_foreground(-maps.scores[0][..., 0]) == expected).all()  # sign does not matter


@pytest.mark.slow
def test_attention_command_on_photos(tmp_path, photos, capsys) -> None:
    torch.manual_seed(0)
    ckpt = save_checkpoint(
        tmp_path / "tiny.pt", create_model("crate_debug", image_size=64, patch_size=16, heads=3, dim_head=16, dim=48)
    )
    out = tmp_path / "att"
    names = ["astronaut", "chelsea", "camera", "coffee", "rocket"]
    assert main(["attention", str(ckpt), *[str(photos[n]) for n in names], "-o", str(out), "--size", "96"]) == 0
    info = json.loads((out / "attention.json").read_text())
    assert [r["heads"] for r in info["images"]] == [3] * 5
    assert info["images"][1]["input_size"] == [96, 144] and "interpolated" in info["images"][1]["preprocessing"]
    for name in names:
        folder = out / name
        size = load_image(photos[name]).size
        heads = []
        for k in range(3):
            heat = Image.open(folder / f"attn-head{k}.png")
            assert heat.size == size and heat.mode == "L"
            a = np.asarray(heat)
            assert a.min() == 0 and a.max() == 255
            heads.append(a)
            mask = np.asarray(Image.open(folder / f"mask-head{k}.png"))
            assert set(np.unique(mask)) <= {0, 255} and 0 < (mask > 0).mean() < 1
            ov = Image.open(folder / f"overlay-head{k}.png")
            assert ov.size == size and ov.mode == "RGB"
        assert not np.array_equal(heads[0], heads[1]) and not np.array_equal(heads[1], heads[2])
        assert Image.open(folder / "heads.png").mode in ("RGBA", "RGB")
        assert (folder / "heads.pdf").read_bytes().startswith(b"%PDF")
        assert np.load(folder / "attention.npy").shape[0] == 3
    # --checkpoint FILE IMAGE... and the model's own size (224-px-like: resize to the model)
    out2 = tmp_path / "att2"
    assert main(["attention", "--checkpoint", str(ckpt), str(photos["chelsea"]), "-o", str(out2), "--resize", "model",
                 "--layer", "0", "--threshold", "0.3"]) == 0  # fmt: skip
    info = json.loads((out2 / "attention.json").read_text())
    assert info["images"][0]["input_size"] == [64, 64] and info["threshold"] == 0.3
    capsys.readouterr()
    assert main(["attention", str(ckpt), str(photos["not_image"]), "-o", str(out2)]) == 2
    assert "notes.png is not a readable image file" in capsys.readouterr().err
    assert main(["attention", str(ckpt), str(photos["camera"]), "-o", str(out2), "--layer", "5"]) == 2
    assert "--layer 5 is out of range" in capsys.readouterr().err
    assert main(["attention", str(photos["camera"]), "-o", str(out2)]) == 2
    assert "at least one image" in capsys.readouterr().err


def test_attention_at_224_with_a_preset(tmp_path, photos) -> None:
    """A preset name instead of a file: random weights, at the 224-px size of the paper's models."""
    out = tmp_path / "att"
    assert main(["attention", "crate_debug", str(photos["astronaut"]), "-o", str(out), "--size", "224"]) == 0
    info = json.loads((out / "attention.json").read_text())
    assert info["images"][0]["input_size"] == [224, 224] and info["images"][0]["grid"] == [28, 28]
    assert Image.open(out / "astronaut" / "attn-head1.png").size == (512, 512)


def test_pca_command_on_photos(tmp_path, photos) -> None:
    out = tmp_path / "pca"
    names = ["astronaut", "chelsea", "coffee"]
    assert main(["pca", "crate_debug", *[str(photos[n]) for n in names], "-o", str(out), "--size", "64"]) == 0
    info = json.loads((out / "pca.json").read_text())
    ratios = info["explained_variance_ratio"]
    assert len(ratios) == 3 and ratios[0] >= ratios[1] >= ratios[2] > 0
    maps = []
    for name in names:
        img = Image.open(out / name / "pca.png")
        assert img.mode == "RGB" and img.size == load_image(photos[name]).size
        a = np.asarray(img)
        assert a.std() > 5  # not a constant image
        maps.append(a)
        fg = np.asarray(Image.open(out / name / "foreground.png"))
        assert set(np.unique(fg)) <= {0, 255}
    assert (out / "pca-grid.png").stat().st_size > 1000 and (out / "pca-grid.pdf").exists()
    assert info["images"][1]["input_size"] == [64, 96]


def test_attention_and_pca_of_a_timm_vit_checkpoint(tmp_path, photos, capsys) -> None:
    """The ViT baseline written by `cratevit train --arch test_vit` is shown the same way (at its own size)."""
    import timm

    vit = timm.create_model("test_vit", img_size=32, patch_size=8, num_classes=6)
    ckpt = tmp_path / "vit.pt"
    torch.save(
        {
            "format": "timm",
            "arch": "test_vit",
            "model": vit.state_dict(),
            "train_config": {"data": "shapes", "image_size": 32, "patch_size": 8},
        },
        ckpt,
    )
    out = tmp_path / "vit-att"
    assert main(["attention", str(ckpt), str(photos["chelsea"]), "-o", str(out)]) == 0
    info = json.loads((out / "attention.json").read_text())
    assert info["images"][0]["input_size"] == [32, 32] and info["images"][0]["heads"] == 2
    assert info["mean"] == [0.5, 0.5, 0.5]
    assert Image.open(out / "chelsea" / "attn-head1.png").size == (451, 300)
    assert "timm model" in capsys.readouterr().out
    assert main(["pca", str(ckpt), str(photos["chelsea"]), str(photos["camera"]), "-o", str(tmp_path / "p")]) == 0
    assert Image.open(tmp_path / "p" / "camera" / "pca.png").size == (512, 512)


# ----------------------------------------------------------------------------------- paper-ready figures
ANALYZE_LABELS = [  # the labels `cratevit analyze` and the example notebook give layerwise_figure
    "compression R^c of Z^l (MSSA input)",
    "compression R^c of Z^{l+1/2} (after MSSA)",
    "fraction of non-zeros of Z^{l+1}",
    "fraction of non-zeros of A_2",
]


def _outside_math(text: str) -> str:
    """The text of a label as it reads outside its $...$ mathtext segments."""
    return re.sub(r"\$[^$]*\$", "", text)


def _series(depth: int = 6) -> dict[str, list[dict[str, float]]]:
    return {
        "trained": [{"layer": i, "v_mean": 0.5 * i, "v_std": 0.1} for i in range(depth)],
        "random init": [{"layer": i, "v_mean": 3.0 - 0.1 * i, "v_std": 0.2} for i in range(depth)],
    }


def test_math_label_turns_plain_formulas_into_mathtext() -> None:
    assert (
        math_label("compression R^c of Z^{l+1/2} (after MSSA)") == r"compression $R^{c}$ of $Z^{\ell+1/2}$ (after MSSA)"
    )
    assert math_label("U_k^T LN(Z^l)") == r"$U_{k}^{T}$ LN($Z^{\ell}$)"
    assert math_label("fraction of non-zeros of A_2") == "fraction of non-zeros of $A_{2}$"
    assert math_label("code_sparsity and random init") == "code_sparsity and random init"  # words stay words
    assert math_label("$x^2$ already math") == "$x^2$ already math"


@pytest.mark.parametrize("ylabel", ANALYZE_LABELS)
def test_layerwise_figure_is_paper_ready(ylabel) -> None:
    fig = layerwise_figure(_series(), "v", ylabel, "coding rate per layer")
    fig.canvas.draw()  # renders the mathtext: an invalid expression raises here
    ax = fig.axes[0]
    for text in (ax.get_ylabel(), ax.get_xlabel(), ax.get_title()):
        plain = _outside_math(text)
        assert "\\" not in plain and "^" not in plain and "_{" not in plain and "{" not in plain
    assert "$" in ax.get_ylabel()  # the formula is typeset, not raw TeX
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3", "4", "5"]  # integer layer ticks
    assert ax.get_xlabel() == "layer (block index, 0-based)"
    # the legend hides no point: its box is outside the axes and contains no data point
    legend = ax.get_legend().get_window_extent()
    assert not legend.overlaps(ax.get_window_extent())
    for line in ax.get_lines():
        for x, y in ax.transData.transform(line.get_xydata()):
            assert not legend.contains(x, y)
    assert "random weights" not in ax.get_title()
    assert "random weights" in layerwise_figure(_series(), "v", ylabel, random_weights=True).axes[0].get_title()


def test_layerwise_figure_of_a_deep_model_keeps_integer_ticks() -> None:
    fig = layerwise_figure(_series(36), "v", "R^c")
    fig.canvas.draw()
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks and all(re.fullmatch(r"\d+", t) for t in ticks)


def test_head_grid_has_one_shared_colour_bar_and_a_mask_legend(tmp_path) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    heat = np.random.default_rng(1).random((3, 48, 64)) * np.array([1.0, 0.5, 0.2])[:, None, None]
    masks = heat > 0.3
    fig = head_grid_figure(image, heat, masks, "photo: layer 5 (0-based)", random_weights=True, keep=0.6)
    fig.canvas.draw()
    head_images = [ax.images[0] for ax in fig.axes if ax.get_title().startswith("head ")]
    assert len(head_images) == 3
    assert {im.get_clim() for im in head_images} == {(0.0, float(heat.max()))}  # one scale for all heads
    bars = {im.colorbar for im in head_images if im.colorbar is not None}
    assert len(bars) == 1 and "one scale, all heads" in next(iter(bars)).ax.get_ylabel()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends and "top 60% of mass" in legends[0].get_texts()[0].get_text()
    assert all(ax.images[0].get_interpolation() == "nearest" for ax in fig.axes if ax.images)  # small: crisp blocks
    photo = Image.new("RGB", (512, 384))
    shrunk = head_grid_figure(photo, np.zeros((1, 384, 512)))
    assert shrunk.axes[0].images[0].get_interpolation() == "antialiased"  # a photo shrunk to a panel: filtered
    assert fig._suptitle.get_text().endswith("(random weights)")
    assert "random weights" not in head_grid_figure(image, heat, masks, "photo")._suptitle.get_text()
    (png,) = save_figure(fig, tmp_path / "heads", formats=("png",))
    assert min(Image.open(png).size) >= 400  # pixels enough to read the panels


def test_pca_figure_has_a_legend_on_every_mask_panel() -> None:
    image = Image.new("RGB", (32, 32))
    fg = np.zeros((32, 32), bool)
    fg[8:24, 8:24] = True
    rows = [("a", image, np.zeros((32, 32, 3)), fg), ("b", image, np.ones((32, 32, 3)), ~fg)]
    fig = pca_figure(rows, "PCA of layer 5 (0-based) key features", random_weights=True)
    fig.canvas.draw()
    mask_axes = [ax for ax in fig.axes if ax.get_title().startswith("foreground")]
    assert len(mask_axes) == 2
    for ax in mask_axes:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["foreground", "background"]
    assert "random weights" in fig._suptitle.get_text()


def test_maskcut_overlay_of_a_scene_is_enlarged_with_a_legend() -> None:
    from cratevit.analysis.maskcut import overlay_masks
    from cratevit.data.multishapes import render_scene

    scene = render_scene(0, "val", 2, 48)
    image = Image.fromarray(np.asarray(scene.image))
    out = overlay_masks(image, scene.masks[:2])
    assert out.width == 48 * 6 and out.height > 48 * 6  # enlarged 6x to 288 px, a legend strip below
    picture = np.asarray(out)[: 48 * 6]
    blocks = picture.reshape(48, 6, 48, 6, 3)
    interior = blocks[:, 1:5, :, 1:5]  # inside each 6x6 block (box outlines aside): nearest keeps it constant
    assert (interior.max((1, 3)) - interior.min((1, 3)) == 0).mean() > 0.8
    strip = np.asarray(out)[48 * 6 :]
    from matplotlib import colormaps

    for colour in colormaps["tab10"].colors[:2]:  # a swatch per mask in the legend
        assert (np.abs(strip.astype(int) - np.round(255 * np.asarray(colour))).sum(-1) == 0).any()
    big = Image.new("RGB", (640, 480))
    assert overlay_masks(big, []).width == 640  # a photo keeps its size


def test_figures_of_presets_say_random_weights(tmp_path) -> None:
    from cratevit.cli.attention import has_random_weights

    ckpt = save_checkpoint(tmp_path / "tiny.pt", create_model("crate_debug"))
    assert has_random_weights("crate_debug") and has_random_weights("vit_small_patch16_224")
    assert not has_random_weights(str(ckpt)) and not has_random_weights("hf-hub:owner/repo/model.pt")
