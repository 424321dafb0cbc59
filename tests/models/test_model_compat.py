"""Calls ported from the original CRATE code run unchanged: the constructor's ``mlp_dim`` and the emergence demo's
``get_last_selfattention(img, layer=...)``."""

import pytest
import torch

from cratevit import CRATE
from cratevit.checkpoint import from_reference_keys
from reference_crate import ReferenceCRATE

ORIGINAL = dict(image_size=32, patch_size=8, num_classes=10, dim=64, depth=6, heads=4, dim_head=16)


def test_original_constructor_with_mlp_dim():
    """Every original preset passes mlp_dim (e.g. CRATE_tiny: mlp_dim=384 * 4); the ISTA block has no hidden width,
    so the value changes nothing: same parameters, same function."""
    torch.manual_seed(0)
    with_mlp = CRATE(**ORIGINAL, dropout=0.0, emb_dropout=0.0, mlp_dim=64 * 4)
    plain = CRATE(**ORIGINAL)
    assert with_mlp.config == plain.config
    assert {k: v.shape for k, v in with_mlp.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert with_mlp.blocks[0].ista.dictionary.shape == (64, 64)


def demo_attention(ref: ReferenceCRATE, img: torch.Tensor, layer: int) -> torch.Tensor:
    """The demo's get_last_selfattention(img, layer) written out on the literal reference: run blocks 0..layer-1,
    then return block ``layer``'s softmax(w w^T / sqrt(p)) with w = U^T LN(z)."""
    x = ref.to_patch_embedding[1:](ref.patchify(img))
    x = torch.cat((ref.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + ref.pos_embedding
    for i, (attn, ff) in enumerate(ref.transformer.layers):
        if i < layer:
            x = ff(attn(x) + x)
            continue
        b, n, _ = x.shape
        w = attn.fn.qkv(attn.norm(x)).reshape(b, n, attn.fn.heads, -1).permute(0, 2, 1, 3)
        return torch.softmax(w @ w.transpose(-1, -2) * attn.fn.scale, dim=-1)
    raise AssertionError("layer beyond depth")


def test_get_last_selfattention_layer_as_the_demo_calls_it():
    torch.manual_seed(0)
    ref = ReferenceCRATE(**ORIGINAL).eval()
    model = CRATE(**ORIGINAL).eval()
    model.load_state_dict(from_reference_keys(ref.state_dict()))
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for layer in (0, 3, 5):  # the demo's default is layer=5 (0-based: the sixth block)
            torch.testing.assert_close(model.get_last_selfattention(img, layer=layer), demo_attention(ref, img, layer))
        # our default is the LAST block (here also index 5), and negative indices count from the end
        torch.testing.assert_close(model.get_last_selfattention(img), demo_attention(ref, img, 5))
        torch.testing.assert_close(model.get_last_selfattention(img, layer=-3), demo_attention(ref, img, 3))
    with pytest.raises(ValueError, match="layer=6 is outside this 6-layer model"):
        model.get_last_selfattention(img, layer=6)
