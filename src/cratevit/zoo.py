"""The known CRATE and CRATE-alpha checkpoints: what each is, how it is built, what it was trained on, where it was
published (:data:`ZOO`, one entry per preset with weights), and every file the CRATE-alpha authors published on
the Hugging Face Hub (:data:`ALPHA_HUB_FILES`, loadable or not).

Nothing here downloads: the addresses are the authors' own publication places, and fetching a file is the user's
step (or ``load_checkpoint("hf-hub:...")``'s, which downloads through huggingface_hub's cache). Every file,
whatever its family (see :data:`cratevit.checkpoint.FAMILIES`), loads with ``cratevit.load_checkpoint(path)``;
``create_model(name, checkpoint=path)`` builds the named preset first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import UserError
from .models import CRATEConfig
from .presets import get_config, resolve_name
from .registry import family_for

__all__ = ["ALPHA_HUB_FILES", "ZOO", "HubFile", "ZooEntry", "count_params", "describe_config", "get_entry", "zoo_rows"]

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
    top1: str = ""  # reported ImageNet-1K top-1 and where the figure comes from

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
        "reference",
        note="the README's download link, reported unreachable since 2025 (CRATE issue #30); an ImageNet-1K "
        "checkpoint of the original main.py (weights under 'state_dict', keys prefixed 'module.'), the layout the "
        "official scripts read; a file with the finetune.py layout ('model', no prefix) loads the same way",
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


# --------------------------------------------------------------------------------------------- CRATE-alpha
# Every file of the Hub repository UCSC-VLAA/CRATE-alpha. Sizes: the byte counts of the Hub's Git LFS pointers
# (commits b327dc6, 24a8237, 01cd53a), or "~" and the Hub file listing's rounded size where no pointer was at hand.
# Accuracies: ImageNet-1K top-1 as the authors report them, with the table each figure comes from.
ALPHA_HUB_REPO = "UCSC-VLAA/CRATE-alpha"
ALPHA_REPO = "https://github.com/UCSC-VLAA/CRATE-alpha"
_README = "CRATE-alpha README (github.com/UCSC-VLAA/CRATE-alpha)"


@dataclass(frozen=True)
class HubFile:
    """One file the CRATE-alpha authors published in the Hub repository ``UCSC-VLAA/CRATE-alpha``."""

    path: str  # inside the Hub repository
    preset: str | None  # the cratevit preset that loads it; None: not loadable by cratevit
    size: str  # bytes, or "~" and the Hub listing's rounded size
    top1: float | None  # ImageNet-1K top-1 (%) as reported
    top1_source: str
    note: str = ""

    @property
    def size_text(self) -> str:
        return self.size if self.size.startswith("~") else f"{int(self.size):,} bytes"

    @property
    def address(self) -> str:
        return f"hf-hub:{ALPHA_HUB_REPO}/{self.path}"

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{ALPHA_HUB_REPO}/blob/main/{self.path}"


_PT = f"{_README}, PyTorch table"
_PAPER = f"{_README}, Experimental Results (paper, JAX)"
_JAX = "JAX (big_vision) parameters"
_CLIPA = "CRATE-alpha-CLIPA image-text model (zero-shot accuracy), another architecture"
_21K = "ImageNet-21K pre-training (19,167 classes); no ImageNet-1K accuracy reported"
_NOEXT = "; no file extension (its size fits the preset; its format is not verified here)"

ALPHA_HUB_FILES: tuple[HubFile, ...] = (
    HubFile("torch/crate_alpha_B16.pth", "crate_alpha_b16", "289348353", 81.2, _PT),
    HubFile("torch/crate_alpha_L14.pth", "crate_alpha_l14", "1014667009", 83.9, _PT),
    HubFile("torch/crate_alpha_CLIPA_L14.pth", None, "2560901931", 69.8, _PT, _CLIPA),
    HubFile("torch/crate_alpha_CLIPA_H14.pth", None, "3871721133", 72.3, _PT, _CLIPA),
    HubFile("torch/in21k_Pretrain/crate_alpha_B32_in21k.pth", "crate_alpha_b32_in21k", "351873409", None, "", _21K),
    HubFile("torch/in21k_Pretrain/crate_alpha_B16_IN21K", "crate_alpha_b16_in21k", "~345 MB", None, "", _21K + _NOEXT),
    HubFile("torch/in21k_Pretrain/crate_alpha_B8_IN21K", "crate_alpha_b8_in21k", "~345 MB", None, "", _21K + _NOEXT),
    HubFile("torch/in21k_Pretrain/crate_alpha_L32_in21k.pth", "crate_alpha_l32_in21k", "1098512714", None, "", _21K),
    HubFile("torch/in21k_Pretrain/crate_alpha_L14_IN21K", "crate_alpha_l14_in21k", "~1.09 GB", None, "", _21K + _NOEXT),
    HubFile("torch/in21k_Pretrain/crate_alpha_L8_IN21K", "crate_alpha_l8_in21k", "~1.09 GB", None, "", _21K + _NOEXT),
    HubFile("jax/crate_alpha_B16_in1k.npz", None, "723400850", 81.2, _PAPER, _JAX),
    HubFile("jax/crate_alpha_B8_in1k.npz", None, "723493010", 83.2, _PAPER, _JAX),
    HubFile("jax/crate_alpha_L14_in1k.npz", None, "2536725406", 83.9, _PAPER, _JAX),
    HubFile("jax/crate_alpha_L8_in1k.npz", None, "2538077086", 85.1, _PAPER, _JAX),
)
"""Every file of ``UCSC-VLAA/CRATE-alpha``: path, the preset that loads it (None: not loadable), size, reported top-1.
"""
# Not published as files: CRATE-alpha-B/32 (76.5) and L/32 (80.2) fine-tuned on ImageNet-1K (README table only).


def _alpha_entries() -> tuple[ZooEntry, ...]:
    titles = {"b": "CRATE-alpha-B", "l": "CRATE-alpha-L"}
    entries = []
    for f in ALPHA_HUB_FILES:
        if f.preset is None:
            continue
        size, patch = f.preset.split("_")[2][0], f.preset.split("_")[2][1:]
        in21k = f.preset.endswith("_in21k")
        entries.append(
            ZooEntry(
                f.preset,
                f"{titles[size]}/{patch}" + (" IN-21K" if in21k else ""),
                "ImageNet-21K (19,167 classes)" if in21k else "ImageNet-21K, then ImageNet-1K (1000 classes)",
                f.address,
                "reference-state-dict",
                source=ALPHA_REPO,
                note=f"{f.size_text}; {f.note}".rstrip("; "),
                top1=f"{f.top1} ({f.top1_source})" if f.top1 is not None else "",
            )
        )
    return tuple(entries)


ZOO = ZOO + _alpha_entries()
"""Every known checkpoint: the CRATE presets with released weights, then the CRATE-alpha files cratevit loads."""


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
            "top1": e.top1,
        }
        for e in ZOO
    ]
