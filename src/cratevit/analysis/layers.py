"""One reader of "a model's layer": what layers of any model computed on a batch, as :class:`LayerRecord`\\ s.

:func:`read_layers` is the one place that knows how to look inside a model; segmentation
(:func:`~cratevit.analysis.segmentation.attention_maps`, ``patch_features``), the facet PCA
(:func:`~cratevit.analysis.facets.facet_features`) and the inspection behind ``cratevit explore``
(:func:`~cratevit.analysis.inspection.inspect_model`) all read layers through it, so they agree by construction.

* A model of a registered family (:mod:`cratevit.registry`) is read through its family's trace method: every
  selected layer's :class:`~cratevit.models.blocks.LayerTrace` (``z_in``, ``proj``, ``attn``, ``z_half``,
  ``z_out`` and, where the code is internal to the block, ``code``). An autoencoder is read through its encoder, or
  with ``decoder=True`` through its decoder.
* A timm vision transformer (``blocks[i].attn`` with ``qkv``, ``attn_drop``, ``proj``) is read with forward hooks
  in one pass; its fused attention kernel is switched off for the call, so the softmax matrix exists.

Facets of a layer, with ``Z^l`` the tokens entering it (a timm ViT's counterpart in brackets):

* ``token``: the layer's output ``Z^{l+1}`` (the block's output);
* ``key``: the per-head subspace coordinates ``U_k^T LN(Z^l)``, heads side by side (the keys ``k`` the attention
  compares, after timm's ``k_norm``);
* ``attn``: the tokens after the attention step, ``Z^{l+1/2} = Z^l + MSSA(LN(Z^l))`` (``x + ls1(attn(norm1(x)))``);
* ``code``: the sparse code of the ISTA step (the layer's output in CRATE, ``LayerTrace.code`` where the family
  keeps it inside the block; absent where the family has no code (:func:`cratevit.registry.code_kind`) and in ViTs).

Layers are 0-based block indices (negative ones count from the end).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..registry import code_kind, family_for, is_autoencoder, is_family_model, layer_count, trace_method

__all__ = ["LayerRecord", "LayersRead", "is_timm_vit", "layer_record", "read_layer", "read_layers"]


@dataclass
class LayerRecord:
    """What one layer computed for a batch of ``b`` images with ``n`` tokens (prefix tokens first)."""

    attn: Tensor | None  # softmax attention per head, (b, heads, n, n)
    facets: dict[str, Tensor]  # facet name -> per-token features (b, n, c)
    heads_key: Tensor | None = None  # per-head subspace coordinates (b, heads, n, p), for R^c (white-box only)
    z_in: Tensor | None = None  # tokens entering the layer (b, n, dim), for interventions inside the layer
    z_half: Tensor | None = None  # tokens after the attention step (b, n, dim), white-box only

    def patches(self, facet: str, grid: tuple[int, int], prefix: int = 1) -> Tensor:
        """The patch tokens of ``facet`` as a map (b, rows, cols, c)."""
        z = self.facets[facet][:, prefix:]
        return z.reshape(z.shape[0], *grid, z.shape[-1])


@dataclass
class LayersRead:
    """The selected layers of one forward pass (:func:`read_layers`)."""

    family: str  # the registry's family name, or "timm-vit"
    layers: list[LayerRecord]  # in layer order
    grid: tuple[int, int]  # patch grid (rows, cols) of this input
    prefix: int  # tokens before the patch tokens (1: the class token)
    features: Tensor | None = None  # a white-box model's final tokens (its trace's ``features``), else None
    logits: Tensor | None = None  # a timm ViT's output (it runs whole), else None


def layer_record(t: Any, kind: str | None = "output") -> LayerRecord:
    """The record of one white-box layer trace; ``kind`` is where the family keeps the code
    (:func:`cratevit.registry.code_kind`: ``"output"``, ``"trace"``, or None: no code facet)."""
    b, h, n, p = t.proj.shape
    facets = {"token": t.z_out, "key": t.proj.transpose(1, 2).reshape(b, n, h * p), "attn": t.z_half}
    code = getattr(t, "code", None)
    if kind is not None:
        facets["code"] = t.z_out if code is None else code
    return LayerRecord(attn=t.attn, facets=facets, heads_key=t.proj, z_in=t.z_in, z_half=t.z_half)


def is_timm_vit(model: nn.Module) -> bool:
    """A timm ``VisionTransformer``-like model: ``blocks[i].attn`` with ``qkv``, ``attn_drop`` and ``proj``."""
    blocks = getattr(model, "blocks", None)
    return (
        blocks is not None
        and len(blocks) > 0
        and all(hasattr(getattr(blocks[0], "attn", None), a) for a in ("qkv", "attn_drop", "proj"))
        and hasattr(model, "patch_embed")
    )


def _white_box(model: nn.Module, x: Tensor, layers: list[int] | None, decoder: bool) -> LayersRead:
    if decoder:
        if not is_autoencoder(model):
            raise UserError(f"--decoder needs a CRATE-MAE; this is a {type(model).__name__}")
        trace = model.forward_trace(x, encoder_layers=[], decoder_layers=layers)
        traces = trace.decoder
    else:
        trace = trace_method(model)(x, layers=layers)
        traces = trace.layers  # an autoencoder's trace names its encoder's layers so too
    kind = code_kind(model)
    return LayersRead(
        family_for(model).name,
        [layer_record(t, kind) for t in traces],
        tuple(trace.grid_size),
        1,
        features=getattr(trace, "features", None),
    )


def _timm(model: nn.Module, x: Tensor, layers: list[int] | None) -> LayersRead:
    depth = len(model.blocks)
    keep = sorted(range(depth) if layers is None else {i % depth for i in layers})
    got: dict[int, dict[str, Tensor]] = {i: {} for i in keep}
    handles, fused = [], []

    def keep_as(i: int, name: str, from_input: bool = False) -> Callable[..., None]:
        def hook(_m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
            got[i][name] = inputs[0] if from_input else out

        return hook

    for i in keep:
        block, a = model.blocks[i], model.blocks[i].attn
        fused.append(getattr(a, "fused_attn", False))
        a.fused_attn = False  # explicit softmax, so the attention matrix exists
        handles.append(a.attn_drop.register_forward_hook(keep_as(i, "attn_matrix", from_input=True)))
        handles.append(block.register_forward_pre_hook(lambda _m, args, i=i: got[i].__setitem__("in", args[0])))
        handles.append(a.register_forward_hook(keep_as(i, "attn_out")))
        handles.append(a.qkv.register_forward_hook(keep_as(i, "qkv")))
        if hasattr(a, "k_norm"):
            handles.append(a.k_norm.register_forward_hook(keep_as(i, "key_heads")))
        handles.append(block.register_forward_hook(keep_as(i, "token")))
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
        for i, f in zip(keep, fused, strict=True):
            model.blocks[i].attn.fused_attn = f
    if any("attn_matrix" not in got[i] for i in keep):
        raise UserError(f"could not read the attention of {type(model).__name__}; expected a timm ViT")
    records = []
    for i in keep:
        g, block = got[i], model.blocks[i]
        ls1 = getattr(block, "ls1", None) or (lambda t: t)
        if "key_heads" in g:  # (b, heads, n, p): the keys after k_norm, heads side by side
            key = g["key_heads"].transpose(1, 2).flatten(2)
        else:
            b, n, _ = g["qkv"].shape
            key = g["qkv"].reshape(b, n, 3, -1)[:, :, 1]
        facets = {"token": g["token"], "key": key, "attn": g["in"] + ls1(g["attn_out"])}
        records.append(LayerRecord(attn=g["attn_matrix"], facets=facets))
    patch = model.patch_embed.patch_size
    grid = (x.shape[-2] // patch[0], x.shape[-1] // patch[1])
    logits = out if getattr(model, "num_classes", 0) > 0 else None
    return LayersRead("timm-vit", records, grid, int(getattr(model, "num_prefix_tokens", 1)), logits=logits)


def read_layers(model: nn.Module, x: Tensor, layers: Sequence[int] | None = None, decoder: bool = False) -> LayersRead:
    """Run ``model`` on images ``x`` (b, c, H, W) once and record the selected ``layers`` (0-based block indices,
    negative from the end; all by default). ``decoder``: a masked autoencoder's decoder layers instead of its
    encoder's. The model's mode is the caller's (analysis runs it in eval mode)."""
    selected = None if layers is None else list(layers)
    if is_family_model(model) and family_for(model).trace is not None:
        return _white_box(model, x, selected, decoder)
    if decoder:
        raise UserError(f"--decoder needs a CRATE-MAE; this is a {type(model).__name__}")
    if is_timm_vit(model):
        return _timm(model, x, selected)
    raise UserError(
        f"cannot look inside a {type(model).__name__}: expected a CRATE-family model (forward_trace) or a timm "
        f"VisionTransformer"
    )


@torch.no_grad()
def read_layer(model: nn.Module, x: Tensor, layer: int = -1, decoder: bool = False) -> tuple[LayerRecord, LayersRead]:
    """One layer's record (and the read it came from, for ``grid`` and ``prefix``)."""
    blocks = getattr(model, "decoder_blocks" if decoder else "blocks", None)
    depth = len(blocks) if isinstance(blocks, nn.ModuleList) else None
    if not decoder and is_family_model(model):
        depth = layer_count(model)  # the trace's layers (ToST: its TSSA blocks, then its class-attention blocks)
    if depth is not None and not -depth <= layer < depth:
        raise UserError(f"layer {layer} is out of range for a {depth}-layer model; use 0..{depth - 1} (0-based)")
    read = read_layers(model, x, [layer], decoder)
    return read.layers[0], read
