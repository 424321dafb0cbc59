"""Coarse segmentation from attention and PCA, measured against ground-truth masks (the emergence paper's test).

For each image, a foreground mask is made at patch resolution

* from attention: the class token's attention to the patches at a layer (last by default), per head; DINO's mask
  keeps the patches carrying the top 60% of the attention mass. ``combine="mean"`` thresholds the head-averaged
  map; the per-head masks are scored as well, so the best head can be read off;
* from PCA: the first principal component of the image's patch features (sign fixed by the image border),

upsampled (nearest) to the ground-truth resolution and compared by IoU; the mean over images is the mIoU.

Works for CRATE (through :meth:`~cratevit.models.CRATE.forward_trace`) and for timm vision transformers (through
``timm.utils.AttentionExtract`` and ``forward_intermediates``), so a ViT baseline is measured the same way.
Ground truth: the built-in shapes data, or PASCAL VOC 2012 folders (``JPEGImages/``, ``SegmentationClass/``,
``ImageSets/Segmentation/val.txt``; label 0 is background, 255 is ignored).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..checkpoint import load_file, load_model
from ..errors import CheckpointError, UserError
from ..presets import IMAGENET_MEAN, IMAGENET_STD
from ..registry import is_autoencoder, is_family_model, trace_method
from .images import load_image, prepare
from .visualize import cls_attention, first_component_foreground, mass_mask, upsample

__all__ = [
    "SegEvalResult",
    "SegSample",
    "VOCSegmentationFolder",
    "attention_maps",
    "evaluate",
    "iou",
    "load_vision_model",
    "maps_and_features",
    "model_geometry",
    "multishapes_samples",
    "patch_features",
    "random_copy",
    "shapes_samples",
]


def iou(pred: np.ndarray, target: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """Intersection over union of two boolean masks (pixels where ``ignore`` is true do not count).

    Two empty masks agree perfectly (IoU 1).
    """
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape} vs ground truth {target.shape}")
    if ignore is not None:
        keep = ~np.asarray(ignore, bool)
        pred, target = pred[keep], target[keep]
    union = np.logical_or(pred, target).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, target).sum() / union)


# --------------------------------------------------------------------------------------------- model outputs
def _timm_grid(model: nn.Module, x: Tensor) -> tuple[int, int]:
    patch = model.patch_embed.patch_size
    return x.shape[-2] // patch[0], x.shape[-1] // patch[1]


def _timm_attention(model: nn.Module, x: Tensor, layer: int) -> Tensor:
    """Softmax attention (b, heads, n, n) of a timm ViT block: the fused kernel is switched off for this call
    and the attention dropout's input is captured (it is the softmax; dropout is inactive in eval mode)."""
    attn_module = model.blocks[layer % len(model.blocks)].attn
    captured: list[Tensor] = []
    fused = getattr(attn_module, "fused_attn", False)
    attn_module.fused_attn = False
    handle = attn_module.attn_drop.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        model(x)
    finally:
        handle.remove()
        attn_module.fused_attn = fused
    if not captured:
        raise UserError(f"could not read the attention of {type(model).__name__}; expected a timm VisionTransformer")
    return captured[0]


@torch.no_grad()
def _mae_layer(model: nn.Module, x: Tensor, layer: int, decoder: bool) -> Any:
    """One layer's trace of a CRATE-MAE on unmasked images: the encoder's, or with ``decoder`` the decoder's."""
    trace = model.forward_trace(x, encoder_layers=[] if decoder else [layer], decoder_layers=[layer] if decoder else [])
    return (trace.decoder if decoder else trace.encoder)[0], trace.grid_size


