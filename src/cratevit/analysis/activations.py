"""Reading one layer's activations out of a model, by site name: what SAEs train on and codes describe.

:func:`layer_activations` is the ONE place that reads them, through the hook API (:mod:`.hooks`: each site is a
hook point of block ``l``), so it serves every family the hooks know (white-box families, ToST, timm ViTs). Sites
of layer ``l`` (0-based block index), each ``(b, n, d)`` with the class token first (where the blocks carry one):

* ``z_in``: ``Z^l``, the tokens entering the layer (hook ``blocks.l.in``);
* ``z_half``: ``Z^{l+1/2} = Z^l + MSSA(LN1(Z^l))``, after the attention (compression) step (``blocks.l.mid``);
* ``ista_in``: ``LN2(Z^{l+1/2})``, the input of the ISTA (sparsification) step: the signal that the layer's sparse
  code reconstructs through its dictionary, ``x_hat = code D^T`` (``blocks.l.norm2``; in a ViT, the MLP's input);
* ``code``: the layer's sparse code (CRATE: the ISTA output ``Z^{l+1}``, which is also the layer's output;
  CRATE-alpha: its internal code ``A_2``) (``blocks.l.ista.code``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from types import MappingProxyType

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from ..registry import is_autoencoder, layer_count, layer_description
from .hooks import block_points, hooks

__all__ = [
    "SITES",
    "SITE_POINTS",
    "dataset_activations",
    "has_ista_dictionary",
    "ista_dictionary",
    "layer_activations",
    "logits_with_replaced",
    "prefix_tokens",
    "site_hook",
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

SITE_POINTS = MappingProxyType({"z_in": "in", "z_half": "mid", "ista_in": "norm2", "code": "ista.code"})
"""Activation site -> its hook point in block ``l`` (:data:`cratevit.analysis.hooks.HOOK_POINTS`)."""


def _check_layer(model: nn.Module, layer: int) -> int:
    """``layer`` in the analysis' numbering (:func:`cratevit.registry.layer_count`: ToST's class-attention blocks
    follow its TSSA blocks) -> the index into ``model.blocks``, whose blocks are the ones with activation sites."""
    total, depth = layer_count(model), len(model.blocks)
    if not -total <= layer < total:
        raise UserError(f"layer {layer} is outside this {total}-layer model; use 0..{total - 1} (block index, 0-based)")
    index = layer % total
    if index >= depth:
        raise UserError(
            f"layer {layer} (0-based){layer_description(model, index)}: SAEs and codes read blocks.0 .. "
            f"blocks.{depth - 1} only, so pass --layer {depth - 1} (the last of them) or lower"
        )
    return index


def site_hook(model: nn.Module, layer: int, site: str) -> str:
    """The hook name of layer ``layer``'s activation at ``site`` (``ista_in`` of layer 3: ``blocks.3.norm2``)."""
    if site not in SITES:
        raise UserError(f"unknown activation site {site!r}; choose from {', '.join(SITES)}")
    layer = _check_layer(model, layer)
    point = SITE_POINTS[site]
    if point not in block_points(model.blocks[layer]):
        raise UserError(
            f"layer {layer} (0-based) of {type(model).__name__} has no code (no sparse-coding step) for the site {site}"
        )
    return f"blocks.{layer}.{point}"


class _Stop(Exception):
    """Raised by the last reading hook: the rest of the network need not run."""


def _forward(model: nn.Module) -> Callable[[Tensor], object]:
    """The pass that reaches the blocks: an autoencoder's unmasked encoder, else the model itself."""
    return model.forward_encoder if is_autoencoder(model) else model


@torch.no_grad()
def layer_activations(
    model: nn.Module, images: Tensor, layer: int, sites: Sequence[str] = ("ista_in",)
) -> dict[str, Tensor]:
    """Site name -> activations (b, n, d) of layer ``layer`` (0-based) for ``images`` (b, c, H, W); the forward
    pass stops after that layer."""
    names = {site: site_hook(model, layer, site) for site in sites}
    got: dict[str, Tensor] = {}
    wanted = set(names.values())

    def keep(value: Tensor, name: str) -> None:
        got[name] = value
        if wanted <= set(got):
            raise _Stop

    try:
        with hooks(model, dict.fromkeys(wanted, keep)):
            _forward(model)(images)
    except _Stop:
        pass
    return {site: got[name] for site, name in names.items()}


@torch.no_grad()
def logits_with_replaced(
    model: nn.Module, images: Tensor, layer: int, site: str, replace: Callable[[Tensor], Tensor]
) -> Tensor:
    """The logits (b, classes) when layer ``layer``'s activation at ``site`` is replaced on the PATCH tokens by
    ``replace(patch_activations)`` (b, n_patches, d) -> same shape (the class token keeps its own); the rest of the
    network runs on (a replace hook, :mod:`.hooks`)."""
    p = prefix_tokens(model)

    def swap(t: Tensor, _name: str) -> Tensor:
        return torch.cat([t[:, :p], replace(t[:, p:])], dim=1)

    with hooks(model, {site_hook(model, layer, site): swap}):
        return model(images)


def has_ista_dictionary(model: nn.Module, layer: int) -> bool:
    """Whether layer ``layer`` has one ISTA dictionary ``D`` (CRATE, the CRATE-MAE encoder, the ISTA ablations)."""
    ista = getattr(model.blocks[_check_layer(model, layer)], "ista", None)
    return isinstance(getattr(ista, "dictionary", None), Tensor) and not hasattr(ista, "decoder")


def ista_dictionary(model: nn.Module, layer: int) -> Tensor:
    """The ISTA dictionary ``D`` (d, F) of layer ``layer``: its columns are the atoms of the layer's code."""
    block = model.blocks[_check_layer(model, layer)]
    ista = getattr(block, "ista", None)
    if not isinstance(getattr(ista, "dictionary", None), Tensor):
        raise UserError(f"{type(model).__name__} layers have no single ISTA dictionary; use a CRATE model")
    return ista.dictionary.detach()


def prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patch tokens in the blocks (1: the class token; 0 in ToST, whose class token joins only in
    the class-attention blocks after them)."""
    if hasattr(model, "class_blocks"):
        return 0
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
