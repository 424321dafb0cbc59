"""MaskCut, COCO-format masks and class-agnostic AP, and the multi-object shapes data."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cratevit.analysis import maskcut as maskcut_module
from cratevit.analysis.detection import coco_ap
from cratevit.analysis.maskcut import (
    foreground_side,
    maskcut,
    maskcut_image,
    ncut_bipartition,
    results_for_image,
    set_input_size,
    upsample_mask,
)
from cratevit.data.coco import class_agnostic, decode_mask, encode_mask, load_annotations, read_coco_folder
from cratevit.data.multishapes import MultiShapesDataset, export_coco, render_scene
from cratevit.models import CRATE, CRATEConfig


@pytest.fixture(scope="module")
def coco_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multishapes")
    export_coco(MultiShapesDataset("val", 16, 48, seed=3), folder)
    return folder


def _object_image(size: int = 64, patch: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy textured background with one bright square object; its mask at the token grid."""
    rng = np.random.default_rng(seed)
    img = 0.35 + 0.1 * rng.random((size, size, 3))
    img[:, :, 1] += 0.1 * np.sin(np.arange(size) / 3)[None, :]
    obj = np.zeros((size, size), bool)
    obj[12:36, 28:52] = True
    img[obj] = [0.9, 0.2, 0.1]
    img += 0.03 * rng.normal(size=img.shape)
    grid = obj.reshape(size // patch, patch, size // patch, patch).mean((1, 3)) > 0.5
    return img, grid


def _patch_features(img: np.ndarray, patch: int = 4) -> np.ndarray:
    """Raw patch pixels, centred over the image: the simplest features with a clear object."""
    g = img.shape[0] // patch
    f = img.reshape(g, patch, g, patch, 3).transpose(0, 2, 1, 3, 4).reshape(g, g, -1)
    return f - f.reshape(-1, f.shape[-1]).mean(0)


def test_maskcut_finds_a_clear_object() -> None:
    img, obj = _object_image()
    masks = maskcut(_patch_features(img))
    assert masks and masks[0].round == 0 and masks[0].score == 1.0
    first = masks[0].mask
    assert (first & obj).sum() / (first | obj).sum() > 0.9
    taken = np.zeros_like(obj)
    for m in masks:  # later masks never reuse an earlier mask's tokens and are never tiny
        assert not (m.mask & taken).any() and m.mask.mean() > 0.01
        taken |= m.mask


def test_dense_and_lanczos_solvers_agree() -> None:
    img, _ = _object_image(seed=1)
    f = _patch_features(img).reshape(256, -1)
    dense, seed_d = ncut_bipartition(f, (16, 16), solver="dense")
    lanczos, seed_l = ncut_bipartition(f, (16, 16), solver="lanczos")
    assert (dense == lanczos).all() and dense.reshape(-1)[seed_d] and lanczos.reshape(-1)[seed_l]
    with pytest.raises(ValueError, match="eigen solver"):
        ncut_bipartition(f, (16, 16), solver="qr")


def test_the_corner_rule_picks_the_object_side() -> None:
    # an object in the middle and a uniform frame: whatever the eigenvector's sign, the frame is background
    f = np.zeros((8, 8, 2))
    f[..., 0] = 1.0
    f[2:6, 2:6] = [-1.0, 0.3]
    part, _ = ncut_bipartition(f.reshape(64, 2) + 0.01 * np.random.default_rng(0).normal(size=(64, 2)), (8, 8))
    assert part[2:6, 2:6].all() and part.sum() == 16


def _large_object_scene(seed: int = 2, g: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """A 24x24 grid (576 tokens: above 256, so the default solver is Lanczos) where one object fills all but a
    3-token frame: the background side is the smaller, its tokens carry the largest |v|, and CutLER's rule
    keeps the object for one sign of the eigenvector and the frame for the other. Features: one direction for
    the frame, another for the object, noise of 0.3."""
    rng = np.random.default_rng(seed)
    f = np.zeros((g, g, 16))
    f[..., 0] = 1.0
    obj = np.zeros((g, g), bool)
    obj[3 : g - 2, 2 : g - 3] = True
    f[obj] = 0.0
    f[obj, 1] = 1.0
    return f + 0.3 * rng.normal(size=f.shape), obj


def test_foreground_side_does_not_depend_on_the_eigenvectors_sign() -> None:
    rng = np.random.default_rng(0)
    for trial in range(200):
        grid = (int(rng.integers(1, 9)), int(rng.integers(2, 9)))
        v = rng.normal(size=grid[0] * grid[1]) + (trial % 3) * rng.random(grid[0] * grid[1])
        part, seed = foreground_side(v, grid)
        flipped, seed_flipped = foreground_side(-v, grid)
        assert (part == flipped).all() and seed == seed_flipped and part.reshape(-1)[seed]
    # hand-made: a frame (the 12 border tokens of a 4x4 grid) against a 2x2 object; the frame holds the corners
    v = np.full((4, 4), 0.5)
    v[1:3, 1:3] = -1.0  # the object's side is v < mean; the largest |v| is in the object
    for s in (1.0, -1.0):
        part, seed = foreground_side(s * v.reshape(-1), (4, 4))
        assert part[1:3, 1:3].all() and part.sum() == 4 and seed in (5, 6, 9, 10)
    # CutLER's own case: the complement holds the corners and the largest |v| (a large object, a small frame)
    v = np.full((4, 4), -0.2)
    v[0], v[:, 0] = 1.0, 1.0  # a two-sided frame with 3 corners, largest |v|, above the mean
    v[3, 3] = -0.2
    part, _ = foreground_side(-v.reshape(-1), (4, 4))  # P = {-v > mean} is the object, the frame holds |v| max
    assert part[1:, 1:].all() and part.sum() == 9  # the object, where CutLER would keep the frame


def test_large_object_scene_first_mask_is_the_same_for_both_solvers(monkeypatch) -> None:
    f, obj = _large_object_scene()
    flat = f.reshape(576, -1)
    dense, _ = ncut_bipartition(flat, (24, 24), solver="dense")
    default, _ = ncut_bipartition(flat, (24, 24))  # auto: Lanczos above 256 tokens
    assert (dense == default).all() and (dense & obj).sum() / (dense | obj).sum() > 0.85
    first = {solver: maskcut(f, solver=solver)[0].mask for solver in ("dense", "lanczos", "auto")}
    assert (first["dense"] == first["auto"]).all() and (first["lanczos"] == first["auto"]).all()
    assert (first["auto"] & obj).sum() / (first["auto"] | obj).sum() > 0.85  # the object, not the frame
    # whatever sign a solver returns, the same masks
    flip = maskcut_module.second_eigenvector
    monkeypatch.setattr(maskcut_module, "second_eigenvector", lambda a, solver="auto": -flip(a, solver))
    flipped = maskcut(f, solver="dense")
    assert (flipped[0].mask == first["dense"]).all()


def test_random_scenes_give_the_same_masks_for_both_solvers() -> None:
    from scipy import ndimage

    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        blobs = ndimage.gaussian_filter(rng.normal(size=(18, 18)), 3) > 0  # 324 tokens, random shapes
        f = 0.25 * rng.normal(size=(18, 18, 8))
        f[..., 0] += np.where(blobs, 1.0, -1.0)
        f[..., 1] += rng.random()
        dense = maskcut(f, solver="dense")
        auto = maskcut(f)
        assert len(dense) == len(auto) >= 1  # every round, not only the first
        assert all((d.mask == a.mask).all() for d, a in zip(dense, auto, strict=True))


def test_masks_reach_the_image_size_as_in_cutler() -> None:
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    square = upsample_mask(mask, 64, (64, 64))  # the input's own size: nearest blocks, nothing interpolated
    assert square.shape == (64, 64) and square[16:48, 16:48].all() and square.sum() == 32 * 32
    wide = upsample_mask(mask, 64, (100, 50))  # (W, H): bicubic, then half of 255
    assert wide.shape == (50, 100)
    assert wide[25, 50] and not wide[0, 0] and abs(wide.sum() - 50 * 25) <= 2 * (50 + 25)


def test_maskcut_image_end_to_end_writes_coco_results(coco_folder) -> None:
    model = CRATE(config=CRATEConfig(image_size=32, patch_size=8, dim=32, depth=2, heads=4, dim_head=8)).eval()
    set_input_size(model, (64, 64))
    images, ann_path = read_coco_folder(coco_folder)
    results = []
    for im in images[:3]:
        masks = maskcut_image(model, Image.open(im.path), size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
        assert all(m.mask.shape == (im.height, im.width) for m in masks)
        results += results_for_image(masks, im.id)
    assert results and all(r["category_id"] == 1 and 0 < r["score"] <= 1 for r in results)
    json.dumps(results)  # JSON-ready (RLE counts as text)
    scores = coco_ap(load_annotations(ann_path), results)
    assert set(scores) == {"bbox", "segm"} and 0.0 <= scores["segm"]["AP"] <= 1.0


def test_ground_truth_scores_ap_1_and_random_boxes_near_0(coco_folder) -> None:
    gt = load_annotations(coco_folder / "annotations.json")
    perfect = [dict(a, score=1.0) for a in gt["annotations"]]
    scores = coco_ap(gt, perfect)
    for kind in ("bbox", "segm"):
        assert scores[kind]["AP"] == pytest.approx(1.0)
        assert scores[kind]["AP50"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    boxes = [
        {"image_id": im["id"], "bbox": [*rng.uniform(0, 40, 2), *rng.uniform(2, 24, 2)], "score": float(rng.random())}
        for im in gt["images"]
        for _ in range(5)
    ]
    assert coco_ap(gt, boxes, ("bbox",))["bbox"]["AP"] < 0.02
    assert coco_ap(gt, [])["segm"]["AP"] == 0.0
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_ap(gt, [{"image_id": 999, "bbox": [0, 0, 1, 1], "score": 1.0}])


def test_class_agnostic_ground_truth() -> None:
    gt = {
        "images": [{"id": 1, "width": 4, "height": 4}],
        "categories": [{"id": 5, "name": "cat"}, {"id": 9}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [0, 0, 2, 2], "iscrowd": 1}],
    }
    out = class_agnostic(gt)
    assert out["categories"] == [{"id": 1, "name": "foreground", "supercategory": "foreground"}]
    assert out["annotations"][0]["category_id"] == 1 and out["annotations"][0]["iscrowd"] == 1
    assert gt["annotations"][0]["category_id"] == 9  # a copy


def test_rle_round_trip_and_annotation_errors(tmp_path) -> None:
    mask = np.zeros((7, 5), bool)
    mask[1:4, 2:5] = True
    assert (decode_mask(encode_mask(mask)) == mask).all()
    (tmp_path / "annotations.json").write_text('{"images": 3}')
    with pytest.raises(ValueError, match="not a COCO instances file"):
        read_coco_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="--annotations"):
        read_coco_folder(tmp_path / "nothing")


def test_multishapes_scenes(coco_folder) -> None:
    a, b = render_scene(0, "val", 5), render_scene(0, "val", 5)
    assert (a.image == b.image).all() and a.labels == b.labels  # a pure function of (seed, split, index)
    counts = []
    for i in range(30):
        scene = render_scene(0, "val", i)
        counts.append(len(scene.labels))
        union = np.zeros((48, 48), int)
        for m in scene.masks:
            union += m
        assert union.max() <= 1  # visible parts never overlap
    assert min(counts) >= 1 and max(counts) == 4 and np.mean(counts) > 2.5
    gt = load_annotations(coco_folder / "annotations.json")
    assert len(gt["images"]) == 16 and len(gt["categories"]) == 6
    assert all(a["area"] > 0 and a["iscrowd"] == 0 for a in gt["annotations"])


def test_maskcut_on_features_of_the_objects_finds_some() -> None:
    # oracle features (one direction per instance + noise): MaskCut's masks match instances at IoU > 0.5
    scene = render_scene(0, "val", 2, 48)
    grid = [m.reshape(12, 4, 12, 4).mean((1, 3)) > 0.5 for m in scene.masks]
    rng = np.random.default_rng(0)
    f = 0.05 * rng.normal(size=(12, 12, 8))
    f[..., 0] += 1.0
    for k, g in enumerate(grid):
        f[g] = 0.05 * rng.normal(size=(int(g.sum()), 8))
        f[g, k + 1] += 1.0
    masks = maskcut(torch.from_numpy(f))
    best = [max((m.mask & g).sum() / (m.mask | g).sum() for g in grid if g.any()) for m in masks]
    assert best and best[0] > 0.5
