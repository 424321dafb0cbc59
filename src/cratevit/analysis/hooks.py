"""Hook points: read and replace any layer's activation by a stable name, cache a forward pass, patch activations
between two images (in the style of TransformerLens / ViT-Prisma, on cratevit's own module structure).

Names follow the module names of the model (``blocks.L`` is block ``L``, 0-based, as in the state dict;
``decoder_blocks.L`` a CRATE-MAE decoder block, ``class_blocks.L`` a ToST class-attention block), with one point
per intermediate of the layer's explicit trace (:meth:`~cratevit.models.blocks.WhiteBoxBlock.trace`). ``ATT`` is
the attention child's own name: ``mssa`` (CRATE, CRATE-alpha, the CRATE-MAE encoder, the MSSA ablations), ``attn``
(MHSA ablations, timm ViTs) or ``tssa`` (ToST). Shapes: b images, n tokens (class token first, where the model has
one in its blocks), h heads::

    blocks.L.in            Z^l, the tokens entering block L                                  (b, n, d)
    blocks.L.norm1         LN1(Z^l), the attention's input                                   (b, n, d)
    blocks.L.ATT.proj      per-head coordinates: MSSA's U_k^T x, the keys (MHSA, timm),
                           ToST's w = U_k^T x                                                 (b, h, n, p)
    blocks.L.ATT.pattern   softmax attention per head (not ToST)                              (b, h, n, n)
    blocks.L.tssa.membership  ToST's soft head memberships Pi                                (b, h, n)
    blocks.L.ATT.out       the attention branch's output (after the output projection,
                           before the residual sum, LayerScale and stochastic depth)          (b, n, d)
    blocks.L.mid           Z^{l+1/2} = Z^l + attention, the residual stream after attention  (b, n, d)
    blocks.L.norm2         LN2(Z^{l+1/2}): the ISTA step's (or the MLP's) input              (b, n, d)
    blocks.L.ista.code     the sparse code: CRATE's ISTA output (= blocks.L.out), CRATE-alpha's
                           A_2                                                               (b, n, d or 4d)
    blocks.L.mlp.out       the MLP branch's output (ViT-style blocks), before the residual sum (b, n, d)
    blocks.L.out           Z^{l+1}, the tokens leaving block L                               (b, n, d)

A CRATE-MAE decoder block runs the encoder layer's two steps backwards, ``Z^{l+1/2} = LN1(Z^l) D^T`` (the
dictionary maps a sparse code to a signal; no residual), then ``Z^{l+1} = Z^{l+1/2} - MSSA(LN2(Z^{l+1/2}))`` (the
compression undone). Its points, in that order::

    decoder_blocks.L.in              Z^l, the tokens entering decoder block L (block 0: the latent)  (b, n, d)
    decoder_blocks.L.norm1           LN1(Z^l), the code the dictionary decodes                       (b, n, d)
    decoder_blocks.L.dictionary.out  LN1(Z^l) D^T, the dictionary step's output                      (b, n, d)
    decoder_blocks.L.mid             Z^{l+1/2}, the same tensor (the step has no residual); replacing
                                     it replaces what the MSSA step reads                             (b, n, d)
    decoder_blocks.L.norm2           LN2(Z^{l+1/2}), the MSSA step's input                            (b, n, d)
    decoder_blocks.L.mssa.proj       U_k^T LN2(Z^{l+1/2}) per head                                    (b, h, n, p)
    decoder_blocks.L.mssa.pattern    softmax attention per head                                       (b, h, n, n)
    decoder_blocks.L.mssa.out        MSSA(LN2(Z^{l+1/2})), before it is subtracted                    (b, n, d)
    decoder_blocks.L.out             Z^{l+1} = Z^{l+1/2} - MSSA(...), the tokens leaving the block    (b, n, d)

A ToST class-attention block (CaiT / XCiT, ``x = [cls; patches]``, n = 1 + patches) lets the class token alone
attend: ``x1 = x + gamma1 * [CA(LN1(x))_cls; LN1(x)_patches]``, ``x2 = LN2(x1)`` (every token with
``tokens_norm``, else the class token only), ``out = x2 + [gamma2 * MLP(x2_cls); x2_patches]``::

    class_blocks.L.in            [cls; Z^depth] (block 0) or the previous class block's output    (b, n, d)
    class_blocks.L.norm1         LN1(x), the class attention's input                              (b, n, d)
    class_blocks.L.attn.proj     the keys of LN1(x) per head                                      (b, h, n, p)
    class_blocks.L.attn.pattern  the class token's softmax attention over all tokens              (b, h, 1, n)
    class_blocks.L.attn.out      the attention child's output [Linear(attended cls); LN1(x)_patches],
                                 before LayerScale and the residual sum                           (b, n, d)
    class_blocks.L.mid           x1, the residual stream after the class attention                (b, n, d)
    class_blocks.L.norm2         x2 = LN2(x1), the MLP's input (row 0) and the patch tokens' path  (b, n, d)
    class_blocks.L.mlp.out       MLP(x2_cls), the class token's MLP output before LayerScale       (b, 1, d)
    class_blocks.L.out           the tokens leaving the block                                     (b, n, d)

A point exists only where the block computes it (:func:`hook_names` lists a model's). Every point can be
replaced, except ToST's ``proj`` and ``membership`` (read-only: the fused operator has no seam there).

Mechanism: :func:`hooks` registers one forward hook on each block that a hook names, only inside the ``with``
block, and removes it on exit; the hooked block's output is recomputed by the block's explicit step (the math of
its ``trace``, with each named intermediate passed through the hook) and replaces the fast forward's output. So
a hooked block runs twice and with explicit attention (the matrix exists), and the tensors equal the trace API's;
the rest of the network, and every forward outside the context, runs untouched: no hook, no flag, no cost.

A hook is ``fn(activation, name)`` returning None (read) or a tensor of the same shape (replace).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError

__all__ = [
    "DECODER_POINTS",
    "HOOK_POINTS",
    "STACKS",
    "HookFn",
    "PatchingResult",
    "activation_patching",
    "block_points",
    "hook_names",
    "hooks",
    "model_output",
    "run_with_cache",
]

HookFn = Callable[[Tensor, str], "Tensor | None"]
"""A hook: ``fn(activation, name)`` returning None (read only) or the tensor that replaces the activation."""

HOOK_POINTS: Mapping[str, str] = {
    "in": "Z^l, the tokens entering the block",
    "norm1": "LN1(Z^l), the attention's input",
    "ATT.proj": "the attention's per-head coordinates (MSSA's U_k^T x; the keys of MHSA / timm; ToST's w)",
    "ATT.pattern": "softmax attention per head (b, h, n, n); not in ToST",
    "tssa.membership": "ToST's soft head memberships Pi (b, h, n)",
    "ATT.out": "the attention branch's output, before the residual sum",
    "mid": "Z^{l+1/2}, the residual stream after the attention step",
    "norm2": "LN2(Z^{l+1/2}), the input of the ISTA step or the MLP",
    "ista.code": "the sparse code (CRATE: the ISTA output = the block's output; CRATE-alpha: A_2)",
    "mlp.out": "the MLP branch's output, before the residual sum (ToST's class blocks: MLP(x2_cls), (b, 1, d))",
    "out": "Z^{l+1}, the tokens leaving the block",
    "dictionary.out": "CRATE-MAE decoder: LN1(Z^l) D^T, the dictionary step's output (= mid: no residual)",
}
"""Point -> what it is: the suffix after ``STACK.L.`` (``blocks``, ``decoder_blocks``, ``class_blocks``), ``ATT``
standing for the attention child's name (module docstring: what each point is in a decoder or class block)."""

