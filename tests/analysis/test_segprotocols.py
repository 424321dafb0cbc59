"""The three segmentation protocols (paper, dino, cratevit), the token-grid ground truth and the facets / PCA."""

import numpy as np
import pytest
import torch
from PIL import Image

from cratevit.analysis.facets import facet_features, paper_pca
from cratevit.analysis.segmentation import VOCSegmentationFolder, multishapes_samples, shapes_samples
from cratevit.analysis.segprotocols import (
    dino_object_scores,
    dino_scores,
    evaluate_protocols,
    keep_top,
    labels_to_grid,
    paper_scores,
)
from cratevit.models import CRATE, CRATEConfig

# A 16x16 image of 4x4-pixel tokens (a 4x4 grid), token labels:
#   3 3 0 I        I: the ignore label 255
#   3 3 0 0
#   0 0 0 7
#   0 0 0 7
TOKENS_A = np.array([[3, 3, 0, 255], [3, 3, 0, 0], [0, 0, 0, 7], [0, 0, 0, 7]], np.uint8)
S0 = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (0, 3)]  # head 0 attends here
S1 = [(2, 3), (3, 3), (1, 3), (0, 3), (3, 0), (3, 1), (3, 2), (1, 2)]  # head 1


def _maps(*sets: list[tuple[int, int]]) -> torch.Tensor:
    maps = torch.zeros(len(sets), 4, 4)
    for k, cells in enumerate(sets):
        for r, c in cells:
            maps[k, r, c] = 1.0
    return maps


def _write_voc(root, items: dict[str, np.ndarray]) -> None:
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, tokens in items.items():
        Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        seg = Image.fromarray(np.kron(tokens, np.ones((4, 4), np.uint8)), mode="P")
        seg.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        seg.save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(items) + "\n")


def test_keep_top_entries_and_mass() -> None:
    maps = torch.tensor([[[0.5, 0.2], [0.2, 0.1]]])
    assert keep_top(maps, 0.5, "entries").sum() == 2  # round(0.5 * 4) entries
    assert keep_top(maps, 0.01, "entries").sum() == 1  # at least one
    assert keep_top(maps, 0.6, "mass").tolist() == [[[True, True], [False, False]]]  # 0.5 + 0.2 reaches 60%
    with pytest.raises(ValueError, match="threshold kind"):
        keep_top(maps, 0.6, "area")


def test_labels_to_grid_takes_the_majority_and_ignores_mostly_void_tokens() -> None:
    labels = np.kron(TOKENS_A, np.ones((4, 4), np.uint8))
    labels[4:7, 8] = 3  # a minority sliver of class 3 in token (1, 2): stays background
    labels[0, 0] = 255  # a few void pixels in a class-3 token: stays class 3
    assert (labels_to_grid(labels, (4, 4)) == TOKENS_A).all()


def test_hand_made_voc_folder_gives_the_hand_computed_ious(tmp_path) -> None:
    b = np.zeros((4, 4), np.uint8)
    b[0] = 1  # class 1 fills the top row of tokens
    _write_voc(tmp_path / "VOC2012", {"a": TOKENS_A, "b": b})
    sa, sb = list(VOCSegmentationFolder(tmp_path))
    assert sa.labels is not None and sa.ignore.sum() == 16 and sa.foreground.sum() == 6 * 16

    # paper protocol, top 50% of entries = the 8 marked tokens of each head
    classes, ious = paper_scores(_maps(S0, S1), sa.labels, keep=0.5, kind="entries")
    assert classes == [3, 7]
    # class 3: 4 tokens, head 0 marks them and 3 more valid ones ((0,3) is ignored): 4/7; class 7: head 1, 2/7
    np.testing.assert_allclose(ious, [[4 / 7, 0.0], [0.0, 2 / 7]])
    rows_01 = [(r, c) for r in (0, 1) for c in range(4)]
    _, ious_b = paper_scores(_maps(rows_01, [(r, c) for r in (2, 3) for c in range(4)]), sb.labels, 0.5)
    np.testing.assert_allclose(ious_b, [[0.5, 0.0]])
    image_scores = [ious.max(1).mean(), ious_b.max(1).mean()]
    assert np.mean(image_scores) == pytest.approx((3 / 7 + 0.5) / 2)

    # dino protocol at pixel level; keep=1.0 of the mass keeps exactly the marked tokens
    j_mean, j_heads = dino_scores(_maps(S0, S1), sa.foreground, sa.ignore, keep=1.0)
    # head 0: 4 fg tokens of 7 valid marked, 6 fg tokens -> 4/9; head 1: 2/11; the mean map marks 14 valid
    # tokens holding all 6 fg tokens -> 6/14
    np.testing.assert_allclose(j_heads, [4 / 9, 2 / 11])
    assert j_mean == pytest.approx(6 / 14)


