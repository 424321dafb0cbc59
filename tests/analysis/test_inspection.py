"""cratevit.inspection: every quantity checked against a direct computation from the model's own parts."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import timm
import torch
from torch import Tensor

from cratevit import create_model
from cratevit.analysis import layerwise_stats
from cratevit.analysis.facets import paper_pca
from cratevit.analysis.inspection import (
    active_atoms,
    atom_stats,
    attention_map,
    attention_rollout,
    class_names_for,
    facet_features,
    family_of,
    image_curves,
    index_atoms,
    inspect_model,
    intervene,
    patch_crop,
    pca_rgb,
    rollout_map,
    segmentation_mask,
    top_classes,
    top_patches,
)
from cratevit.models.crate import CRATEBlock, LayerTrace


@pytest.fixture(scope="module")
def crate():
    torch.manual_seed(0)
    return create_model("crate_debug", patch_size=4).eval()  # 2 layers, 2 heads of 16, 8x8 patches


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


def test_attention_and_facets_match_the_trace(crate, images) -> None:
    ins = inspect_model(crate, images)
    trace = crate.forward_trace(images)
    assert ins.depth == 2 and ins.grid == (8, 8) and ins.prefix == 1
    for layer, t in enumerate(trace.layers):
        maps = attention_map(ins, layer)
        assert maps.shape == (3, 2, 8, 8)
        torch.testing.assert_close(maps, t.attn[:, :, 0, 1:].reshape(3, 2, 8, 8))
        torch.testing.assert_close(attention_map(ins, layer, head=1), maps[:, 1])
        block = crate.blocks[layer]
        u = block.mssa.project(block.norm1(t.z_in))  # U_k^T LN(Z^l), (b, h, n, p)
        key = facet_features(ins, layer, "key")
        torch.testing.assert_close(key, u[:, :, 1:].permute(0, 2, 1, 3).reshape(3, 8, 8, 32))
        attended = torch.softmax(u @ u.transpose(-1, -2) * block.mssa.scale, -1) @ u  # SSA_k, b h n p
        z_half = t.z_in + block.mssa.out_proj(attended.transpose(1, 2).flatten(2))
        torch.testing.assert_close(facet_features(ins, layer, "attn"), z_half[:, 1:].reshape(3, 8, 8, -1))
        torch.testing.assert_close(facet_features(ins, layer, "code"), t.z_out[:, 1:].reshape(3, 8, 8, -1))
        torch.testing.assert_close(facet_features(ins, layer, "token"), facet_features(ins, layer, "code"))
    torch.testing.assert_close(ins.logits, crate(images))
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        attention_map(ins, 2)
    with pytest.raises(ValueError, match="head 5 is out of range"):
        attention_map(ins, 0, head=5)
    with pytest.raises(ValueError, match="facet 'value'"):
        facet_features(ins, 0, "value")


def test_rollout_against_the_definition() -> None:
    torch.manual_seed(0)
    attns = [torch.softmax(torch.randn(2, 3, 5, 5), -1) for _ in range(3)]
    eye = torch.eye(5)
    expected = None
    for a in attns:  # 0.5 A + 0.5 I, rows renormalised, later layers on the left
        m = 0.5 * a.mean(1) + 0.5 * eye
        m = m / m.sum(-1, keepdim=True)
        expected = m if expected is None else m @ expected
    out = attention_rollout(attns)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 5))
    torch.testing.assert_close(attention_rollout(attns[:1], residual=0.0), attns[0].mean(1))


def test_rollout_map_of_a_model(crate, images) -> None:
    ins = inspect_model(crate, images)
    r = rollout_map(ins, upto=0)
    full = attention_rollout([ins.layers[0].attn])
    torch.testing.assert_close(r, full[:, 0, 1:].reshape(3, 8, 8))


def test_masks_under_each_protocol(crate, images) -> None:
    ins = inspect_model(crate, images)
    head_mean = attention_map(ins, -1).mean(1)
    entries = segmentation_mask(ins, -1, "entries", 0.5)
    assert entries.shape == (3, 8, 8) and (entries.flatten(1).sum(1) == 32).all()
    for i in range(3):
        assert head_mean[i][entries[i]].min() >= head_mean[i][~entries[i]].max()
    mass = segmentation_mask(ins, -1, "mass", 0.6, head=0)
    m0 = attention_map(ins, -1, head=0)
    kept_mass = (m0 * mass).flatten(1).sum(1) / m0.flatten(1).sum(1)
    assert (kept_mass >= 0.6).all()
    pca = segmentation_mask(ins, -1, "pca", facet="key")
    assert pca.dtype == torch.bool and pca.shape == (3, 8, 8)
    paper = segmentation_mask(ins, -1, "paper-pca", 0.4, facet="key")
    expected = [paper_pca([f], threshold=0.4).foreground[0] for f in facet_features(ins, -1, "key")]
    assert paper.shape == (3, 8, 8) and all((p.numpy() == e).all() for p, e in zip(paper, expected, strict=True))
    with pytest.raises(ValueError, match="paper's PCA cut"):
        segmentation_mask(ins, -1, "paper-pca", 1.0)
    with pytest.raises(ValueError, match="unknown mask protocol"):
        segmentation_mask(ins, -1, "otsu")


def test_pca_rgb_recovers_a_planted_direction() -> None:
    torch.manual_seed(0)
    rows, cols = 6, 5
    fg = torch.zeros(rows, cols, dtype=torch.bool)
    fg[1:4, 1:3] = True
    feats = 0.01 * torch.randn(rows, cols, 8)
    feats[fg] += torch.tensor([5.0] + [0.0] * 7)
    rgb, first, ratio = pca_rgb(feats)
    assert rgb.shape == (rows, cols, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert ratio[0] > 0.95
    split = first > first.mean()
    assert (split == fg.numpy()).all() or (split == ~fg.numpy()).all()


def test_curves_equal_the_analysis_module(crate, images) -> None:
    ins = inspect_model(crate, images)
    curves = image_curves(ins)
    stats = layerwise_stats(crate, images)
    torch.testing.assert_close(curves["rc"], stats.rc_in)
    torch.testing.assert_close(curves["sparsity"], stats.sparsity)


def test_top_classes_and_names() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    top = top_classes(logits, 2, ["a", "b", "c", "d"])
    assert [t["name"] for t in top] == ["b", "d"]
    assert top[0]["prob"] == pytest.approx(float(logits.softmax(0)[1]))
    assert class_names_for(10, "digits")[3] == "3"
    assert class_names_for(6, "shapes")[0] == "circle"
    assert class_names_for(1000)[1] == "goldfish"
    assert class_names_for(7) == [f"class {i}" for i in range(7)]


def test_atoms_index_stats_and_top_patches(crate, images) -> None:
    index, curves = index_atoms(crate, images, layers=[1], batch_size=2)
    ins = inspect_model(crate, images)
    codes = facet_features(ins, 1, "code")
    torch.testing.assert_close(index[1].codes, codes)  # batching does not change the codes
    assert curves["rc"].shape == (3, 2)
    j = int(codes.flatten(0, 2).gt(0).float().mean(0).argmax())  # the most used coordinate
    stats = atom_stats(index[1], j)
    assert stats["patch_frequency"] == pytest.approx(float((codes[..., j] > 0).float().mean()))
    assert stats["usage_rank"] == 0 and stats["max"] == pytest.approx(float(codes[..., j].max()))
    top = top_patches(index[1], j, k=5)
    values = [p["value"] for p in top]
    assert values == sorted(values, reverse=True) and values[0] == pytest.approx(float(codes[..., j].max()))
    for p in top:
        assert codes[p["image"], p["row"], p["col"], j] == pytest.approx(p["value"])
    active = active_atoms(ins, 1, k=3, image=2)
    totals = codes[2].flatten(0, 1).sum(0)
    assert [a["coord"] for a in active] == totals.topk(3).indices.tolist()
    with pytest.raises(ValueError, match="out of range"):
        atom_stats(index[1], 999)


def test_patch_crop_has_context() -> None:
    from PIL import Image

    img = Image.new("RGB", (32, 32))
    assert patch_crop(img, 0, 0, (4, 4)).size == (8, 8)  # clipped at the corner
    assert patch_crop(img, 3, 3, (4, 4)).size == (12, 12)


def test_intervention_equals_rerunning_the_edited_tokens(crate, images) -> None:
    ins = inspect_model(crate, images)
    result = intervene(crate, ins, layer=0, coord=5, value=0.0)
    z = crate.forward_trace(images).layers[0].z_out.clone()
    z[..., 5] = 0.0
    attn1 = crate.blocks[1].trace(z)[1].attn
    expected = crate.forward_head(crate.blocks[1](z))
    torch.testing.assert_close(result.logits, expected)
    torch.testing.assert_close(result.attention_after(1), attn1)
    assert not torch.allclose(result.logits, ins.logits)
    last = intervene(crate, ins, layer=-1, coord=5, value=2.0)
    assert last.after_layers == [] and last.layer == 1
    z = ins.layers[1].facets["code"].clone()
    z[..., 5] = 2.0
    torch.testing.assert_close(last.logits, crate.forward_head(z))
    with pytest.raises(ValueError, match="runs before the edited layer"):
        result.attention_after(0)
    with pytest.raises(ValueError, match="code coordinate 99"):
        intervene(crate, ins, 0, 99)


# ------------------------------------------------------------------ a family whose code is internal to the block
@dataclass
class _CodeTrace(LayerTrace):
    code: Tensor | None = None


class _ResidualCodeBlock(CRATEBlock):
    """A block whose output is ``Z^{l+1/2} + code`` (a residual, as CRATE-alpha): the code is internal."""

    def forward(self, z: Tensor) -> Tensor:
        return self.trace(z)[0]

    def trace(self, z: Tensor, code_edit=None) -> tuple[Tensor, _CodeTrace]:
        _, t = super().trace(z)
        code = t.z_out if code_edit is None else code_edit(t.z_out.clone())
        out = t.z_half + code
        return out, _CodeTrace(z_in=z, proj=t.proj, attn=t.attn, z_half=t.z_half, z_out=out, code=code)


def test_a_family_with_an_internal_code_uses_its_hook(images) -> None:
    torch.manual_seed(0)
    model = create_model("crate_debug", patch_size=4).eval()
    for i, old in enumerate(model.blocks):
        new = _ResidualCodeBlock(model.config)
        new.load_state_dict(old.state_dict())
        model.blocks[i] = new
    ins = inspect_model(model, images)
    assert family_of(model).name == "white-box" and ins.family == "crate"
    assert not torch.equal(ins.layers[0].facets["code"], ins.layers[0].facets["token"])
    result = intervene(model, ins, layer=0, coord=3, value=0.0)
    z, _ = model.blocks[0].trace(ins.layers[0].z_in, code_edit=lambda c: c.index_fill_(-1, torch.tensor([3]), 0.0))
    torch.testing.assert_close(result.logits, model.forward_head(model.blocks[1](z)))
    assert not torch.allclose(result.logits, ins.logits)


def test_a_registered_code_editor(images) -> None:
    """A family whose block exposes decode(code, z_half) registers how an edited code becomes the output."""
    from cratevit.analysis import inspection

    torch.manual_seed(0)
    model = create_model("crate_debug", patch_size=4).eval()
    for i, old in enumerate(model.blocks):
        new = _ResidualCodeBlock(model.config)
        new.load_state_dict(old.state_dict())
        model.blocks[i] = new
    ins = inspect_model(model, images)
    calls = []

    def editor(block, record, code):
        calls.append(block)
        return record.z_half + code  # the block's own decoding of its code

    inspection.register_code_editor(_ResidualCodeBlock, editor)
    try:
        result = intervene(model, ins, layer=0, coord=3, value=0.0)
    finally:
        del inspection._CODE_EDITORS[_ResidualCodeBlock]
    assert calls == [model.blocks[0]]
    z, _ = model.blocks[0].trace(ins.layers[0].z_in, code_edit=lambda c: c.index_fill_(-1, torch.tensor([3]), 0.0))
    torch.testing.assert_close(result.logits, model.forward_head(model.blocks[1](z)))


def test_the_view_follows_the_registry_record(crate) -> None:
    """No second family registry: what inspection offers a model is read from its registry record."""
    from cratevit.analysis import inspection, layers

    assert not hasattr(inspection, "register_family") and inspection.LayerRecord is layers.LayerRecord
    assert family_of(crate).name == "white-box" and family_of(crate).has_code
    ablation = create_model("crate_mlp_digits")  # its record's code_kind: no sparse code
    assert (
        not family_of(ablation).has_code
        and "code" not in inspect_model(ablation, torch.randn(1, 3, 32, 32)).layers[0].facets
    )
    with pytest.raises(ValueError, match="cannot look inside a Linear"):
        family_of(torch.nn.Linear(2, 2))


def test_one_layer_reader_for_segmentation_facets_and_inspection(crate, images) -> None:
    from cratevit.analysis import facets, segmentation
    from cratevit.analysis.layers import read_layer, read_layers

    ins = inspect_model(crate, images)
    read = read_layers(crate, images, [1])
    assert (read.family, read.grid, read.prefix, len(read.layers)) == ("crate", (8, 8), 1, 1)
    record, _ = read_layer(crate, images, -1)
    for facet in ("token", "key", "attn", "code"):
        torch.testing.assert_close(record.facets[facet], ins.layers[1].facets[facet])
    torch.testing.assert_close(segmentation.attention_maps(crate, images, 1), attention_map(ins, 1))
    torch.testing.assert_close(
        segmentation.patch_features(crate, images, 1), facets.facet_features(crate, images, 1, "token")
    )
    with pytest.raises(ValueError, match=r"layer 2 is out of range.*0-based"):
        read_layer(crate, images, 2)
    with pytest.raises(ValueError, match="--decoder needs a CRATE-MAE"):
        read_layer(crate, images, 0, decoder=True)


# ------------------------------------------------------------------ timm ViTs
def test_timm_vit_attention_and_facets() -> None:
    from cratevit.analysis.segmentation import attention_maps

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=5, depth=3
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    ins = inspect_model(vit, x)
    assert family_of(vit).facets == ("token", "key", "attn") and ins.grid == (4, 4)
    for layer in range(3):
        torch.testing.assert_close(attention_map(ins, layer), attention_maps(vit, x, layer))
    blk = vit.blocks[1]
    tokens_in = ins.layers[0].facets["token"]
    qkv = blk.attn.qkv(blk.norm1(tokens_in)).reshape(2, 17, 3, 3, 64)
    torch.testing.assert_close(ins.layers[1].facets["key"], qkv[:, :, 1].flatten(2))
    torch.testing.assert_close(ins.layers[1].facets["attn"], tokens_in + blk.attn(blk.norm1(tokens_in)))
    torch.testing.assert_close(ins.logits, vit(x))
    assert all(b.attn.fused_attn == timm.layers.use_fused_attn() for b in vit.blocks)  # restored
    assert image_curves(ins) == {}
    with pytest.raises(ValueError, match="no sparse code"):
        intervene(vit, ins, 0, 0)
    with pytest.raises(ValueError, match="no sparse code"):
        index_atoms(vit, x, [0])


# ------------------------------------------------------------------ every family: the same facets as analysis.facets
@pytest.mark.parametrize("spec", ["crate_debug", "crate_alpha_debug", "mae_crate_digits", "vit"])
def test_facets_agree_with_the_segmentation_module(spec) -> None:
    from cratevit.analysis import facets

    torch.manual_seed(0)
    if spec == "vit":
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    else:
        model = create_model(spec)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    ins = inspect_model(model, x)
    for facet in family_of(model).facets:
        for layer in (0, -1):
            torch.testing.assert_close(facet_features(ins, layer, facet), facets.facet_features(model, x, layer, facet))


def test_crate_alpha_intervention_decodes_the_edited_code() -> None:
    """CRATE-alpha's code A_2 lives inside the block: Z^{l+1} = Z^{l+1/2} + A_2 D_hat^T."""
    torch.manual_seed(0)
    model = create_model("crate_alpha_debug").eval()
    x = torch.randn(2, 3, 32, 32)
    ins = inspect_model(model, x)
    assert ins.family == "crate_alpha" and facet_features(ins, 0, "code").shape[-1] == 4 * model.config.dim
    assert image_curves(ins)["sparsity"].shape == (2, 2)  # the sparsity of A_2, not of the dense output
    result = intervene(model, ins, layer=0, coord=7, value=0.0)
    t = model.forward_trace(x).layers[0]
    code = t.code.clone()
    code[..., 7] = 0.0
    z = t.z_half + code @ model.blocks[0].ista.decoder.t()
    torch.testing.assert_close(result.logits, model.forward_head(model.blocks[1](z)))
    assert not torch.allclose(result.logits, ins.logits)


def test_crate_mae_is_read_through_its_encoder() -> None:
    """CRATE-MAE: its encoder's layers, no classifier; an edited code reruns the later encoder layers."""
    torch.manual_seed(0)
    model = create_model("mae_crate_digits").eval()
    x = torch.randn(2, 3, 32, 32)
    ins = inspect_model(model, x)
    assert ins.family == "crate_mae" and ins.depth == len(model.blocks) and ins.logits is None
    assert ins.grid == (8, 8) and set(image_curves(ins)) == {"rc", "sparsity"}
    result = intervene(model, ins, layer=0, coord=3, value=0.0)
    z = model.forward_trace(x).encoder[0].z_out.clone()
    z[..., 3] = 0.0
    torch.testing.assert_close(result.attention_after(1), model.blocks[1].trace(z)[1].attn)
    assert result.logits is None and len(result.after_layers) == len(model.blocks) - 1