STACKS = ("blocks", "class_blocks", "decoder_blocks")
"""The module lists whose blocks carry hook points, in the order of the forward pass (a model has ``blocks`` and at
most one of the others: ToST's class-attention blocks, CRATE-MAE's decoder blocks)."""


# ------------------------------------------------------------------------------------------- the block kinds
def _attention_name(block: nn.Module) -> str:
    for name in ("mssa", "tssa", "attn"):
        if hasattr(block, name):
            return name
    raise UserError(f"{type(block).__name__} has no attention child (mssa, attn or tssa); cannot hook it")


def _is_timm_block(block: nn.Module) -> bool:
    attn = getattr(block, "attn", None)
    return hasattr(block, "ls1") and all(hasattr(attn, a) for a in ("qkv", "q_norm", "k_norm", "proj"))


def _is_decoder_block(block: nn.Module) -> bool:
    """CRATE-MAE's decoder block: a dictionary step (``dictionary``, no ISTA child) then MSSA."""
    return isinstance(getattr(block, "dictionary", None), Tensor) and hasattr(block, "mssa")


def _is_class_attention_block(block: nn.Module) -> bool:
    """ToST's class-attention block (CaiT / XCiT): ``tokens_norm`` and a class attention child with ``attend``."""
    return hasattr(block, "tokens_norm") and hasattr(getattr(block, "attn", None), "attend")


