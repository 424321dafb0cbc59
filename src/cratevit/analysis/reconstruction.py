"""Masked reconstruction by a CRATE-MAE, as the MAE demo shows it: per image, the original, the masked input, the
reconstruction, and the reconstruction with the visible patches pasted back.

:func:`reconstruct` runs the model under a seeded mask and returns the four panels as image tensors;
:func:`reconstruction_figure` draws them (a function of tensors). Pixels are shown in [0, 1] after undoing the
input normalisation; masked patches are shown at the normalisation mean (0 in normalised space, as the MAE demo).
A model trained with ``norm_pix_loss`` predicts each patch normalised by its own mean and variance: its prediction
is mapped back with the true patch's statistics (the usual way to look at such a model; it leaks two numbers per
masked patch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

__all__ = ["Reconstruction", "reconstruct", "reconstruction_figure"]


@dataclass
class Reconstruction:
    """Four (b, c, H, W) image batches in [0, 1], the mask (b, n_patches) and the masked-patch MSE per image."""

    original: Tensor
    masked: Tensor
    reconstruction: Tensor
    pasted: Tensor
    mask: Tensor
    loss: Tensor  # (b,), in the model's normalised pixel space, masked patches only


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
    mask_ratio: float | None = None,
) -> Reconstruction:
    """Mask ``images`` (normalised model inputs) with a mask drawn from ``seed``, reconstruct, and un-normalise."""
    was_training = model.training
    model.eval()
    device = model.cls_token.device
    images = images.to(device)
    mask = model.make_mask(images.shape[0], mask_ratio, torch.Generator().manual_seed(seed)).to(device)
    out = model(images, mask=mask)
    model.train(was_training)
    target = model.patchify(images)
    pred = out.pred.float()
    if model.config.norm_pix_loss:
        mu, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6).sqrt() + mu
    per_image = ((pred - target) ** 2).mean(-1)
    loss = (per_image * mask).sum(1) / mask.sum(1).clamp_min(1)
    m = mask[..., None].to(target.dtype)
    recon = model.unpatchify(pred)
    masked = model.unpatchify(target * (1 - m))
    pasted = model.unpatchify(pred * m + target * (1 - m))
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def show(x: Tensor) -> Tensor:
        return (x * std_t + mean_t).clamp(0, 1).cpu()

    return Reconstruction(show(images), show(masked), show(recon), show(pasted), mask.cpu(), loss.cpu())


def reconstruction_figure(rec: Reconstruction, names: Sequence[str] | None = None, title: str = "") -> Figure:
    """One row per image: original | masked | reconstruction | reconstruction + visible patches."""
    n = rec.original.shape[0]
    names = list(names) if names is not None else [f"image {i}" for i in range(n)]
    ratio = rec.mask.float().mean().item()
    fig = Figure(figsize=(8.4, 2.2 * n + (0.4 if title else 0.1)))
    axes = fig.subplots(n, 4, squeeze=False)
    columns = (
        ("original", rec.original),
        (f"masked ({ratio:.0%})", rec.masked),
        ("reconstruction", rec.reconstruction),
        ("reconstruction + visible", rec.pasted),
    )
    for i in range(n):
        for j, (label, batch) in enumerate(columns):
            ax = axes[i, j]
            ax.imshow(batch[i].permute(1, 2, 0).numpy().squeeze(), cmap="gray" if batch.shape[1] == 1 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=9)
            if j == 0:
                ax.set_ylabel(names[i], fontsize=9)
            if j == 2:
                ax.set_xlabel(f"masked MSE {rec.loss[i]:.3f}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
