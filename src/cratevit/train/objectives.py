"""What the training engine optimises. ``cratevit train``/``finetune`` and ``cratevit pretrain`` run the same loop;
the objective is the only difference:

* :class:`Classification`: cross-entropy on the labels (label smoothing, or timm mixup/cutmix with soft targets);
  validation reports loss, top-1 and top-5, and the best checkpoint is the one with the best top-1;
* :class:`MaskedAutoencoding`: the masked-patch reconstruction loss of a CRATE-MAE (labels unused). Training masks
  are drawn from a generator seeded by ``(seed, global step, rank)``, so a resumed run draws the same masks as an
  uninterrupted one; validation masks are seeded by the batch index, the same every epoch. The best checkpoint
  is the one with the lowest validation loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UserError
from ..registry import is_autoencoder, mask_sampler

__all__ = ["Classification", "MaskedAutoencoding", "Objective", "make_objective"]


def _seed(*parts: int) -> int:
    x = 0
    for p in parts:
        x = (x * 0x9E3779B97F4A7C15 + int(p) + 0x632BE59BD9B4E019) % (1 << 64)
        x ^= x >> 29
    return x % (1 << 63)


class Objective:
    """The loss of a training step and the validation metrics of a run."""

    name = "objective"
    classifies = True  # train logs report the batch accuracy
    score_name = "top1"  # the validation metric that picks best.pt (higher is better)
    num_sums = 4  # length of eval_sums' vector

    def train_loss(self, model: nn.Module, x: Tensor, y: Tensor, step: int) -> tuple[Tensor, Tensor | None]:
        """(loss, logits or None) of one training batch; ``model`` may be the DDP-wrapped one."""
        raise NotImplementedError

    def eval_sums(self, model: nn.Module, x: Tensor, y: Tensor, index: int) -> Tensor:
        """Float64 sums over one validation batch, the image count last (``index``: the batch's position in this
        rank's validation order)."""
        raise NotImplementedError

    def metrics(self, sums: Tensor) -> dict[str, float]:
        """Validation metrics from the sums of all batches and ranks."""
        raise NotImplementedError

    def score(self, metrics: dict[str, float]) -> float:
        return float(metrics[self.score_name])


class Classification(Objective):
    """Cross-entropy on the labels, with label smoothing and optional mixup / cutmix; scored by top-1."""

    name = "classification"

    def __init__(
        self, num_classes: int, label_smoothing: float = 0.1, mixup: float = 0.0, cutmix: float = 0.0, seed: int = 0
    ) -> None:
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        self.seed = seed
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes
            )
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def train_loss(self, model: nn.Module, x: Tensor, y: Tensor, step: int) -> tuple[Tensor, Tensor | None]:
        target: Tensor = y
        if self.mixup is not None:
            np.random.seed((self.seed * 1_000_003 + step) % 2**32)  # mixup draws from numpy
            x, target = self.mixup(x, y)
        logits = model(x)
        return self.criterion(logits.float(), target), logits

    def eval_sums(self, model: nn.Module, x: Tensor, y: Tensor, index: int) -> Tensor:
        logits = model(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        loss = nn.functional.cross_entropy(logits, y, reduction="sum").item()
        return torch.tensor(
            [loss, top[:, :1].any(1).sum().item(), top.any(1).sum().item(), len(y)], dtype=torch.float64
        )

    def metrics(self, sums: Tensor) -> dict[str, float]:
        n = max(sums[3].item(), 1.0)
        return {
            "loss": sums[0].item() / n,
            "top1": 100 * sums[1].item() / n,
            "top5": 100 * sums[2].item() / n,
            "images": int(sums[3].item()),
        }


class MaskedAutoencoding(Objective):
    """The masked-patch MSE of an autoencoder under seeded random masks; scored by the negative validation loss."""

    name = "masked autoencoding"
    classifies = False
    score_name = "neg_loss"
    num_sums = 2

    def __init__(
        self, num_patches: int, mask_ratio: float, sampler: Callable[..., Tensor], seed: int = 0, rank: int = 0
    ) -> None:
        """``sampler``: the family's random masking (``registry.mask_sampler(model)``)."""
        self.num_patches, self.mask_ratio, self.seed, self.rank = num_patches, mask_ratio, seed, rank
        self.sampler = sampler

    def mask(self, batch: int, *parts: int, device: torch.device) -> Tensor:
        g = torch.Generator().manual_seed(_seed(self.seed, *parts))
        return self.sampler(batch, self.num_patches, self.mask_ratio, generator=g).to(device)

    def train_loss(self, model: nn.Module, x: Tensor, y: Tensor, step: int) -> tuple[Tensor, Tensor | None]:
        mask = self.mask(x.shape[0], 1, step, self.rank, device=x.device)
        return model(x, mask=mask).loss, None

    def eval_sums(self, model: nn.Module, x: Tensor, y: Tensor, index: int) -> Tensor:
        mask = self.mask(x.shape[0], 2, index, self.rank, device=x.device)
        loss = model(x, mask=mask).loss.item()
        return torch.tensor([loss * len(x), len(x)], dtype=torch.float64)

    def metrics(self, sums: Tensor) -> dict[str, float]:
        n = max(sums[1].item(), 1.0)
        return {"loss": sums[0].item() / n, "neg_loss": -sums[0].item() / n, "images": int(sums[1].item())}


def make_objective(
    kind: str, model: nn.Module, num_classes: int, options: dict[str, Any], seed: int, rank: int
) -> Objective:
    """The objective named by a run's configuration (``classification`` or ``mae``)."""
    if kind == "classification":
        return Classification(num_classes, seed=seed, **options)
    if kind == "mae":
        if not is_autoencoder(model):
            raise UserError(
                f"the mae objective needs a CRATE-MAE model (a masked autoencoder), got {type(model).__name__}; "
                f"choose an mae_crate_* architecture"
            )
        cfg = model.config
        return MaskedAutoencoding(cfg.num_patches, cfg.mask_ratio, mask_sampler(model), seed=seed, rank=rank)
    raise UserError(f"unknown objective {kind!r}; choose classification or mae")
