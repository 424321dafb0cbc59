"""Looking inside one forward pass: attention per layer and head, rollout, masks, facets, per-layer curves and the
dictionary atoms of the sparse codes, with interventions. The functions behind ``cratevit explore``.

One call, :func:`inspect_model`, runs a model once and returns an :class:`Inspection` (every layer's attention and
features by facet); everything else is a function of that record or of tensors. Layers are read by
:func:`cratevit.analysis.layers.read_layers` (the one reader segmentation and the facet PCA use too); what a model
offers beyond that (a sparse code, interventions, other input sizes) is its *view* (:func:`family_of`), decided by
the registry's family record (:mod:`cratevit.registry`: trace method, ``code_kind``, ``code_editor``) or, for timm
ViTs, by their modules:

* white-box families (CRATE, and any model with ``forward_trace`` / ``blocks[i].trace`` / ``embed`` /
  ``forward_head``): facets ``token`` (the layer's output ``Z^{l+1}``), ``key`` (the per-head subspace coordinates
  ``U_k^T LN(Z^l)``, concatenated), ``attn`` (the tokens after the attention step, ``Z^{l+1/2}``) and ``code``
  (the ISTA sparse code). In CRATE the ISTA step has no outer residual, so its code *is* the layer's
  output and ``token`` and ``code`` are the same tensor. A family whose code is internal (CRATE-alpha's ``A_2``)
  records it as ``code`` in its layer trace, and either accepts ``block.trace(z, code_edit=fn)``, gives its family
  record a ``code_editor``, or registers ``register_code_editor(BlockClass, fn)`` (edited code -> the layer's
  output): the hook through which :func:`intervene` edits the code inside the block;
* timm vision transformers: facets ``token`` (block output), ``key`` (each head's keys) and ``attn`` (the tokens
  after the attention step's residual); no code, so no atoms or interventions, and no ``R^c`` (no subspaces).

Definitions: attention maps are the class token's row over the patch tokens; rollout (Abnar & Zuidema, 2020)
multiplies the layers' head-averaged attention mixed with the identity (``0.5 A + 0.5 I``, rows renormalised);
masks follow the segmentation protocols: ``mass`` keeps the patches carrying the top ``threshold`` of the map's
mass (DINO), ``entries`` keeps the top ``threshold`` fraction of the entries (the emergence paper), ``pca`` keeps
the patches on the foreground side of the facet's first principal component. ``R^c`` and sparsity are
:mod:`cratevit.analysis`'s (``R^c`` of the ``key`` facet per head, non-zero fraction of the ``code``).
"""

from __future__ import annotations

import inspect as _pyinspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..errors import UserError
from ..registry import (
    code_kind,
    family_for,
    is_autoencoder,
    is_family_model,
    layer_count,
    trace_blocks,
)
from .facets import paper_pca
from .layers import LayerRecord, is_timm_vit, layer_record, read_layers
from .layerwise import compression, sparsity
from .segprotocols import keep_top
from .visualize import first_component_foreground

__all__ = [
    "FACETS",
    "MASK_PROTOCOLS",
    "AtomIndex",
    "Inspection",
    "Intervention",
    "LayerRecord",
    "active_atoms",
    "atom_stats",
    "attention_map",
    "attention_rollout",
    "class_names_for",
    "facet_features",
    "family_label",
    "family_of",
    "image_curves",
    "index_atoms",
    "inspect_model",
    "intervene",
    "patch_crop",
    "pca_rgb",
    "register_code_editor",
    "rollout_map",
    "segmentation_mask",
    "top_classes",
    "top_patches",
]

FACETS = ("token", "key", "attn", "code")
"""The facets a white-box family's layers offer (:data:`cratevit.analysis.facets.FACETS`)."""
MASK_PROTOCOLS = ("mass", "entries", "pca", "paper-pca")
"""The foreground-mask protocols of :func:`segmentation_mask`: attention ``mass`` or ``entries`` kept, or a PCA
(``pca``, ``paper-pca``)."""


# --------------------------------------------------------------------------------------------- the record
@dataclass
class Inspection:
    """One forward pass, every layer recorded (:func:`inspect_model`)."""

    family: str
    layers: list[LayerRecord]
    logits: Tensor | None  # (b, classes), None for a model without a classifier
    grid: tuple[int, int]  # patch grid (rows, cols)
    prefix: int  # number of tokens before the patch tokens (1: the class token)

    @property
    def depth(self) -> int:
        return len(self.layers)

    def layer(self, index: int) -> LayerRecord:
        if not -self.depth <= index < self.depth:
            raise UserError(f"layer {index} is out of range for a {self.depth}-layer model; use 0..{self.depth - 1}")
        return self.layers[index % self.depth]


