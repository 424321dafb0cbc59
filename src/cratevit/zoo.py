"""The known CRATE checkpoints: what each is, how it is built, what it was trained on, where it was published.

Nothing here downloads: the addresses are the authors' own publication places, and fetching a file is the user's
step. Every file, whatever its family (see :data:`cratevit.checkpoint.FAMILIES`), loads with
``cratevit.load_checkpoint(path)``; ``create_model(name, checkpoint=path)`` builds the named preset first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import UserError
from .models import CRATEConfig
from .presets import get_config, resolve_name
from .registry import family_for

__all__ = ["ZOO", "ZooEntry", "count_params", "describe_config", "get_entry", "zoo_rows"]

CRATE_REPO = "https://github.com/Ma-Lab-Berkeley/CRATE"
EMERGENCE_NOTEBOOK = "https://colab.research.google.com/drive/1rYn_NlepyW7Fu5LDliyBDmFZylHco7ss?usp=sharing"
EMERGENCE_CODE = "https://github.com/LeslieTrue/crate-emergence-notebooks"  # crate.py: the demo model definitions
CRATE_S_WEIGHTS = "https://drive.google.com/file/d/1hYgDJl4EKHYfKprwhEjmWmWHuxnK6_h8/view?usp=share_link"


@dataclass(frozen=True)
class ZooEntry:
    """One known checkpoint; ``name`` is the preset that builds it."""

    name: str
    title: str
    trained_on: str
    weights: str  # where the authors published the file, or why there is none
    family: str  # the file layout, a key of cratevit.checkpoint.FAMILIES
    source: str = CRATE_REPO  # where the architecture is defined
    note: str = ""

    @property
    def config(self) -> CRATEConfig:
        return get_config(self.name)

    @property
    def params(self) -> int:
        return count_params(self.config)


ZOO: tuple[ZooEntry, ...] = (
    ZooEntry(
        "crate_tiny",
        "CRATE-T/16",
        "ImageNet-1K (1000 classes)",
        f"not released (README: TODO); {CRATE_REPO}",
        "reference",
    ),
    ZooEntry(
        "crate_small",
        "CRATE-S/16",
        "ImageNet-1K (1000 classes)",
        CRATE_S_WEIGHTS,
        "emergence-demo",
        note="the README's download link, reported unreachable since 2025 (CRATE issue #30); the original "
        "finetune.py reads this file's weights from its 'model' entry without prefix",
    ),
    ZooEntry(
        "crate_base",
        "CRATE-B/16",
        "ImageNet-1K (1000 classes)",
        f"not released (README: TODO); {CRATE_REPO}",
        "reference",
    ),
    ZooEntry(
        "crate_large",
        "CRATE-L/16",
        "ImageNet-1K (1000 classes)",
        f"not released (README: TODO); {CRATE_REPO}",
        "reference",
    ),
    ZooEntry(
        "crate_base_demo",
        "CRATE-B/8 demo",
        "ImageNet-21k (21,842 classes)",
        EMERGENCE_NOTEBOOK,
        "emergence-demo",
        source=EMERGENCE_CODE,
        note="the segmentation-emergence demo model: 6 heads of 128, head LayerNorm -> Linear(768, 768) -> "
        "Linear(768, 21842); weights distributed through the README's emergence demo notebook",
    ),
    ZooEntry(
        "crate_small_21k",
        "CRATE-S/8 21k",
        "ImageNet-21k (21,842 classes)",
        f"see the CRATE repository README and its emergence notebook; {CRATE_REPO}",
        "emergence-demo",
        source=EMERGENCE_CODE,
    ),
    ZooEntry(
        "crate_base_21k",
        "CRATE-B/8 21k",
        "ImageNet-21k (21,842 classes)",
        f"see the CRATE repository README and its emergence notebook; {CRATE_REPO}",
        "emergence-demo",
        source=EMERGENCE_CODE,
    ),
    ZooEntry(
        "crate_base_768",
        "CRATE-B/8 768",
        "not stated (768-way head; a feature extractor)",
        f"see the CRATE repository README and its emergence notebook; {CRATE_REPO}",
        "emergence-demo",
        source=EMERGENCE_CODE,
        note="like crate_base_21k with a 768-way head",
    ),
)


def count_params(cfg: CRATEConfig) -> int:
    """Parameters of the model ``cfg`` builds, counted on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        return family_for(cfg).build(cfg).num_params()


def describe_config(cfg: CRATEConfig) -> str:
    """One line: ``768d x12, 6x128 heads, p8/224, 21842 classes, 2-stage head``."""
    image = f"{cfg.image_size[0]}" if cfg.image_size[0] == cfg.image_size[1] else "x".join(map(str, cfg.image_size))
    text = f"{cfg.dim}d x{cfg.depth}, {cfg.heads}x{cfg.dim_head} heads, p{cfg.patch_size[0]}/{image}, "
    text += f"{cfg.num_classes} classes"
    return text + (f", 2-stage head ({cfg.head_hidden_dim})" if cfg.head_hidden_dim else "")


def get_entry(name: str) -> ZooEntry:
    """The zoo entry of a preset name or alias (``CRATE_base_demo`` works)."""
    try:
        key = resolve_name(name)
    except ValueError:
        key = name
    for entry in ZOO:
        if entry.name == key:
            return entry
    raise UserError(f"no checkpoint named {name!r} in the zoo; known: {', '.join(e.name for e in ZOO)}")


def zoo_rows() -> list[dict[str, Any]]:
    """The zoo as plain dicts (for JSON and tables)."""
    return [
        {
            "name": e.name,
            "title": e.title,
            "config": describe_config(e.config),
            "params": e.params,
            "trained_on": e.trained_on,
            "weights": e.weights,
            "family": e.family,
            "source": e.source,
            "note": e.note,
        }
        for e in ZOO
    ]
