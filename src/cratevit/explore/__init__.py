"""``cratevit explore``: a local web page to look inside a model, down to single dictionary atoms.

:func:`load_explorer` turns a checkpoint, preset or timm model name into an :class:`Explorer` (the page's state and
actions, :mod:`cratevit.explore.session`); :func:`cratevit.explore.app.serve` serves it on 127.0.0.1 behind the
checks of its security model (Host, Origin or per-run token). Uploads are read by :mod:`cratevit.explore.uploads`
(header checks, allow-listed decoders), maps are coloured on stated scales by :mod:`cratevit.explore.colour`; the
computations are :mod:`cratevit.analysis.inspection`'s functions. SAEs trained on the model (``--sae``) get a panel
beside the atoms (:mod:`cratevit.explore.sae_view`, computed by :mod:`cratevit.analysis.sae_features`).
docs/explore.md describes the page.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .session import Explorer, ImageItem, builtin_samples, data_samples

__all__ = ["THREADS", "Explorer", "load_explorer", "training_data"]

SET_IMAGES = 96  # images of the built-in data indexed for the atoms view
# CPU threads for the page's work (one image at a time, mostly small operations). Measured on 2 cores shared with
# other jobs: a second thread made a crate_digits view ~5x and a crate_tiny (224 px) view ~30x slower.
THREADS = 1
"""CPU threads for the page's work (``--threads``); a second thread made views 5-30x slower on 2 busy cores."""


def training_data(spec: str | Path) -> str | None:
    """The built-in data a checkpoint file says it was trained on (``digits``, ``shapes``, a folder), or None."""
    from ..checkpoint.read import load_file
    from ..errors import CheckpointError

    path = Path(spec)
    if not path.is_file() or path.suffix == ".safetensors":
        return None
    try:
        obj = load_file(path, mmap=True)  # mmap: the tensors stay on disk
    except (CheckpointError, OSError):  # unreadable files are reported by the loader
        return None
    config = obj.get("train_config") if isinstance(obj, dict) else None
    data = config.get("data") if isinstance(config, dict) else None
    return data if isinstance(data, str) else None


def load_explorer(
    spec: str,
    images: str | Path | None = None,
    arch: str | None = None,
    heads: int | None = None,
    set_limit: int = 200,
    saes: Sequence[str | Path] = (),
) -> Explorer:
    """The page's state for a checkpoint file, a preset (random weights) or a timm model name.

    The sample list holds scikit-image's photographs, held-out images of the built-in data the checkpoint was
    trained on, and the files of ``images``; the image set indexed for the atoms and the data-set curves is
    ``images`` (up to ``set_limit`` files), else the built-in data's held-out images, else the photographs.
    ``saes``: SAE checkpoints trained on this model (``cratevit sae train``), shown in the "SAE features" panel;
    each is checked against the model (:func:`cratevit.analysis.sae_features.load_sae_for`).
    """
    from ..analysis import input_normalization
    from ..analysis.images import find_images, load_image
    from ..analysis.inspection import class_names_for, family_of
    from ..analysis.segmentation import load_vision_model

    model = load_vision_model(spec, arch=arch, heads=heads).eval()
    family_of(model)  # a clear error for models the page cannot look inside
    mean, std = input_normalization(spec)
    data = training_data(spec)
    size = max(getattr(getattr(model, "config", None), "image_size", (32, 32)))
    photos = builtin_samples()
    own = data_samples(data, SET_IMAGES, image_size=size) if data in ("digits", "shapes") else []
    folder = [ImageItem(p.name, load_image(p)) for p in find_images(images)[:set_limit]] if images else []
    if folder:
        image_set, label = folder, f"{len(folder)} images of {images}"
    elif own:
        image_set, label = own, f"{len(own)} held-out {data} images"
    else:
        image_set, label = photos, f"{len(photos)} scikit-image photos"
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    names = class_names_for(num_classes, data) if num_classes > 0 else None
    samples = photos + own[:6] + folder[:24]
    trained = Path(spec).is_file()  # a preset or a timm name is built with random weights
    explorer = Explorer(model, str(spec), mean, std, samples, image_set, names, label, trained=trained)
    for path in saes:
        explorer.add_sae(path)
    return explorer
