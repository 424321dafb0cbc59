"""Every file the CRATE-alpha authors published on the Hugging Face Hub (repository ``UCSC-VLAA/CRATE-alpha``).

Sizes are the byte counts of the Hub's Git LFS pointers (commits b327dc6, 24a8237, 01cd53a) or, where no pointer
was at hand, the size the Hub's file listing shows (marked ``~``). Accuracies are ImageNet-1K top-1 as the authors
report them: the PyTorch table of the CRATE-alpha README for the two PyTorch classifiers (and the two CLIPA
models' zero-shot figures), the README's "Experimental Results" table (the paper's numbers, JAX) for the rest.
The IN-21K pre-training files have no reported ImageNet-1K accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ALPHA_HUB_REPO", "ALPHA_ZOO", "AlphaHubFile"]

ALPHA_HUB_REPO = "UCSC-VLAA/CRATE-alpha"
_README = "CRATE-alpha README (github.com/UCSC-VLAA/CRATE-alpha)"


@dataclass(frozen=True)
class AlphaHubFile:
    path: str  # inside the Hub repository
    preset: str | None  # the cratevit preset that loads it; None: not loadable by cratevit
    size: str  # bytes, or "~" and the Hub listing's rounded size
    top1: float | None  # ImageNet-1K top-1 (%) as reported
    top1_source: str
    note: str = ""

    @property
    def address(self) -> str:
        return f"hf-hub:{ALPHA_HUB_REPO}/{self.path}"

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{ALPHA_HUB_REPO}/blob/main/{self.path}"


_PT = f"{_README}, PyTorch table"
_PAPER = f"{_README}, Experimental Results (paper, JAX)"
_JAX = "JAX (big_vision) parameters: not loadable by cratevit"
_CLIPA = "CRATE-alpha-CLIPA image-text model (zero-shot accuracy): another architecture, not loadable by cratevit"
_21K = "ImageNet-21K pre-training (19,167 classes); no ImageNet-1K accuracy reported"
_NOEXT = "; the file name has no extension (a torch.save file all the same, by its size)"

ALPHA_ZOO: tuple[AlphaHubFile, ...] = (
    AlphaHubFile("torch/crate_alpha_B16.pth", "crate_alpha_b16", "289348353", 81.2, _PT),
    AlphaHubFile("torch/crate_alpha_L14.pth", "crate_alpha_l14", "1014667009", 83.9, _PT),
    AlphaHubFile("torch/crate_alpha_CLIPA_L14.pth", None, "2560901931", 69.8, _PT, _CLIPA),
    AlphaHubFile("torch/crate_alpha_CLIPA_H14.pth", None, "3871721133", 72.3, _PT, _CLIPA),
    AlphaHubFile("torch/in21k_Pretrain/crate_alpha_B32_in21k.pth", "crate_alpha_b32_in21k", "351873409", None, "", _21K),
    AlphaHubFile("torch/in21k_Pretrain/crate_alpha_B16_IN21K", "crate_alpha_b16_in21k", "~345 MB", None, "",
                 _21K + _NOEXT),
    AlphaHubFile("torch/in21k_Pretrain/crate_alpha_B8_IN21K", "crate_alpha_b8_in21k", "~345 MB", None, "",
                 _21K + _NOEXT),
    AlphaHubFile("torch/in21k_Pretrain/crate_alpha_L32_in21k.pth", "crate_alpha_l32_in21k", "1098512714", None, "",
                 _21K),
    AlphaHubFile("torch/in21k_Pretrain/crate_alpha_L14_IN21K", "crate_alpha_l14_in21k", "~1.09 GB", None, "",
                 _21K + _NOEXT),
    AlphaHubFile("torch/in21k_Pretrain/crate_alpha_L8_IN21K", "crate_alpha_l8_in21k", "~1.09 GB", None, "",
                 _21K + _NOEXT),
    AlphaHubFile("jax/crate_alpha_B16_in1k.npz", None, "723400850", 81.2, _PAPER, _JAX),
    AlphaHubFile("jax/crate_alpha_B8_in1k.npz", None, "723493010", 83.2, _PAPER, _JAX),
    AlphaHubFile("jax/crate_alpha_L14_in1k.npz", None, "2536725406", 83.9, _PAPER, _JAX),
    AlphaHubFile("jax/crate_alpha_L8_in1k.npz", None, "2538077086", 85.1, _PAPER, _JAX),
)  # fmt: skip
# Not published as files: CRATE-alpha-B/32 (76.5) and L/32 (80.2) fine-tuned on ImageNet-1K (README table only).