@torch.no_grad()
def attention_maps(model: nn.Module, x: Tensor, layer: int = -1, decoder: bool = False) -> Tensor:
    """The class token's attention to every patch at ``layer``: (b, heads, rows, cols). ``decoder``: a CRATE-MAE's
    decoder layer instead of its encoder layer."""
    if is_autoencoder(model):
        t, grid = _mae_layer(model, x, layer, decoder)
        return cls_attention(t.attn, grid)
    if decoder:
        raise UserError(f"--decoder needs a CRATE-MAE; this is a {type(model).__name__}")
    if is_family_model(model):
        trace = trace_method(model)(x, layers=[layer])
        return cls_attention(trace.layers[0].attn, trace.grid_size)
    attn = _timm_attention(model, x, layer)
    prefix = getattr(model, "num_prefix_tokens", 1)
    grid = _timm_grid(model, x)
    return attn[:, :, 0, prefix:].reshape(attn.shape[0], attn.shape[1], *grid)


@torch.no_grad()
def patch_features(model: nn.Module, x: Tensor, layer: int = -1, decoder: bool = False) -> Tensor:
    """Patch-token outputs of ``layer`` (for CRATE the ISTA output ``Z^{l+1}``): (b, rows, cols, dim).
    ``decoder``: a CRATE-MAE's decoder layer instead of its encoder layer."""
    if is_autoencoder(model):
        t, grid = _mae_layer(model, x, layer, decoder)
        return t.z_out[:, 1:].reshape(t.z_out.shape[0], *grid, t.z_out.shape[-1])
    if decoder:
        raise UserError(f"--decoder needs a CRATE-MAE; this is a {type(model).__name__}")
    if is_family_model(model):
        trace = trace_method(model)(x, layers=[layer])
        z = trace.layers[0].z_out[:, 1:]
        return z.reshape(z.shape[0], *trace.grid_size, z.shape[-1])
    depth = len(model.blocks)
    (feat,) = model.forward_intermediates(x, indices=[layer % depth], output_fmt="NCHW", intermediates_only=True)
    return feat.permute(0, 2, 3, 1)


def _pca_first_component(features: Tensor) -> np.ndarray:
    """Scores of the first principal component of one image's patch features (rows, cols, dim) -> (rows, cols)."""
    f = features.reshape(-1, features.shape[-1]).double()
    f = f - f.mean(0)
    _, _, vh = torch.linalg.svd(f, full_matrices=False)
    return (f @ vh[0]).reshape(features.shape[:2]).numpy()


def load_vision_model(spec: str, arch: str | None = None, heads: int | None = None) -> nn.Module:
    """A CRATE (checkpoint file or preset) or a timm ViT (a ``cratevit train --arch vit_...`` checkpoint, or a
    timm model name: random weights)."""
    path = Path(spec)
    if path.is_file() and path.suffix != ".safetensors":
        try:
            obj = load_file(path, mmap=True)  # mmap: only a timm file's tensors are ever read
        except CheckpointError:  # the CRATE loader below reports it clearly
            obj = None
        if isinstance(obj, dict) and obj.get("format") == "timm":
            return _timm_from_checkpoint(obj, path)
    elif not path.is_file():
        import timm

        if timm.is_model(spec) and not spec.lower().startswith("crate"):
            return timm.create_model(spec, pretrained=False)
    return load_model(spec, arch=arch, heads=heads)