@dataclass
class Intervention:
    """The layers after an edited code coordinate, and the logits, next to the unedited pass."""

    layer: int  # the edited layer
    coord: int
    value: float
    before: Inspection
    after_layers: list[LayerRecord]  # layers layer+1 .. depth-1 recomputed from the edited tokens
    logits: Tensor | None  # edited logits (b, classes)

    def attention_after(self, layer: int) -> Tensor:
        """Edited attention of a later layer, (b, heads, n, n)."""
        k = layer % self.before.depth - self.layer - 1
        if k < 0:
            raise UserError(f"layer {layer} runs before the edited layer {self.layer}; its attention is unchanged")
        return self.after_layers[k].attn

    def attention_map_after(self, layer: int) -> Tensor:
        """Edited class-token attention maps of a later layer, (b, heads, rows, cols)."""
        return _patch_rows(self.attention_after(layer), self.before)


# --------------------------------------------------------------------------------------------- views
class WhiteBoxFamily:
    """The view of every registered family with a trace method (:mod:`cratevit.registry`: CRATE, CRATE-alpha,
    CRATE-MAE, ...), whose model has ``blocks[i].trace`` and, for classifiers, ``forward_head``; an autoencoder is
    read through its encoder. Its layers are read by :func:`~cratevit.analysis.layers.read_layers`."""

    name = "white-box"
    facets = FACETS
    has_code = True
    has_subspaces = True

    def matches(self, model: nn.Module) -> bool:
        return is_family_model(model) and family_for(model).trace is not None

    def geometry(self, model: nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
        return tuple(model.config.image_size), tuple(model.config.patch_size)

    def heads(self, model: nn.Module) -> int:
        return int(model.config.heads)

    def resizable(self, model: nn.Module) -> bool:
        # learned positions interpolate (every classifier of the backbone), ToST's Fourier encoding fits any grid;
        # an autoencoder's sine-cosine table and masks are fixed to its image size
        fits_any = hasattr(model, "interpolate_pos_embed") or not family_for(model).pretrained_cfg(model.config).get(
            "fixed_input_size", True
        )
        return fits_any and not is_autoencoder(model)

    def depth(self, model: nn.Module) -> int:
        return layer_count(model)  # the trace's blocks (ToST: its TSSA blocks, then its class-attention blocks)

    @staticmethod
    def _logits(model: nn.Module, z: Tensor) -> Tensor | None:
        if not hasattr(model, "forward_head") or getattr(model, "num_classes", 1) <= 0:
            return None
        return model.forward_head(z)

    def inspect(self, model: nn.Module, x: Tensor) -> Inspection:
        read = read_layers(model, x)
        features = read.features if read.features is not None else read.layers[-1].facets["token"]
        return Inspection(read.family, read.layers, self._logits(model, features), read.grid, read.prefix)

    def intervene(
        self, model: nn.Module, before: Inspection, layer: int, edit: Callable[[Tensor], Tensor]
    ) -> tuple[list[LayerRecord], Tensor | None]:
        blocks = trace_blocks(model)
        record = before.layer(layer)
        block = blocks[layer]
        if "code" not in record.facets:
            raise UserError(
                f"this {getattr(model.config, 'variant', family_for(model).name)} model has no sparse code (no ISTA "
                "step); atoms and interventions need a layer with one"
            )
        editor = next((fn for cls, fn in _CODE_EDITORS.items() if isinstance(block, cls)), None)
        family_editor = family_for(model).code_editor
        if editor is not None:  # a registered function: edited code -> the layer's output
            z = editor(block, record, edit(record.facets["code"].clone()))
        elif family_editor is not None:  # the family record's editor (CRATE-alpha: decode onto the residual)
            z = family_editor(block, record.z_half, edit(record.facets["code"].clone()))
        elif record.facets["code"] is record.facets["token"]:  # the code is the layer's output: edit it directly
            z = edit(record.facets["code"].clone())
        elif "code_edit" in _pyinspect.signature(block.trace).parameters:  # the block's own hook
            z, _ = block.trace(record.z_in, code_edit=edit)
        else:
            raise UserError(
                f"{type(block).__name__} keeps its sparse code inside the block and offers no way to edit it: give "
                f"its trace a code_edit hook, or register a function with register_code_editor"
            )
        after = []
        for blk in blocks[layer + 1 :]:
            z, t = blk.trace(z)
            after.append(layer_record(t, code_kind(model)))
        return after, self._logits(model, z)


class TimmViTFamily:
    """The view of timm ``VisionTransformer``-like models (``blocks[i].attn`` with ``qkv``, ``attn_drop``,
    ``proj``): attention and the ``token``, ``key`` and ``attn`` facets, read with forward hooks in one pass
    (:func:`~cratevit.analysis.layers.read_layers`)."""

    name = "timm-vit"
    facets = ("token", "key", "attn")
    has_code = False
    has_subspaces = False

    def matches(self, model: nn.Module) -> bool:
        return is_timm_vit(model)

    def geometry(self, model: nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
        return tuple(model.patch_embed.img_size), tuple(model.patch_embed.patch_size)

    def heads(self, model: nn.Module) -> int:
        return int(model.blocks[0].attn.num_heads)

    def resizable(self, model: nn.Module) -> bool:
        return False  # timm builds its patch embedding for one size unless created with dynamic_img_size

    def depth(self, model: nn.Module) -> int:
        return len(model.blocks)

    def inspect(self, model: nn.Module, x: Tensor) -> Inspection:
        read = read_layers(model, x)
        return Inspection(self.name, read.layers, read.logits, read.grid, read.prefix)

    def intervene(
        self, model: nn.Module, before: Inspection, layer: int, edit: Callable[[Tensor], Tensor]
    ) -> tuple[list[LayerRecord], Tensor | None]:
        raise UserError("a timm ViT has no sparse code; atoms and interventions need a white-box model")


class WhiteBoxFamilyWithoutCode(WhiteBoxFamily):
    """A white-box backbone whose layers have no ISTA step (CRATE-MLP, ViT, attention-only ablations): attention,
    the ``token``, ``key`` and ``attn`` facets and ``R^c``; no code, so no atoms or interventions."""

    facets = ("token", "key", "attn")
    has_code = False


ModelView = WhiteBoxFamily | TimmViTFamily  # what family_of returns
_VIEWS: tuple[ModelView, ...] = (WhiteBoxFamily(), TimmViTFamily())
_WHITE_BOX_WITHOUT_CODE = WhiteBoxFamilyWithoutCode()
_CODE_EDITORS: dict[type, Callable[[nn.Module, LayerRecord, Tensor], Tensor]] = {}


def register_code_editor(block_cls: type, editor: Callable[[nn.Module, LayerRecord, Tensor], Tensor]) -> None:
    """How blocks of ``block_cls`` turn an edited sparse code back into the layer's output:
    ``editor(block, record, code) -> Z^{l+1}`` (for families whose code is internal to the block)."""
    _CODE_EDITORS[block_cls] = editor


def family_of(model: nn.Module) -> ModelView:
    """The view of ``model``: the white-box one for a registered family with a trace method (without code facets
    when its record's ``code_kind`` says it has no code), the timm one for a timm ViT; a one-line error otherwise."""
    for family in _VIEWS:
        if family.matches(model):
            if isinstance(family, WhiteBoxFamily) and code_kind(model) is None:
                return _WHITE_BOX_WITHOUT_CODE  # an ablation without ISTA: no atoms, no interventions
            return family
    raise UserError(
        f"cannot look inside a {type(model).__name__}: expected a CRATE-family model (forward_trace) or a timm "
        f"VisionTransformer"
    )


def family_label(model: nn.Module) -> str:
    """The model's family as a user knows it: the registry's name (``crate``, ``crate_alpha``), else the adapter's."""
    return family_for(model).name if is_family_model(model) else family_of(model).name


@torch.no_grad()
def inspect_model(model: nn.Module, x: Tensor) -> Inspection:
    """Run ``model`` on images ``x`` (b, c, H, W) once, recording every layer (eval mode for the call)."""
    was_training = model.training
    model.eval()
    try:
        return family_of(model).inspect(model, x)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------- attention
def _patch_rows(att: Tensor, ins: Inspection) -> Tensor:
    """Class token's row over the patches: (b, ..., n, n) -> (b, ..., rows, cols)."""
    if ins.prefix < 1:
        raise UserError("the model has no class token, so there is no class-token attention to show")
    n_patches = ins.grid[0] * ins.grid[1]
    row = att[..., 0, ins.prefix :]
    if row.shape[-1] != n_patches:
        raise UserError(f"attention over {row.shape[-1]} patch tokens does not match the {ins.grid} grid")
    return row.reshape(*row.shape[:-1], *ins.grid)


def attention_map(ins: Inspection, layer: int, head: int | None = None) -> Tensor:
    """Class-token attention to the patches at ``layer``: (b, heads, rows, cols), or (b, rows, cols) for one
    ``head``."""
    attn = ins.layer(layer).attn
    if attn is None:
        raise UserError(f"layer {layer} recorded no attention")
    if head is not None and not -attn.shape[1] <= head < attn.shape[1]:
        raise UserError(f"head {head} is out of range for {attn.shape[1]} heads; use 0..{attn.shape[1] - 1}")
    maps = _patch_rows(attn, ins)
    return maps if head is None else maps[:, head]


def attention_rollout(attentions: Sequence[Tensor], residual: float = 0.5) -> Tensor:
    """Attention rollout: the product over layers of ``residual * I + (1 - residual) * mean_heads(A)`` with rows
    renormalised, first layer rightmost; ``attentions`` holds (b, heads, n, n) tensors -> (b, n, n)."""
    if not attentions:
        raise UserError("attention rollout needs at least one layer")
    if not 0.0 <= residual < 1.0:
        raise UserError(f"residual weight must be in [0, 1), got {residual}")
    result = None
    for a in attentions:
        a = a.double().mean(1)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = residual * eye + (1 - residual) * a
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    return result.float()


def rollout_map(ins: Inspection, upto: int = -1, residual: float = 0.5) -> Tensor:
    """Rollout through layers ``0..upto`` as the class token's row: (b, rows, cols)."""
    last = upto % ins.depth
    return _patch_rows(attention_rollout([r.attn for r in ins.layers[: last + 1]], residual), ins)


# --------------------------------------------------------------------------------------------- facets and masks
def facet_features(ins: Inspection, layer: int, facet: str) -> Tensor:
    """Patch-token features of a facet at ``layer``: (b, rows, cols, c)."""
    facets = ins.layer(layer).facets
    if facet not in facets:
        raise UserError(f"facet {facet!r} does not exist for this model; choose one of {', '.join(facets)}")
    f = facets[facet][:, ins.prefix :]
    return f.reshape(f.shape[0], *ins.grid, f.shape[-1])


def pca_rgb(features: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of one image's patch features (rows, cols, c): the first three components as RGB in [0, 1]
    (rows, cols, 3), the first component's scores (rows, cols) and the explained variance ratios."""
    f = features.reshape(-1, features.shape[-1]).double()
    f = f - f.mean(0)
    _, s, vh = torch.linalg.svd(f, full_matrices=False)
    k = min(3, vh.shape[0])
    scores = (f @ vh[:k].T).numpy()
    scores = np.concatenate([scores, np.zeros((len(scores), 3 - k))], axis=1)
    lo, hi = scores.min(0), scores.max(0)
    rgb = (scores - lo) / np.where(hi > lo, hi - lo, 1.0)
    var = (s**2).numpy()
    ratio = var / var.sum() if var.sum() > 0 else np.zeros_like(var)
    rows, cols = features.shape[:2]
    return rgb.reshape(rows, cols, 3), scores[:, 0].reshape(rows, cols), ratio[:k]


def segmentation_mask(
    ins: Inspection,
    layer: int,
    protocol: str = "mass",
    threshold: float = 0.6,
    head: int | None = None,
    facet: str = "key",
) -> Tensor:
    """Foreground mask of each image at the patch grid, (b, rows, cols) bool, under a protocol of
    :data:`MASK_PROTOCOLS` (``head=None``: the head-averaged map). ``threshold`` is the kept fraction of the
    attention (``mass``, ``entries``; :func:`~cratevit.analysis.segprotocols.keep_top`) or, for ``paper-pca``, the
    cut on the min-max scaled first component (:func:`~cratevit.analysis.facets.paper_pca`, 0.4 in the paper)."""
    if protocol not in MASK_PROTOCOLS:
        raise UserError(f"unknown mask protocol {protocol!r}; choose one of {', '.join(MASK_PROTOCOLS)}")
    if protocol == "pca":
        feats = facet_features(ins, layer, facet)
        return torch.stack([torch.from_numpy(first_component_foreground(pca_rgb(f)[1])) for f in feats])
    if protocol == "paper-pca":
        if not 0.0 < threshold < 1.0:
            raise UserError(f"the paper's PCA cut must lie in (0, 1), got {threshold}")
        feats = facet_features(ins, layer, facet)
        return torch.stack([torch.from_numpy(paper_pca([f], threshold=threshold).foreground[0]) for f in feats])
    maps = attention_map(ins, layer)
    maps = maps.mean(1) if head is None else maps[:, head]
    return keep_top(maps, threshold, kind=protocol)


# --------------------------------------------------------------------------------------------- curves, classes
def image_curves(ins: Inspection) -> dict[str, Tensor]:
    """Per-layer ``R^c`` of the key facet and non-zero fraction of the code, per image: name -> (b, layers).
    Only what the family defines is returned (a timm ViT: nothing)."""
    out: dict[str, Tensor] = {}
    if all(r.heads_key is not None for r in ins.layers):
        out["rc"] = torch.stack([compression(r.heads_key) for r in ins.layers], dim=1)
    if all("code" in r.facets for r in ins.layers):
        out["sparsity"] = torch.stack([sparsity(r.facets["code"]) for r in ins.layers], dim=1)
    return out


def class_names_for(num_classes: int, data: str | None = None) -> list[str]:
    """Readable class names: the built-in digits and shapes, ImageNet-1k/-21k/-22k when the class count matches
    timm's table exactly, else ``class j``."""
    if data == "digits" and num_classes == 10:
        return [str(i) for i in range(10)]
    if data == "shapes":
        from ..data.shapes import CLASSES

        if num_classes == len(CLASSES):
            return list(CLASSES)
    subsets = {1000: "imagenet-1k", 21843: "imagenet-21k", 21841: "imagenet-22k"}  # exact class counts only
    if num_classes in subsets:
        from timm.data import ImageNetInfo

        info = ImageNetInfo(subsets[num_classes])
        return [info.index_to_description(i).split(",")[0] for i in range(num_classes)]
    return [f"class {i}" for i in range(num_classes)]


def top_classes(logits: Tensor, k: int = 5, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The ``k`` most probable classes of one image's logits (classes,): index, name, probability, logit."""
    probs = logits.float().softmax(-1)
    values, idx = probs.topk(min(k, probs.shape[-1]))
    return [
        {"index": int(i), "name": names[int(i)] if names else f"class {int(i)}", "prob": float(p),
         "logit": float(logits[int(i)])}
        for p, i in zip(values, idx, strict=True)
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------- atoms
@dataclass
class AtomIndex:
    """The sparse codes of one layer over an image set: what :func:`top_patches` and :func:`atom_stats` read."""

    layer: int
    codes: Tensor  # patch tokens' codes (images, rows, cols, code_dim), float32
    cls_codes: Tensor | None  # the class token's codes (images, code_dim), None without a class token
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def code_dim(self) -> int:
        return int(self.codes.shape[-1])

    def check(self, coord: int) -> int:
        if not 0 <= coord < self.code_dim:
            raise UserError(f"code coordinate {coord} is out of range; layer {self.layer} has 0..{self.code_dim - 1}")
        return coord


@torch.no_grad()
def index_atoms(
    model: nn.Module,
    images: Tensor,
    layers: Sequence[int],
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[int, AtomIndex], dict[str, Tensor]]:
    """Codes of ``layers`` over ``images`` (N, c, H, W) and the per-layer curves of every image (name ->
    (N, layers), as :func:`image_curves`). ``progress(done, total)`` is called after each batch."""
    family = family_of(model)
    if not family.has_code:
        raise UserError(f"a {family.name} model has no sparse code to index")
    depth = family.depth(model)
    keep = sorted({layer % depth for layer in layers})
    codes: dict[int, list[Tensor]] = {i: [] for i in keep}
    cls: dict[int, list[Tensor]] = {i: [] for i in keep}
    curves: dict[str, list[Tensor]] = {}
    done, total, ins = 0, len(images), None
    for batch in images.split(batch_size):
        ins = inspect_model(model, batch)
        for i in keep:
            codes[i].append(facet_features(ins, i, "code").float())
            if ins.prefix:
                cls[i].append(ins.layers[i].facets["code"][:, 0].float())
        for name, value in image_curves(ins).items():
            curves.setdefault(name, []).append(value)
        done += len(batch)
        if progress is not None:
            progress(done, total)
    if ins is None:
        raise UserError("no images to index")
    index = {
        i: AtomIndex(i, torch.cat(codes[i]), torch.cat(cls[i]) if cls[i] else None, {"images": total}) for i in keep
    }
    return index, {name: torch.cat(v) for name, v in curves.items()}


def top_patches(index: AtomIndex, coord: int, k: int = 12) -> list[dict[str, Any]]:
    """The ``k`` patches of the image set whose code is largest at ``coord``: image, row, col, value (only
    patches where the atom is active)."""
    values = index.codes[..., index.check(coord)]  # N rows cols
    flat = values.flatten()
    top_v, top_i = flat.topk(min(k, flat.numel()))
    rows, cols = values.shape[1:]
    out = []
    for v, i in zip(top_v.tolist(), top_i.tolist(), strict=True):
        if v <= 0:
            break
        out.append({"image": i // (rows * cols), "row": (i // cols) % rows, "col": i % cols, "value": v})
    return out


def atom_stats(index: AtomIndex, coord: int) -> dict[str, float]:
    """Usage of code coordinate ``coord`` over the image set: how often it is non-zero (patch tokens, class
    token, images where it fires at all), its mean, mean when active, maximum, and its usage rank among the
    coordinates (0 = most used)."""
    c = index.codes[..., index.check(coord)]
    active = c > 0
    usage = (index.codes > 0).flatten(0, 2).float().mean(0)  # per coordinate
    stats = {
        "patch_frequency": float(active.float().mean()),
        "image_frequency": float(active.flatten(1).any(1).float().mean()),
        "mean": float(c.mean()),
        "mean_when_active": float(c[active].mean()) if bool(active.any()) else 0.0,
        "max": float(c.max()),
        "usage_rank": int((usage > usage[coord]).sum()),
        "code_dim": index.code_dim,
        "images": int(c.shape[0]),
    }
    if index.cls_codes is not None:
        stats["cls_frequency"] = float((index.cls_codes[:, coord] > 0).float().mean())
    return stats


def active_atoms(ins: Inspection, layer: int, k: int = 8, image: int = 0) -> list[dict[str, Any]]:
    """The code coordinates most active on one image's patches at ``layer``: coord, total and peak activation,
    number of active patches."""
    codes = facet_features(ins, layer, "code")[image].flatten(0, 1)  # patches, code_dim
    total = codes.sum(0)
    values, idx = total.topk(min(k, total.numel()))
    return [
        {"coord": int(j), "total": float(v), "max": float(codes[:, j].max()), "patches": int((codes[:, j] > 0).sum())}
        for v, j in zip(values, idx, strict=True)
        if v > 0
    ]


def patch_crop(image: Image.Image, row: int, col: int, patch: tuple[int, int], context: int = 1) -> Image.Image:
    """The patch at (row, col) of an image at the network's input size, with ``context`` patches around it."""
    ph, pw = patch
    top, left = max(0, (row - context) * ph), max(0, (col - context) * pw)
    bottom, right = min(image.height, (row + context + 1) * ph), min(image.width, (col + context + 1) * pw)
    return image.crop((left, top, right, bottom))


@torch.no_grad()
def intervene(model: nn.Module, before: Inspection, layer: int, coord: int, value: float = 0.0) -> Intervention:
    """Clamp code coordinate ``coord`` of ``layer`` to ``value`` in every token and run the remaining layers
    from the edited tokens: the edited logits and later layers' attention, beside ``before``."""
    family = family_of(model)
    code = before.layer(layer).facets.get("code")  # checks the range
    layer %= before.depth
    if not family.has_code or code is None:
        raise UserError(f"a {family.name} model has no sparse code to edit")
    if not 0 <= coord < code.shape[-1]:
        raise UserError(f"code coordinate {coord} is out of range; layer {layer} has 0..{code.shape[-1] - 1}")

    def edit(c: Tensor) -> Tensor:
        c[..., coord] = value
        return c

    was_training = model.training
    model.eval()
    try:
        after, logits = family.intervene(model, before, layer, edit)
    finally:
        model.train(was_training)
    return Intervention(layer, coord, float(value), before, after, logits)