DECODER_POINTS = ("in", "norm1", "dictionary.out", "mid", "norm2", "mssa.proj", "mssa.pattern", "mssa.out", "out")
"""A CRATE-MAE decoder block's points, in the order it computes them."""


def block_points(block: nn.Module) -> list[str]:
    """The hook points of one block, in the order it computes them (suffixes after ``STACK.L.``)."""
    if _is_decoder_block(block):
        return list(DECODER_POINTS)
    a = _attention_name(block)
    attention = [f"{a}.proj", f"{a}.membership" if a == "tssa" else f"{a}.pattern", f"{a}.out"]
    second: list[str] = []
    if hasattr(block, "ista"):
        second = ["norm2", "ista.code"]
    elif hasattr(block, "mlp"):
        second = ["norm2", "mlp.out"]
    return ["in", "norm1", *attention, "mid", *second, "out"]


Edit = Callable[[str, Tensor], Tensor]  # (point, tensor) -> the tensor the block goes on with


def _mssa_branch(m: nn.Module, x: Tensor, at: Edit) -> Tensor:
    """MSSA on ``x`` with explicit attention (:meth:`~cratevit.models.blocks.MSSA.trace`'s operations), its
    ``mssa.proj`` and ``mssa.pattern`` passed through ``at``; the output after the output projection."""
    w = at("mssa.proj", m.project(x))  # b h n p
    heads, attn = m.attend(w)  # explicit softmax attention: (output, matrix) per head
    edited = at("mssa.pattern", attn)
    if edited is not attn:
        heads = edited @ w
    return m.proj_drop(m.out_proj(heads.transpose(1, 2).flatten(2)))


def _white_box_step(block: nn.Module, z: Tensor, at: Edit) -> Tensor:
    """A :class:`~cratevit.models.blocks.WhiteBoxBlock` (CRATE, its ablations, CRATE-alpha, the CRATE-MAE encoder),
    the operations of its ``trace`` in the same order."""
    z = at("in", z)
    x = at("norm1", block.norm1(z))
    if hasattr(block, "mssa"):
        a = "mssa"
        out = _mssa_branch(block.mssa, x, at)
    else:
        m, a = block.attn, "attn"
        q, k, v = m.qkv_heads(x)
        k = at(f"{a}.proj", k)
        attn = at(f"{a}.pattern", torch.softmax((q @ k.transpose(-2, -1)) * m.scale, dim=-1))
        p = m.attn_drop.p if m.training else 0.0
        heads = (torch.nn.functional.dropout(attn, p=p, training=True) if p > 0.0 else attn) @ v
        out = m.proj_drop(m.proj(heads.transpose(1, 2).flatten(2)))
    z_half = at("mid", z + block.drop_path(at(f"{a}.out", out)))
    if hasattr(block, "ista"):
        code = at("ista.code", block.ista.sparse_code(at("norm2", block.norm2(z_half))))
        return at("out", block.ista.decode(code, z_half))
    if hasattr(block, "mlp"):
        return at("out", z_half + block.drop_path(at("mlp.out", block.mlp(at("norm2", block.norm2(z_half))))))
    return at("out", z_half)