def test_dino_best_head_per_object_equals_the_hand_computation(tmp_path, monkeypatch) -> None:
    """DINO's protocol (facebookresearch/dino#54): for each ground-truth object the best head, averaged over the
    image's objects, then over images; here on a two-object image and a one-object image of a VOC folder."""
    b = np.zeros((4, 4), np.uint8)
    b[0] = 1  # one object: the top row of tokens
    _write_voc(tmp_path / "VOC2012", {"a": TOKENS_A, "b": b})
    sa, sb = list(VOCSegmentationFolder(tmp_path))
    objects, jac = dino_object_scores(_maps(S0, S1), sa.labels, keep=1.0)  # keep all mass: the marked tokens
    assert objects == [3, 7]
    # object 3 (4 tokens): head 0 marks them and 3 more valid tokens ((0,3) is void): 4/7; head 1 none of them.
    # object 7 (2 tokens): head 1 marks both and 5 more valid tokens: 2/7; head 0 none.
    np.testing.assert_allclose(jac, [[4 / 7, 0.0], [0.0, 2 / 7]])
    image_a = (4 / 7 + 2 / 7) / 2  # = 3/7: the best head differs per object
    # merging both objects into one foreground (the earlier figure) picks head 0 for the image: 4/9
    _, j_heads = dino_scores(_maps(S0, S1), sa.foreground, sa.ignore, keep=1.0)
    assert j_heads.max() == pytest.approx(4 / 9) and image_a == pytest.approx(3 / 7)
    rows_01 = [(r, c) for r in (0, 1) for c in range(4)]
    maps_b = _maps(rows_01, [(3, 0)])
    objects_b, jac_b = dino_object_scores(maps_b, sb.labels, keep=1.0)
    assert objects_b == [1]
    np.testing.assert_allclose(jac_b, [[0.5, 0.0]])  # 4 object tokens of 8 marked; head 1 misses it
    assert dino_object_scores(_maps(S0), np.zeros((16, 16), np.uint8))[0] == []  # no object: not scored

    # end to end through evaluate_protocols, the model's maps replaced by the hand-made ones
    from cratevit.analysis import segmentation

    def hand_maps(model, x, layer=-1):
        assert len(x) == 2  # one batch: image a, then image b
        return torch.stack([_maps(S0, S1), maps_b]), torch.zeros(2, 4, 4, 8)

    monkeypatch.setattr(segmentation, "maps_and_features", hand_maps)
    model = CRATE(config=CRATEConfig(image_size=16, patch_size=4, dim=16, depth=1, heads=2, dim_head=8))
    result = evaluate_protocols(model, [sa, sb], (16, 16), (4, 4), threshold=1.0, protocols=("dino",), batch_size=2)
    s = result.summary()["dino"]
    assert result.dino_best == pytest.approx([3 / 7, 0.5])
    assert s["jaccard_best_head"] == pytest.approx((3 / 7 + 0.5) / 2) and s["images_scored"] == 2
    assert s["jaccard_best_head_foreground"] == pytest.approx((4 / 9 + 0.5) / 2)  # the earlier figure
    assert result.per_image()[0]["dino_j_best_head"] == pytest.approx(3 / 7)


def test_oracle_head_never_below_head_mean_and_all_protocols_run() -> None:
    model = CRATE(config=CRATEConfig(image_size=32, patch_size=8, dim=32, depth=2, heads=4, dim_head=8, num_classes=6))
    result = evaluate_protocols(
        model, shapes_samples("val", 12, 32), (32, 32), (8, 8), mean=(0.5,) * 3, std=(0.5,) * 3, batch_size=5
    )
    s = result.summary()
    assert s["num_images"] == 12 and s["paper"]["images_scored"] + s["paper"]["images_without_class"] == 12
    assert all(b >= m - 1e-12 for b, m in zip(result.paper_best, result.paper_head_mean, strict=True))
    assert s["paper"]["miou"] > s["paper"]["miou_head_mean"]  # 4 random heads disagree somewhere
    assert s["dino"]["jaccard_best_head"] >= max(s["dino"]["jaccard_per_head"]) - 1e-12
    # the cratevit protocol is the first segeval's: same numbers as segmentation.evaluate
    from cratevit.analysis.segmentation import evaluate

    old = evaluate(model, shapes_samples("val", 12, 32), (32, 32), (8, 8), mean=(0.5,) * 3, std=(0.5,) * 3)
    assert s["cratevit"]["miou_attention"] == pytest.approx(old.summary()["miou_attention"])
    assert s["cratevit"]["miou_pca"] == pytest.approx(old.summary()["miou_pca"])
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_protocols(model, shapes_samples("val", 2, 32), (32, 32), (8, 8), protocols=("voc",))


