"""Looking inside trained models: functions of tensors, plus the few that run a model.

* :mod:`.layerwise`: coding rate ``R^c`` and sparsity per layer (Figure 3 of the CRATE paper);
* :mod:`.segmentation`: foreground masks from attention and PCA, scored against ground truth;
* :mod:`.visualize`: attention maps, masks, PCA maps and figures;
* :mod:`.images`: reading and preparing image files for a model;
* :mod:`.discovery`: MaskCut over a set of images, COCO results and AP (``cratevit maskcut``);
* :mod:`.head_maps`: per-head attention maps, masks and overlays of image files (``cratevit attention``);
* :mod:`.pca_maps`: PCA of patch features as RGB maps over image files (``cratevit pca``);
* :mod:`.layerwise_report`: the per-layer CSV, JSON and figures of ``cratevit analyze``;
* :mod:`.hooks`: hook points by stable name (``blocks.3.ista.code``), ``run_with_cache``, a hooks context that
  reads and replaces activations, activation patching, for every family and timm ViTs;
* :mod:`.activations`: one layer's activations by site name (``ista_in``, ``code`` ...), and splicing them;
* :mod:`.sae`, :mod:`.sae_train`, :mod:`.sae_run`: sparse autoencoders, their streaming trainer, ``cratevit sae``;
* :mod:`.sae_features`: an SAE's features read on its model beside the ISTA atoms (the explorer's SAE panel);
* :mod:`.codes`: metrics of any sparse code (L0, FVE, dead/dense, loss recovered, probe, monosemanticity);
* :mod:`.codes_compare`: ``cratevit codes compare`` (ISTA code vs SAEs on CRATE and a ViT, trained and random).
"""

from .layerwise import (
    DEFINITIONS,
    LayerwiseStats,
    coding_rate,
    compression,
    input_normalization,
    layerwise_stats,
    load_model,
    logdet_spd,
    sparsity,
)

__all__ = [
    "DEFINITIONS",
    "LayerwiseStats",
    "coding_rate",
    "compression",
    "input_normalization",
    "layerwise_stats",
    "load_model",
    "logdet_spd",
    "sparsity",
]
