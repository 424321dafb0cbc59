"""Reading one layer's activations out of a white-box model, by site name: what SAEs train on and codes describe.

:func:`layer_activations` is the ONE place that reads them (today through the model's trace method,
``forward_trace``; the hook API of issue 21 will replace its body, not its callers). Sites of layer ``l``
(0-based block index), each ``(b, n, d)`` with the class token first:

* ``z_in``: ``Z^l``, the tokens entering the layer;
* ``z_half``: ``Z^{l+1/2} = Z^l + MSSA(LN1(Z^l))``, after the attention (compression) step;
* ``ista_in``: ``LN2(Z^{l+1/2})``, the input of the ISTA (sparsification) step: the signal that the layer's sparse
  code reconstructs through its dictionary, ``x_hat = code D^T``;
* ``code``: the layer's sparse code (CRATE: the ISTA output ``Z^{l+1}``, which is also the layer's output;
  CRATE-alpha: its internal code ``A_2``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from types import MappingProxyType

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from ..registry import trace_method

__all__ = [
    "SITES",
    "dataset_activations",
    "ista_dictionary",
    "layer_activations",
    "logits_with_replaced",
    "prefix_tokens",
]

SITES = MappingProxyType(
    {
        "z_in": "Z^l, the tokens entering layer l",
        "z_half": "Z^{l+1/2} = Z^l + MSSA(LN1(Z^l)), after the attention step",
        "ista_in": "LN2(Z^{l+1/2}), the input of layer l's ISTA step (its code reconstructs it: x_hat = code D^T)",
        "code": "the sparse code of layer l (CRATE: Z^{l+1}, the ISTA output)",
    }
)
"""Activation site name -> what it is (see the module docstring)."""


def _check_layer(model: nn.Module, layer: int) -> int:
    depth = len(model.blocks)
    if not -depth <= layer < depth:
        raise UserError(f"layer {layer} is outside this {depth}-layer model; use 0..{depth - 1} (block index, 0-based)")
    return layer % depth


@torch.no_grad()
def layer_activations(
    model: nn.Module, images: Tensor, layer: int, sites: Sequence[str] = ("ista_in",)
) -> dict[str, Tensor]:
    """Site name -> activations (b, n, d) of layer ``layer`` (0-based) for ``images`` (b, c, H, W)."""
    unknown = [s for s in sites if s not in SITES]
    if unknown:
        raise UserError(f"unknown activation site {unknown[0]!r}; choose from {', '.join(SITES)}")
    layer = _check_layer(model, layer)
    trace = trace_method(model)(images, layers=[layer])
    layers = getattr(trace, "layers", None)
    if layers is None:
        raise UserError(f"{type(model).__name__} has no per-layer trace of a CRATE encoder; use a CRATE model")
    t, block = layers[0], model.blocks[layer]
    read = {
        "z_in": lambda: t.z_in,
        "z_half": lambda: t.z_half,
        "ista_in": lambda: block.norm2(t.z_half),
        "code": lambda: t.z_out if getattr(t, "code", None) is None else t.code,
    }
    return {s: read[s]() for s in sites}


@torch.no_grad()
def logits_with_replaced(
    model: nn.Module, images: Tensor, layer: int, site: str, replace: Callable[[Tensor], Tensor]
) -> Tensor:
    """The logits (b, classes) when layer ``layer``'s activation at ``site`` is replaced on the PATCH tokens by
    ``replace(patch_activations)`` (b, n_patches, d) -> same shape (the class token keeps its own); the rest of the
    network runs on. A CRATE block ``z_half = z + MSSA(LN1(z))``, ``z_next = ISTA(LN2(z_half))`` is spelled out
    here (eval mode: no stochastic depth); the hook API will do this for every family."""
    if site not in SITES:
        raise UserError(f"unknown activation site {site!r}; choose from {', '.join(SITES)}")
    layer = _check_layer(model, layer)
    p = prefix_tokens(model)

    def swap(t: Tensor) -> Tensor:
        return torch.cat([t[:, :p], replace(t[:, p:])], dim=1)

    z, _ = model.embed(images)
    for i, block in enumerate(model.blocks):
        if i != layer:
            z = block(z)
            continue
        z = swap(z) if site == "z_in" else z
        z_half = z + block.mssa(block.norm1(z))
        z_half = swap(z_half) if site == "z_half" else z_half
        x = block.norm2(z_half)
        z = block.ista(swap(x) if site == "ista_in" else x)
        z = swap(z) if site == "code" else z
    return model.forward_head(z)


def ista_dictionary(model: nn.Module, layer: int) -> Tensor:
    """The ISTA dictionary ``D`` (d, F) of layer ``layer``: its columns are the atoms of the layer's code."""
    block = model.blocks[_check_layer(model, layer)]
    ista = getattr(block, "ista", None)
    if not isinstance(getattr(ista, "dictionary", None), Tensor):
        raise UserError(f"{type(model).__name__} layers have no single ISTA dictionary; use a CRATE model")
    return ista.dictionary.detach()


def prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patch tokens (1: the class token)."""
    return int(getattr(model, "num_prefix_tokens", 1))


@torch.no_grad()
def dataset_activations(
    model: nn.Module,
    dataset: Dataset,
    layer: int,
    sites: Sequence[str] = ("ista_in",),
    batch_size: int = 64,
    limit: int | None = None,
) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
    """(site -> activations (b, n, d), labels (b,)) batch by batch over ``dataset`` (its first ``limit`` items),
    the model in eval mode on its own device."""
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    device = next(model.parameters()).device
    model.eval()
    for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        acts = layer_activations(model, images.to(device), layer, sites)
        yield {k: v.float().cpu() for k, v in acts.items()}, torch.as_tensor(labels)