def test_multishapes_samples_have_several_classes() -> None:
    samples = list(multishapes_samples("val", 6, 48))
    assert all(s.labels.shape == (48, 48) for s in samples)
    assert max(len(set(np.unique(s.labels)) - {0}) for s in samples) >= 2
    assert all(((s.labels > 0) == s.foreground).all() for s in samples)


def test_crate_key_facet_is_the_subspace_projection() -> None:
    model = CRATE(config=CRATEConfig(image_size=32, patch_size=8, dim=32, depth=2, heads=4, dim_head=8)).eval()
    x = torch.randn(2, 3, 32, 32)
    key = facet_features(model, x, 0, "key")
    z0, _ = model.embed(x)
    expected = model.blocks[0].mssa.subspace_proj(model.blocks[0].norm1(z0))[:, 1:]  # U^T LN(Z^0), heads side by side
    torch.testing.assert_close(key, expected.reshape(2, 4, 4, 32))
    torch.testing.assert_close(facet_features(model, x, -1, "code"), facet_features(model, x, -1, "token"))
    assert facet_features(model, x, 1, "attn").shape == (2, 4, 4, 32)
    with pytest.raises(ValueError, match="unknown facet"):
        facet_features(model, x, 0, "value")


def test_timm_facets() -> None:
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    vit.eval()
    x = torch.randn(1, 3, 32, 32)
    (out,) = vit.forward_intermediates(x, indices=[1], output_fmt="NCHW", intermediates_only=True)
    torch.testing.assert_close(facet_features(vit, x, 1, "token"), out.permute(0, 2, 3, 1))
    block = vit.blocks[0]
    tokens = vit._pos_embed(vit.patch_embed(x))
    k = block.attn.qkv(block.norm1(tokens)).reshape(1, 17, 3, 48)[:, 1:, 1]
    torch.testing.assert_close(facet_features(vit, x, 0, "key"), k.reshape(1, 4, 4, 48))
    with pytest.raises(ValueError, match="CRATE only"):
        facet_features(vit, x, 0, "code")


def test_paper_pca_removes_the_background_and_colours_the_foreground() -> None:
    gen = torch.Generator().manual_seed(0)
    feats, objects = [], []
    for i in range(3):
        obj = torch.zeros(6, 6, dtype=torch.bool)
        obj[1 + i % 2 : 4 + i % 2, 2:5] = True
        f = 0.1 * torch.randn(6, 6, 16, generator=gen)
        f[obj] += torch.linspace(-1, 1, 16) * 3  # the object: far from the background along one direction
        f[obj, 0] += torch.randn(int(obj.sum()), generator=gen)  # and varied within
        feats.append(f)
        objects.append(obj.numpy())
    out = paper_pca(feats)
    for fg, obj, rgb in zip(out.foreground, objects, out.rgb, strict=True):
        assert (fg == obj).all()
        assert (rgb[~fg] == 0).all() and rgb[fg].max() == pytest.approx(1.0)
    assert len(out.explained_variance_ratio) == 3


def test_every_family_works_crate_alpha() -> None:
    from cratevit.checkpoint import load_model

    model = load_model("crate_alpha_debug").eval()
    x = torch.randn(1, 3, 32, 32)
    code = facet_features(model, x, -1, "code")  # CRATE-alpha's overcomplete sparse code, not the layer output
    assert code.shape[:3] == (1, 4, 4) and code.shape[-1] > facet_features(model, x, -1, "token").shape[-1]
    assert (code >= 0).all()
    result = evaluate_protocols(model, shapes_samples("val", 4, 32), (32, 32), (8, 8), protocols=("paper", "dino"))
    assert result.summary()["paper"]["images_scored"] == 4
