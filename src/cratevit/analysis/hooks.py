"""Hook points: read and replace any layer's activation by a stable name, cache a forward pass, patch activations
between two images (in the style of TransformerLens / ViT-Prisma, on cratevit's own module structure).

Names follow the module names of the backbone (``blocks.L`` is block ``L``, 0-based, as in the state dict), with
one point per intermediate of the layer's explicit trace (:meth:`~cratevit.models.blocks.WhiteBoxBlock.trace`).
``ATT`` is the attention child's own name: ``mssa`` (CRATE, CRATE-alpha, the CRATE-MAE encoder, the MSSA
ablations), ``attn`` (MHSA ablations, timm ViTs) or ``tssa`` (ToST). Shapes: b images, n tokens (class token
first, where the model has one in its blocks), h heads::

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
from torch import Tensor, nn

from ..errors import UserError

__all__ = [
    "HOOK_POINTS",
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
    "mlp.out": "the MLP branch's output, before the residual sum",
    "out": "Z^{l+1}, the tokens leaving the block",
}
"""Point -> what it is: the suffix after ``blocks.L.``, ``ATT`` standing for the attention child's name."""


# ------------------------------------------------------------------------------------------- the block kinds
def _attention_name(block: nn.Module) -> str:
    for name in ("mssa", "tssa", "attn"):
        if hasattr(block, name):
            return name
    raise UserError(f"{type(block).__name__} has no attention child (mssa, attn or tssa); cannot hook it")


def _is_timm_block(block: nn.Module) -> bool:
    attn = getattr(block, "attn", None)
    return hasattr(block, "ls1") and all(hasattr(attn, a) for a in ("qkv", "q_norm", "k_norm", "proj"))


def block_points(block: nn.Module) -> list[str]:
    """The hook points of one block, in the order it computes them (suffixes after ``blocks.L.``)."""
    a = _attention_name(block)
    attention = [f"{a}.proj", f"{a}.membership" if a == "tssa" else f"{a}.pattern", f"{a}.out"]
    second: list[str] = []
    if hasattr(block, "ista"):
        second = ["norm2", "ista.code"]
    elif hasattr(block, "mlp"):
        second = ["norm2", "mlp.out"]
    return ["in", "norm1", *attention, "mid", *second, "out"]


Edit = Callable[[str, Tensor], Tensor]  # (point, tensor) -> the tensor the block goes on with


def _white_box_step(block: nn.Module, z: Tensor, at: Edit) -> Tensor:
    """A :class:`~cratevit.models.blocks.WhiteBoxBlock` (CRATE, its ablations, CRATE-alpha, the CRATE-MAE encoder),
    the operations of its ``trace`` in the same order."""
    z = at("in", z)
    x = at("norm1", block.norm1(z))
    if hasattr(block, "mssa"):
        m, a = block.mssa, "mssa"
        w = at(f"{a}.proj", m.project(x))  # b h n p
        heads, attn = m.attend(w)  # explicit softmax attention: (output, matrix) per head
        edited = at(f"{a}.pattern", attn)
        if edited is not attn:
            heads = edited @ w
        out = m.proj_drop(m.out_proj(heads.transpose(1, 2).flatten(2)))
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
    if hasattr(block, "tssa"):
        return _tost_step
    if hasattr(block, "norm1") and (hasattr(block, "mssa") or hasattr(block, "attn")):
        return _white_box_step
    raise UserError(
        f"cannot hook a {type(block).__name__}: expected a cratevit white-box block, a ToST block or a timm ViT Block"
    )


# ------------------------------------------------------------------------------------------- names
def _blocks(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise UserError(f"{type(model).__name__} has no blocks to hook (expected model.blocks, a list of layers)")
    return blocks


def hook_names(model: nn.Module) -> list[str]:
    """Every hook name of ``model``, block by block in the order of the forward pass."""
    return [f"blocks.{i}.{p}" for i, block in enumerate(_blocks(model)) for p in block_points(block)]


def _parse(model: nn.Module, names: Sequence[str]) -> dict[int, set[str]]:
    """Block index -> the points named there; a one-line error for a name the model does not have."""
    blocks = _blocks(model)
    by_block: dict[int, set[str]] = {}
    for name in names:
        parts = name.split(".", 2)
        ok = len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and int(parts[1]) < len(blocks)
        if not ok or parts[2] not in block_points(blocks[int(parts[1])]):
            raise UserError(
                f"unknown hook name {name!r}; names are blocks.L.POINT with L in 0..{len(blocks) - 1} (block index, "
                f"0-based) and POINT one of {', '.join(block_points(blocks[0]))}"
            )
        by_block.setdefault(int(parts[1]), set()).add(parts[2])
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
    blocks = _blocks(model)
    handles = []

    def make(i: int) -> Callable[..., Tensor]:
        block, step = blocks[i], _step_for(blocks[i])
        points = by_block[i]

        def at(point: str, value: Tensor) -> Tensor:
            if point not in points:
                return value
            name = f"blocks.{i}.{point}"
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

    nested = [i for i in by_block if any(getattr(h, "cratevit_hook", False) for h in blocks[i]._forward_hooks.values())]
    if nested:
        raise UserError(
            f"block {nested[0]} (0-based) is already hooked by an enclosing hooks() context; contexts do not nest: "
            "pass every hook to one context (run_with_cache(..., fwd_hooks=...) reads and replaces in one pass)"
        )
    try:
        for i in sorted(by_block):
            handles.append(blocks[i].register_forward_hook(make(i)))
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

        def put(value: Tensor, _name: str, source: Tensor = cache[name]) -> Tensor:
            if positions is None:
                return source
            value = value.clone()
            value[..., list(positions), :] = source[..., list(positions), :]
            return value

        with hooks(model, {name: put}):
            patched = model_output(model(corrupted, **forward_kwargs))
        result.patched[name] = patched
        result.restored[name] = 1.0 - float((patched - clean_out).norm()) / gap if gap > 0 else float("nan")
    return result
