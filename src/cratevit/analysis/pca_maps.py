"""PCA of a layer's patch features over image files as RGB maps, as ``cratevit pca`` writes them (Figure 5 of
the emergence paper).

``method="paper"``: the emergence paper's two-stage PCA (:func:`cratevit.analysis.facets.paper_pca`): the first
component, fitted over all images, separates the foreground; a second PCA of the foreground patches gives the RGB.
``method="whole"``: one PCA of all patches, components 1-3 as RGB (:func:`cratevit.analysis.visualize.pca_maps`).

Files: ``out/STEM/{image,pca,foreground}.png`` and ``pca-scores.npy`` per image, ``out/pca-grid.png/pdf``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .facets import facet_features, paper_pca
from .head_maps import unique_stem
from .images import ResizeMode, prepare
from .segmentation import model_geometry
from .visualize import first_component_foreground, pca_figure, pca_maps, save_figure, upsample

__all__ = ["PCAMapsResult", "write_pca_maps"]


@dataclass
class PCAMapsResult:
    """One record per image (folder, preprocessing, grid, foreground fraction) and the PCA's explained variance
    ratios, with the words that say how the RGB and the foreground were made."""

    records: list[dict[str, Any]]
    explained_variance_ratio: list[float]
    rgb: str
    foreground: str


def write_pca_maps(
    model: nn.Module,
    paths: Sequence[Path],
    images: Sequence[Image.Image],
    out: Path,
    layer: int,
    facet: str,
    method: str,
    components: int,
    fg_threshold: float,
    resize: ResizeMode,
    size: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    decoder: bool = False,
    random_weights: bool = False,
    log: Callable[[str], None] = lambda line: None,
) -> PCAMapsResult:
    """Write the files above for ``images``; ``layer`` is a 0-based block index; ``random_weights`` says so in the
    figure's title; ``log`` gets a line per image."""
    grid_size, patch = model_geometry(model)
    preps, feats = [], []
    for image in images:
        prep = prepare(image, grid_size, patch, resize, size, mean, std)
        preps.append(prep)
        feats.append(facet_features(model, prep.tensor[None], layer, facet, decoder)[0])  # rows cols dim
    if method == "paper":
        paper = paper_pca(feats, fg_threshold, components)
        rgbs, scores_list, fgs = paper.rgb, [p[..., None] for p in paper.first], paper.foreground
        ratios = paper.explained_variance_ratio
        rgb_words = (
            "components 1-3 of the foreground PCA, min-max scaled per image over its foreground; background black"
        )
        fg_words = (
            f"first component (fitted over all images), min-max scaled per image, above {fg_threshold}, "
            "holes filled (sign chosen so that most border patches are background)"
        )
    else:
        result = pca_maps(feats, components)
        rgbs, scores_list = result.rgb, result.scores
        fgs = [first_component_foreground(s[..., 0]) for s in result.scores]
        ratios = result.explained_variance_ratio
        rgb_words = "components 1-3 as red, green, blue, min-max scaled jointly over all images"
        fg_words = (
            "first component above its mean over the image (sign chosen so that most border patches are background)"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, used, shown = [], set(), []
    for path, image, prep, rgb, scores, fg in zip(paths, images, preps, rgbs, scores_list, fgs, strict=True):
        rgb_up = upsample(torch.from_numpy(rgb).float().permute(2, 0, 1), prep.original_size).permute(1, 2, 0).numpy()
        fg_up = upsample(torch.from_numpy(fg).float(), prep.original_size).numpy() > 0.5
        folder = out / unique_stem(path, used)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / "image.png")
        Image.fromarray((rgb_up * 255).round().astype(np.uint8), mode="RGB").save(folder / "pca.png")
        Image.fromarray((fg_up * 255).astype(np.uint8), mode="L").save(folder / "foreground.png")
        np.save(folder / "pca-scores.npy", scores)
        shown.append((path.name, image, rgb_up, fg_up))
        records.append(
            {
                "image": str(path),
                "folder": str(folder),
                "preprocessing": prep.how,
                "input_size": list(prep.input_size),
                "grid": list(rgb.shape[:2]),
                "foreground_fraction": float(fg.mean()),
            }
        )
        log(f"{path}: {prep.how} -> {folder}")
    title = f"PCA ({method}) of layer {layer} (0-based) {facet} features"
    save_figure(pca_figure(shown, title, random_weights), out / "pca-grid")
    return PCAMapsResult(records, [float(v) for v in ratios], rgb_words, fg_words)
