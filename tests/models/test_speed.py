"""Every fast path of cratevit computes the reference formulation's math."""

import copy

import pytest
import torch

from cratevit import CRATE
from cratevit.checkpoint import from_reference_keys
from cratevit.models import ISTA
from cratevit.models.reference import FeedForward, ReferenceCRATE

KW = dict(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4, dim_head=16)


def paired():
    ref = ReferenceCRATE(**KW)
    model = CRATE(**KW)
    model.load_state_dict(from_reference_keys(ref.state_dict()))
    return ref, model


def max_rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_fused_ista_equals_the_three_product_reference_step():
    ref = FeedForward(48)
    fast = ISTA(48)
    fast.dictionary.data.copy_(ref.weight.data)
    x = torch.randn(3, 11, 48)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-6)
        # a non-contiguous input (a transposed view) gives the same result
        xt = torch.randn(3, 48, 11).transpose(1, 2)
        torch.testing.assert_close(fast(xt), ref(xt), rtol=1e-5, atol=1e-6)
        # a model held in bfloat16 (no autocast) takes the fully fused path and stays close
        assert max_rel(copy.deepcopy(fast).bfloat16()(x.bfloat16()), ref(x)) < 0.02


def test_ista_gradients_equal_reference():
    ref = FeedForward(32)
    fast = ISTA(32)
    fast.dictionary.data.copy_(ref.weight.data)
    x1 = torch.randn(2, 5, 32, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    ref(x1).square().sum().backward()
    fast(x2).square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.dictionary.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)


def test_bfloat16_autocast_keeps_a_float32_residual_stream_and_tracks_reference():
    ref, model = paired()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        full = ref.eval()(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            trace = model.eval().forward_trace(x)
            fast, slow = model(x), ref(x)
    for t in trace.layers:  # LayerNorm in, residual sums and ISTA output in float32; products in bfloat16
        assert t.z_half.dtype == t.z_out.dtype == torch.float32
        assert t.proj.dtype == torch.bfloat16
    assert max_rel(fast, full) < 0.05
    assert max_rel(fast, full) <= 2 * max_rel(slow, full) + 1e-3  # no less accurate than the reference in bf16


def test_attention_kernel_is_chosen_per_dtype():
    mssa = CRATE(**KW).blocks[0].mssa
    assert mssa._use_sdpa(torch.empty(1))  # float32 CPU: the fused kernel (measured faster)
    assert not mssa._use_sdpa(torch.empty(1, dtype=torch.bfloat16))  # bfloat16 CPU: explicit softmax


def test_grad_checkpointing_gives_equal_gradients():
    _, model = paired()
    other = copy.deepcopy(model)
    other.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    model.train()(x).square().sum().backward()
    other.train()(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_adamw_step_equals_the_default_step():
    _, model = paired()
    other = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    opts = [
        torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.05, fused=f)
        for m, f in ((model, None), (other, True))
    ]
    for m, opt in zip((model, other), opts, strict=True):
        for _ in range(2):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_gives_equal_outputs():
    ref, model = paired()
    compiled = torch.compile(model.eval())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_rel(compiled(x), ref.eval()(x)) <= 1e-5
