"""timm's model contract, written once for every family's classifier (the white-box backbone and ToST).

timm's models answer the same questions whatever their blocks: ``get_classifier`` / ``reset_classifier(n)``
(0: no classifier, ``forward`` then returns the pooled features), ``set_grad_checkpointing``, the feature API
``forward_intermediates(x, indices)`` (the selected blocks' outputs as maps) and ``prune_intermediate_layers``.
:class:`TimmContract` holds what these methods share; a model mixes it in before ``nn.Module`` and gives:

* attributes: ``config`` (a dataclass with ``replace`` and the fields ``depth``, ``pool``, ``num_classes``),
  ``blocks`` (an ``nn.ModuleList``, the blocks timm's indices count), ``feature_info`` (one entry per block),
  ``cls_token`` (its device is the model's), ``head`` and ``head_hidden_size`` (the classifier's input width),
  ``grad_checkpointing``, ``num_classes``;
* methods: ``embed(x) -> (tokens, (gh, gw))``; ``_copy_config_attributes()`` (the plain attributes ``forward``
  reads, from ``config``); ``_patch_tokens(z, norm)`` (a block's output -> its patch tokens (b, gh * gw, dim),
  through the final norm when ``norm``); ``_final_tokens(z)`` (the last block's output -> ``forward_features``'
  tokens); ``_prune_head()`` and ``_prune_norm()`` (what ``prune_intermediate_layers`` removes besides blocks).

This file imports torch alone.
"""

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ..errors import UserError

__all__ = ["TimmContract"]


class TimmContract:
    """timm's classifier contract over ``self.blocks`` (module docstring: what a model gives it)."""

    # ----------------------------------------------------------------------------------------------- the block loop
    def forward_blocks(self, z: Tensor) -> Tensor:
        """Tokens through every block (with activation checkpointing when enabled and training)."""
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting() and self.training and torch.is_grad_enabled():
                z = torch.utils.checkpoint.checkpoint(block, z, use_reentrant=False)
            else:
                z = block(z)
        return z

    # ----------------------------------------------------------------------------------------------- timm features
    def _take_indices(self, indices: int | list[int] | tuple[int, ...] | None) -> list[int]:
        """timm's layer selection: None -> every layer, n -> the last n, a list -> those (negative from the end)."""
        depth = len(self.blocks)
        if indices is None or isinstance(indices, int):
            n = depth if indices is None else indices
            if not 0 < n <= depth:
                raise UserError(f"indices={n} asks for the last {n} layers of a {depth}-layer model; use 1..{depth}")
            return list(range(depth - n, depth))
        if not indices or any(not -depth <= i < depth for i in indices):
            raise UserError(f"layer indices {list(indices)} must lie in -{depth}..{depth - 1}")
        return sorted({i % depth for i in indices})

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's feature API: the patch tokens of the selected blocks' outputs ``Z^{l+1}``, as maps
        (b, dim, gh, gw) (``output_fmt="NCHW"``) or (b, gh * gw, dim) (``"NLC"``); ``norm`` applies the final
        norm. Returns ``(forward_features' tokens, intermediates)``, or only the intermediates (timm's signature)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise UserError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = self._take_indices(indices)
        z, (gh, gw) = self.embed(x)
        blocks = self.blocks[: take[-1] + 1] if stop_early or intermediates_only else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            z = block(z)
            if i in take:
                y = self._patch_tokens(z, norm)  # (b, gh*gw, dim)
                intermediates.append(y.transpose(1, 2).reshape(y.shape[0], -1, gh, gw) if output_fmt == "NCHW" else y)
        return intermediates if intermediates_only else (self._final_tokens(z), intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last selected one (and the head / final norm); returns the kept indices."""
        take = self._take_indices(indices)
        self.blocks = self.blocks[: take[-1] + 1]
        self.config = self.config.replace(depth=len(self.blocks))
        self._copy_config_attributes()
        self.feature_info = self.feature_info[: len(self.blocks)]
        if prune_head:
            self._prune_head()
            self.reset_classifier(0)
        if prune_norm:
            self._prune_norm()
        return take

    # ----------------------------------------------------------------------------------------------- classifier
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` (0: no classifier);
        ``global_pool`` ``"cls"`` / ``"mean"`` (timm's ``"token"`` / ``"avg"``) changes the pooling."""
        if global_pool is not None:
            pool = {"token": "cls", "avg": "mean"}.get(global_pool, global_pool)
            if pool not in ("cls", "mean"):
                raise UserError(f"global_pool must be 'cls' or 'mean', got {global_pool!r}")
            self.config = self.config.replace(pool=pool)
        self.num_classes = num_classes
        self.config = self.config.replace(num_classes=num_classes)
        self._copy_config_attributes()
        device = self.cls_token.device
        self.head = nn.Linear(self.head_hidden_size, num_classes, device=device) if num_classes > 0 else nn.Identity()

    # ----------------------------------------------------------------------------------------------- utilities
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
