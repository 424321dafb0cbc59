"""Per-head [CLS] attention maps of image files, as ``cratevit attention`` writes them (Figure 4 of the CRATE
paper): for each image, the class token's attention to every patch in each head of one layer, its top-mass mask
(DINO's: the patches holding ``threshold`` of the head's attention mass), overlays and a head grid.

Files per image, in ``out/STEM/``: ``image.png``, ``attention.npy`` (heads, rows, cols), ``attn-headK.png``
(the map, nearest-upsampled to the image), ``mask-headK.png``, ``overlay-headK.png`` and ``heads.png/pdf``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import nn

from ..registry import layer_description
from .images import ResizeMode, prepare
from .segmentation import attention_maps, model_geometry
from .visualize import head_grid_figure, mass_mask, overlay, save_figure, to_uint8, upsample

__all__ = ["unique_stem", "write_head_maps"]


def unique_stem(path: Path, used: set[str]) -> str:
    """``path``'s stem, numbered (``a-2``) when an earlier image had the same one."""
    stem, k = path.stem, 1
    while stem in used:
        k += 1
        stem = f"{path.stem}-{k}"
    used.add(stem)
    return stem


def write_head_maps(
    model: nn.Module,
    paths: Sequence[Path],
    images: Sequence[Image.Image],
    out: Path,
    layer: int,
    threshold: float,
    resize: ResizeMode,
    size: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    decoder: bool = False,
    random_weights: bool = False,
    log: Callable[[str], None] = lambda line: None,
) -> list[dict[str, Any]]:
    """Write the files above for each image under ``out``; one record per image (its folder, preprocessing,
    input size, token grid, head count). ``layer`` is a 0-based block index (of the decoder with ``decoder``);
    ``random_weights`` says so in the figures' titles; ``log`` receives one line per image."""
    grid_size, patch = model_geometry(model)
    records, used = [], set()
    for path, image in zip(paths, images, strict=True):
        prep = prepare(image, grid_size, patch, resize, size, mean, std)
        maps = attention_maps(model, prep.tensor[None], layer, decoder)[0]  # heads rows cols
        masks = mass_mask(maps, threshold)
        heat = upsample(maps, prep.original_size).numpy()  # heads H W
        mask_up = upsample(masks.float(), prep.original_size).numpy() > 0.5
        folder = Path(out) / unique_stem(path, used)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / "image.png")
        np.save(folder / "attention.npy", maps.numpy())
        for k in range(heat.shape[0]):
            Image.fromarray(to_uint8(heat[k]), mode="L").save(folder / f"attn-head{k}.png")
            Image.fromarray((mask_up[k] * 255).astype(np.uint8), mode="L").save(folder / f"mask-head{k}.png")
            overlay(image, heat[k]).save(folder / f"overlay-head{k}.png")
        part = "decoder layer" if decoder else "layer"
        note = "" if decoder else layer_description(model, layer)  # ToST: a TSSA membership or class attention
        title = f"{path.name}: {part} {layer} (0-based{note}), top {threshold:.0%} of attention mass"
        save_figure(head_grid_figure(image, heat, mask_up, title, random_weights, threshold), folder / "heads")
        records.append(
            {
                "image": str(path),
                "folder": str(folder),
                "preprocessing": prep.how,
                "input_size": list(prep.input_size),
                "grid": list(maps.shape[1:]),
                "heads": int(maps.shape[0]),
            }
        )
        log(f"{path}: {maps.shape[0]} heads, {prep.how} -> {folder}")
    return records