def random_copy(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture with freshly initialised weights (seeded): a family's own ``build``, or a timm
    ViT's own initialisation (which leaves its norms alone, so those are reset here)."""
    import copy

    from ..registry import family_for

    torch.manual_seed(seed)
    if is_family_model(model):
        return family_for(model).build(model.config)
    fresh = copy.deepcopy(model)
    fresh.init_weights()
    for module in fresh.modules():
        if isinstance(module, nn.LayerNorm):
            module.reset_parameters()
    return fresh


def _timm_from_checkpoint(obj: dict[str, Any], path: Path) -> nn.Module:
    import timm

    state = dict(obj["model"])
    config = obj.get("train_config") or {}
    kwargs: dict[str, Any] = dict(config.get("model_kwargs") or {})  # e.g. the width/depth of a matched baseline
    if "head.weight" in state:
        kwargs["num_classes"] = state["head.weight"].shape[0]
    for ours, theirs in (("image_size", "img_size"), ("patch_size", "patch_size")):
        if config.get(ours) is not None:
            kwargs[theirs] = config[ours]
    model = timm.create_model(obj["arch"], pretrained=False, **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path}: the weights do not fit timm's {obj['arch']} ({str(e)[:200]})") from None
    from ..checkpoint import warn_non_finite

    warn_non_finite(state, path)
    return model


def model_geometry(model: nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    """(input size, patch size) of a CRATE or a timm ViT, as (height, width) pairs."""
    if is_family_model(model):
        return model.config.image_size, model.config.patch_size
    embed = model.patch_embed
    return tuple(embed.img_size), tuple(embed.patch_size)


# --------------------------------------------------------------------------------------------- datasets
@dataclass
class SegSample:
    """One image with its ground truth: foreground mask, the pixels to ignore and, where known, the class label
    of every pixel (0 background, 255 ignored)."""

    name: str
    image: Image.Image
    foreground: np.ndarray  # bool (H, W)
    ignore: np.ndarray | None = None  # bool (H, W)
    labels: np.ndarray | None = None  # int (H, W)


class VOCSegmentationFolder:
    """PASCAL VOC 2012 segmentation images of a split (``val`` by default) as foreground masks.

    ``root`` is the ``VOC2012`` folder (holding ``JPEGImages/``, ``SegmentationClass/`` and
    ``ImageSets/Segmentation/``) or a folder above it (``VOCdevkit/VOC2012`` is found).
    """

    def __init__(self, root: str | Path, split: str = "val", limit: int | None = None) -> None:
        self.root = self._find_root(Path(root))
        list_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"missing {list_file}: not a PASCAL VOC 2012 folder with the {split!r} split")
        self.ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()][:limit]
        if not self.ids:
            raise UserError(f"{list_file} lists no images")

    @staticmethod
    def _find_root(root: Path) -> Path:
        for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
            if (candidate / "JPEGImages").is_dir() and (candidate / "SegmentationClass").is_dir():
                return candidate
        raise FileNotFoundError(
            f"{root} is not a PASCAL VOC 2012 folder: expected JPEGImages/, SegmentationClass/ and "
            f"ImageSets/Segmentation/ in it (or in VOCdevkit/VOC2012 below it)"
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[SegSample]:
        for name in self.ids:
            image = load_image(self.root / "JPEGImages" / f"{name}.jpg")
            with Image.open(self.root / "SegmentationClass" / f"{name}.png") as seg:
                labels = np.asarray(seg if seg.mode in ("P", "L") else seg.convert("L"))
            yield SegSample(name, image, (labels != 0) & (labels != 255), labels == 255, labels)


def shapes_samples(split: str = "val", size: int = 200, image_size: int = 32, seed: int = 0) -> Iterator[SegSample]:
    """The built-in shapes data with its exact masks."""
    from ..data.shapes import ShapesDataset

    data = ShapesDataset(split=split, size=size, image_size=image_size, seed=seed)
    for i in range(len(data)):
        image, _, mask = data.sample(i)
        yield SegSample(f"{split}-{i:05d}", image, mask, labels=mask.astype(np.uint8))


def multishapes_samples(
    split: str = "val", size: int = 200, image_size: int = 48, seed: int = 0
) -> Iterator[SegSample]:
    """The built-in multi-shapes scenes (2-4 objects) as semantic ground truth: each pixel's label is its
    visible object's shape class + 1 (0: background)."""
    from ..data.multishapes import MultiShapesDataset

    data = MultiShapesDataset(split=split, size=size, image_size=image_size, seed=seed)
    for i in range(len(data)):
        image, scene = data[i]
        labels = np.zeros((image_size, image_size), np.uint8)
        for label, mask in zip(scene.labels, scene.masks, strict=True):
            labels[mask] = label + 1
        yield SegSample(f"{split}-{i:05d}", image, labels > 0, labels=labels)


# --------------------------------------------------------------------------------------------- evaluation
@dataclass
class SegEvalResult:
    """Per-image IoUs of each mask source; ``summary()`` gives the mIoUs."""

    names: list[str] = field(default_factory=list)
    attention: list[float] = field(default_factory=list)  # head-averaged attention map
    per_head: list[list[float]] = field(default_factory=list)  # (images, heads)
    pca: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        heads = np.asarray(self.per_head, dtype=np.float64).reshape(len(self.names), -1)
        per_head = heads.mean(0) if len(heads) else np.zeros(0)
        return {
            "num_images": len(self.names),
            "miou_attention": float(np.mean(self.attention)) if self.attention else float("nan"),
            "miou_pca": float(np.mean(self.pca)) if self.pca else float("nan"),
            "miou_per_head": [float(v) for v in per_head],
            "miou_best_head": float(per_head.max()) if len(per_head) else float("nan"),
            "best_head": int(per_head.argmax()) if len(per_head) else -1,
            **self.settings,
        }

    def per_image(self) -> list[dict[str, Any]]:
        return [
            {"image": n, "iou_attention": a, "iou_pca": p, "iou_heads": h}
            for n, a, p, h in zip(self.names, self.attention, self.pca, self.per_head, strict=True)
        ]


def _to_gt(mask: Tensor, shape: tuple[int, int]) -> np.ndarray:
    return upsample(mask.float(), shape).numpy() > 0.5


def maps_and_features(model: nn.Module, x: Tensor, layer: int = -1) -> tuple[Tensor, Tensor]:
    """Class-token attention maps (b, heads, rows, cols) and patch features (b, rows, cols, dim) of ``layer``
    (one traced forward pass for CRATE)."""
    if not is_family_model(model):
        return attention_maps(model, x, layer), patch_features(model, x, layer)
    with torch.no_grad():
        trace = trace_method(model)(x, layers=[layer])
    t = trace.layers[0]
    z = t.z_out[:, 1:]
    return cls_attention(t.attn, trace.grid_size), z.reshape(z.shape[0], *trace.grid_size, z.shape[-1])


def cratevit_scores(
    result: SegEvalResult, sample: SegSample, head_maps: Tensor, feat: Tensor, threshold: float
) -> None:
    """Append one image's IoUs (head-averaged attention, each head, PCA) to ``result``."""
    shape = sample.foreground.shape
    pca_mask = torch.from_numpy(first_component_foreground(_pca_first_component(feat)))
    result.names.append(sample.name)
    result.attention.append(
        iou(_to_gt(mass_mask(head_maps.mean(0), threshold), shape), sample.foreground, sample.ignore)
    )
    result.per_head.append(
        [iou(_to_gt(m, shape), sample.foreground, sample.ignore) for m in mass_mask(head_maps, threshold)]
    )
    result.pca.append(iou(_to_gt(pca_mask, shape), sample.foreground, sample.ignore))


def _batches(samples: Iterable[SegSample], size: int) -> Iterator[list[SegSample]]:
    batch: list[SegSample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def evaluate(
    model: nn.Module,
    samples: Iterable[SegSample],
    input_size: tuple[int, int],
    patch_size: tuple[int, int],
    layer: int = -1,
    threshold: float = 0.6,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> SegEvalResult:
    """mIoU of attention and PCA foreground masks over ``samples``; each image is resized to ``input_size``."""
    model.eval()
    result = SegEvalResult(settings={"layer": layer, "threshold": threshold, "input_size": list(input_size)})
    for batch in _batches(samples, batch_size):
        x = torch.stack(
            [prepare(s.image, input_size, patch_size, mode="model", mean=mean, std=std).tensor for s in batch]
        )
        maps, feats = maps_and_features(model, x, layer)
        for sample, head_maps, feat in zip(batch, maps, feats, strict=True):
            cratevit_scores(result, sample, head_maps, feat, threshold)
        if progress is not None:
            progress(len(result.names))
    if not result.names:
        raise UserError("no images to evaluate")
    return result