def _decoder_step(block: nn.Module, z: Tensor, at: Edit) -> Tensor:
    """A CRATE-MAE decoder block (``z_half = LN1(z) D^T``; ``z_next = z_half - MSSA(LN2(z_half))``), the operations
    of its ``trace`` in the same order."""
    z = at("in", z)
    x = at("norm1", block.norm1(z))
    z_half = at("mid", at("dictionary.out", F.linear(x, block.dictionary)))
    out = _mssa_branch(block.mssa, at("norm2", block.norm2(z_half)), at)
    return at("out", z_half - at("mssa.out", out))


def _class_attention_step(block: nn.Module, x: Tensor, at: Edit) -> Tensor:
    """A ToST class-attention block, the operations of its ``_update`` (and ``ClassAttention.attend``) in the same
    order: the class token's query, the keys and values of every token, the class token's softmax row."""
    x = at("in", x)
    a = at("norm1", block.norm1(x))
    m = block.attn
    b, n, c = a.shape
    weight, bias = m.qkv.weight, m.qkv.bias
    q = F.linear(a[:, :1], weight[:c], None if bias is None else bias[:c])  # the class token's query only
    kv = F.linear(a, weight[c:], None if bias is None else bias[c:])
    q = q.view(b, 1, m.heads, -1).transpose(1, 2)  # b h 1 p
    k, v = kv.view(b, n, 2, m.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # b h n p each
    k = at("attn.proj", k)
    attn = at("attn.pattern", torch.softmax((q @ k.transpose(-1, -2)) * m.scale, dim=-1))  # b h 1 n
    weights = F.dropout(attn, m.attn_drop, training=True) if m.training and m.attn_drop > 0 else attn
    cls = (weights @ v).transpose(1, 2).reshape(b, 1, c)
    out = at("attn.out", torch.cat([m.proj_drop(m.out_proj(cls)), a[:, 1:]], dim=1))
    half = at("mid", x + block.gamma_attn * out)
    x2 = block.norm2(half) if block.tokens_norm else torch.cat([block.norm2(half[:, :1]), half[:, 1:]], dim=1)
    x2 = at("norm2", x2)
    mlp = at("mlp.out", block.mlp(x2[:, :1]))
    return at("out", x2 + torch.cat([block.gamma_mlp * mlp, x2[:, 1:]], dim=1))


def _timm_step(block: nn.Module, z: Tensor, at: Edit) -> Tensor:
    """A timm ``Block`` (``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``) with explicit attention (timm's
    own non-fused path: ``q_norm``/``k_norm``, ``q * scale``, softmax, ``attn_drop``, ``norm``, ``proj``)."""
    z = at("in", z)
    x = at("norm1", block.norm1(z))
    m = block.attn
    b, n, _ = x.shape
    qkv = m.qkv(x).reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = m.q_norm(q), at("attn.proj", m.k_norm(k))
    attn = at("attn.pattern", ((q * m.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
    heads = m.attn_drop(attn) @ v
    out = heads.transpose(1, 2).reshape(b, n, -1)
    out = m.proj_drop(m.proj(getattr(m, "norm", nn.Identity())(out)))
    z_half = at("mid", z + block.drop_path1(block.ls1(at("attn.out", out))))
    mlp = at("mlp.out", block.mlp(at("norm2", block.norm2(z_half))))
    return at("out", z_half + block.drop_path2(block.ls2(mlp)))


def _tost_step(block: nn.Module, z: Tensor, at: Edit) -> Tensor:
    """A ToST block (``z + gamma_attn * TSSA(LN1(z))``, ``z_half + gamma_mlp * MLP(LN2(z_half))``)."""
    z = at("in", z)
    x = at("norm1", block.norm1(z))
    out, w, pi, _ = block.tssa.trace(x)
    for point, value in (("tssa.proj", w), ("tssa.membership", pi)):
        if at(point, value) is not value:
            raise UserError(f"{point} of a ToST block is read-only (the TSSA operator has no seam there)")
    z_half = at("mid", z + block.drop_path(block.gamma_attn * at("tssa.out", out)))
    mlp = at("mlp.out", block.mlp(at("norm2", block.norm2(z_half))))
    return at("out", z_half + block.drop_path(block.gamma_mlp * mlp))


def _step_for(block: nn.Module) -> Callable[[nn.Module, Tensor, Edit], Tensor]:
    if _is_timm_block(block):
        return _timm_step
    if _is_decoder_block(block):
        return _decoder_step
    if _is_class_attention_block(block):
        return _class_attention_step
    if hasattr(block, "tssa"):
        return _tost_step
    if hasattr(block, "norm1") and (hasattr(block, "mssa") or hasattr(block, "attn")):
        return _white_box_step
    raise UserError(
        f"cannot hook a {type(block).__name__}: expected a cratevit white-box block, a CRATE-MAE decoder block, a "
        "ToST block or class-attention block, or a timm ViT Block"
    )


# ------------------------------------------------------------------------------------------- names
def _stacks(model: nn.Module) -> dict[str, nn.Module]:
    """Stack name -> its blocks (:data:`STACKS` the model has, non-empty, in the order of the forward pass)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise UserError(f"{type(model).__name__} has no blocks to hook (expected model.blocks, a list of layers)")
    found = {name: getattr(model, name, None) for name in STACKS}
    return {k: v for k, v in found.items() if isinstance(v, (nn.ModuleList, nn.Sequential)) and len(v) > 0}


def hook_names(model: nn.Module) -> list[str]:
    """Every hook name of ``model``, block by block in the order of the forward pass (``blocks``, then ToST's
    ``class_blocks`` or CRATE-MAE's ``decoder_blocks``)."""
    return [
        f"{stack}.{i}.{p}"
        for stack, blocks in _stacks(model).items()
        for i, block in enumerate(blocks)
        for p in block_points(block)
    ]


def _parse(model: nn.Module, names: Sequence[str]) -> dict[tuple[str, int], set[str]]:
    """(stack, block index) -> the points named there; a one-line error for a name the model does not have."""
    stacks = _stacks(model)
    by_block: dict[tuple[str, int], set[str]] = {}
    for name in names:
        parts = name.split(".", 2)
        blocks = stacks.get(parts[0]) if len(parts) == 3 else None
        ok = blocks is not None and parts[1].isdigit() and int(parts[1]) < len(blocks)
        if not ok or parts[2] not in block_points(blocks[int(parts[1])]):
            forms = "; ".join(
                f"{stack}.L.POINT with L in 0..{len(stack_blocks) - 1} (block index, 0-based) and POINT one of "
                f"{', '.join(block_points(stack_blocks[0]))}"
                for stack, stack_blocks in stacks.items()
            )
            raise UserError(f"unknown hook name {name!r}; names are {forms}")
        by_block.setdefault((parts[0], int(parts[1])), set()).add(parts[2])
    return by_block


# ------------------------------------------------------------------------------------------- the context
@contextmanager
def hooks(model: nn.Module, fwd_hooks: Mapping[str, HookFn]) -> Iterator[nn.Module]:
    """Within the ``with`` block, every forward of ``model`` passes the named activations through their hooks::

        with hooks(model, {"blocks.3.ista.code": lambda a, name: a.clamp(max=1.0)}):
            logits = model(images)

    A hook returns None (the activation is only read) or the tensor that replaces it. The block hooks are removed
    on exit, also after an error."""
    by_block = _parse(model, list(fwd_hooks))
    stacks = _stacks(model)
    handles = []

    def make(stack: str, i: int) -> Callable[..., Tensor]:
        block = stacks[stack][i]
        step, points = _step_for(block), by_block[stack, i]

        def at(point: str, value: Tensor) -> Tensor:
            if point not in points:
                return value
            name = f"{stack}.{i}.{point}"
            new = fwd_hooks[name](value, name)
            if new is None:
                return value
            if not isinstance(new, Tensor) or new.shape != value.shape:
                got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
                raise UserError(
                    f"the hook on {name} returned {got}; return None or a tensor of shape {tuple(value.shape)}"
                )
            return new

        def hook(_module: nn.Module, args: tuple[Any, ...], _output: Tensor) -> Tensor:
            return step(block, args[0], at)

        hook.cratevit_hook = True  # type: ignore[attr-defined]
        return hook

    nested = [
        f"{stack}.{i}"
        for stack, i in by_block
        if any(getattr(h, "cratevit_hook", False) for h in stacks[stack][i]._forward_hooks.values())
    ]
    if nested:
        raise UserError(
            f"block {nested[0]} (0-based) is already hooked by an enclosing hooks() context; contexts do not nest: "
            "pass every hook to one context (run_with_cache(..., fwd_hooks=...) reads and replaces in one pass)"
        )
    try:
        for stack, i in by_block:
            handles.append(stacks[stack][i].register_forward_hook(make(stack, i)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def run_with_cache(
    model: nn.Module,
    x: Tensor,
    names: Sequence[str] | Callable[[str], bool] | None = None,
    detach: bool = True,
    fwd_hooks: Mapping[str, HookFn] | None = None,
    **forward_kwargs: Any,
) -> tuple[Any, dict[str, Tensor]]:
    """Run ``model(x, **forward_kwargs)`` and return ``(output, cache)``: hook name -> activation, for ``names`` (a
    list, a predicate on the name, or None: every point of every block), in the order of the forward pass.
    ``fwd_hooks`` (name -> hook) run in the same pass; where a name is also cached, the cache holds what its hook
    returned."""
    every = hook_names(model)
    if names is None:
        chosen = every
    elif callable(names):
        chosen = [n for n in every if names(n)]
    else:
        chosen = list(names)
    cache: dict[str, Tensor] = {}
    extra = dict(fwd_hooks or {})

    def keep(value: Tensor, name: str) -> Tensor | None:
        new = extra[name](value, name) if name in extra else None
        kept = value if new is None else new
        cache[name] = kept.detach() if detach else kept
        return new

    with hooks(model, {**extra, **dict.fromkeys(chosen, keep)}):
        out = model(x, **forward_kwargs)
    return out, cache


# ------------------------------------------------------------------------------------------- patching
def model_output(out: Any) -> Tensor:
    """The tensor a forward's effect is measured on: the logits, or an autoencoder's reconstruction (``.pred``)."""
    if isinstance(out, Tensor):
        return out
    pred = getattr(out, "pred", None)
    if isinstance(pred, Tensor):
        return pred
    raise UserError(f"cannot measure the effect on a {type(out).__name__}: expected logits or an output with .pred")


@dataclass
class PatchingResult:
    """:func:`activation_patching`'s outputs: clean, corrupted, and one patched output per hook name, with the
    fraction of the clean-corrupted distance each patch restores (1: the clean output, 0: the corrupted one)."""

    clean: Tensor
    corrupted: Tensor
    patched: dict[str, Tensor] = field(default_factory=dict)
    restored: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def activation_patching(
    model: nn.Module,
    clean: Tensor,
    corrupted: Tensor,
    names: Sequence[str],
    positions: Sequence[int] | None = None,
    **forward_kwargs: Any,
) -> PatchingResult:
    """Activation patching: run ``corrupted`` with one named activation at a time replaced by its value on
    ``clean`` (on every token, or only at the token ``positions``), and measure how much of the clean output
    (logits, or an autoencoder's reconstruction) comes back: ``restored = 1 - ||patched - clean|| /
    ||corrupted - clean||`` (the norm over the whole output batch)."""
    if clean.shape != corrupted.shape:
        raise UserError(f"clean and corrupted inputs differ in shape: {tuple(clean.shape)} vs {tuple(corrupted.shape)}")
    out, cache = run_with_cache(model, clean, list(names), **forward_kwargs)
    clean_out = model_output(out)
    corrupted_out = model_output(model(corrupted, **forward_kwargs))
    result = PatchingResult(clean_out, corrupted_out)
    gap = float((corrupted_out - clean_out).norm())
    for name in names:

        def put(value: Tensor, name: str, source: Tensor = cache[name]) -> Tensor:
            if positions is None:
                return source
            if any(not -value.shape[-2] <= p < value.shape[-2] for p in positions):
                raise UserError(
                    f"positions {list(positions)} do not all lie among the {value.shape[-2]} token(s) of {name}; "
                    f"use 0..{value.shape[-2] - 1}"
                )
            value = value.clone()
            value[..., list(positions), :] = source[..., list(positions), :]
            return value

        with hooks(model, {name: put}):
            patched = model_output(model(corrupted, **forward_kwargs))
        result.patched[name] = patched
        result.restored[name] = 1.0 - float((patched - clean_out).norm()) / gap if gap > 0 else float("nan")
    return result
