"""The state behind the explore page: one model, the images opened in the page, the indexed image set, and the
actions the page calls (each returns a JSON-able dict; pictures are PNG data URIs). No web library here: the
Flask app in :mod:`cratevit.explore.app` only routes requests to an :class:`Explorer`."""

from __future__ import annotations

import base64
import io
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from ..analysis import inspection as insp
from ..analysis.images import Prepared, prepare, to_rgb
from ..analysis.visualize import colorize, overlay, to_uint8, upsample
from ..errors import UserError

__all__ = ["Explorer", "ImageItem", "Job", "builtin_samples", "data_samples"]

DISPLAY = 256  # longer side of the pictures in the page, pixels
MAX_PIXELS = 40_000_000  # larger uploads are refused with a message (decompression bombs included)
OPEN_IMAGES = 8  # images kept in memory (the page's recent uploads and samples)
INDEX_BUDGET = 256 * 2**20  # bytes of codes indexed for all layers at once; above it, one layer at a time
TRACE_BUDGET = 768 * 2**20  # bytes of attention matrices one opened image may hold (every layer and head)
SKIMAGE_SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "clock")


@dataclass
class ImageItem:
    name: str
    image: Image.Image  # RGB, as opened


def builtin_samples() -> list[ImageItem]:
    """scikit-image's sample photographs (they ship with the package: nothing downloads)."""
    from skimage import data

    return [ImageItem(name, to_rgb(Image.fromarray(getattr(data, name)()))) for name in SKIMAGE_SAMPLES]


def data_samples(data: str | None, count: int, image_size: int = 32) -> list[ImageItem]:
    """Held-out images of the built-in data a checkpoint was trained on (digits, shapes), else none."""
    if data == "digits":
        from ..data.digits import DigitsDataset

        ds = DigitsDataset("val", image_size=image_size)
        return [
            ImageItem(f"digit {ds.targets[i]} #{i}", Image.fromarray(to_uint8(ds.images[i, 0])).convert("RGB"))
            for i in range(min(count, len(ds)))
        ]
    if data == "shapes":
        from ..data.shapes import CLASSES, ShapesDataset

        ds = ShapesDataset("val", size=count, image_size=image_size, seed=0)
        items = []
        for i in range(len(ds)):
            image, label, _ = ds.sample(i)
            items.append(ImageItem(f"{CLASSES[label]} #{i}", image))
        return items
    return []


def png_uri(img: Image.Image | np.ndarray, display: int | None = DISPLAY, smooth: bool = False) -> str:
    """A PNG data URI, scaled so the longer side is ``display`` pixels (nearest neighbour unless ``smooth``)."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    if display:
        scale = display / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC if smooth else Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast: the page is local
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def read_upload(data: bytes, filename: str = "upload") -> Image.Image:
    """An uploaded file as an RGB image; anything else gets a one-line ``UserError`` for the page."""
    if not data:
        raise UserError(f"{filename}: the file is empty; choose an image file (PNG, JPEG, ...)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise UserError(
                    f"{filename}: {img.width}x{img.height} pixels is more than this page opens "
                    f"({MAX_PIXELS // 1_000_000} megapixels); scale it down first"
                )
            img = ImageOps.exif_transpose(img)
            img.load()
            return to_rgb(img)
    except UnidentifiedImageError:
        raise UserError(
            f"{filename} is not an image file this page can read; choose a PNG, JPEG or other image"
        ) from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UserError(
            f"{filename} is not an image this page can read ({reason}); choose a PNG, JPEG or other image"
        ) from None


@dataclass
class Job:
    """Long work running in a thread; the page polls :meth:`Explorer.job`."""

    id: str
    what: str
    done: int = 0
    total: int = 0
    state: str = "running"  # running | done | error
    message: str = ""
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "what": self.what, "done": self.done, "total": self.total, "state": self.state,
                "message": self.message, "seconds": round(self.seconds or time.perf_counter() - self.started, 3)}  # fmt: skip


@dataclass
class _Open:
    name: str
    prep: Prepared
    ins: insp.Inspection
    src: str  # the input picture
    curves: dict[str, list[float]]  # this image's per-layer R^c and sparsity


class Explorer:
    """One model and what the page has opened. Requests run in threads: opening images and interventions are
    serialised by a lock; the image-set index runs beside them in its own thread (a white-box forward pass keeps no
    state, and timm models, whose passes toggle hooks, have nothing to index)."""

    def __init__(
        self,
        model: nn.Module,
        name: str,
        mean: Sequence[float],
        std: Sequence[float],
        samples: Sequence[ImageItem],
        image_set: Sequence[ImageItem],
        class_names: Sequence[str] | None = None,
        image_set_label: str = "",
    ) -> None:
        self.model = model.eval()
        self.name = name
        self.family = insp.family_of(model)
        self.input_size, self.patch_size = self.family.geometry(model)
        self.depth, self.heads = self.family.depth(model), self.family.heads(model)
        self.dynamic = self.family.resizable(model)  # CRATE interpolates its positional embedding
        if self.dynamic:
            model.dynamic_img_size = True
        self.mean, self.std = tuple(mean), tuple(std)
        self.samples = {s.name: s for s in samples}
        self.image_set = list(image_set)
        self.image_set_label = image_set_label
        self.class_names = list(class_names) if class_names else None
        self.lock = threading.RLock()
        self.open: OrderedDict[str, _Open] = OrderedDict()
        self.jobs: dict[str, Job] = {}
        self.index: dict[int, insp.AtomIndex] = {}
        self.set_curves: dict[str, torch.Tensor] = {}
        self._set_inputs: list[Prepared] | None = None
        self._index_job: dict[int, str] = {}

    # ----------------------------------------------------------------------------------------------- info
    def info(self) -> dict[str, Any]:
        f = self.family
        return {
            "model": self.name,
            "family": insp.family_label(self.model),
            "depth": self.depth,
            "heads": self.heads,
            "facets": list(f.facets),
            "protocols": list(insp.MASK_PROTOCOLS),
            "has_code": f.has_code,
            "has_curves": f.has_subspaces or f.has_code,
            "input_size": list(self.input_size),
            "patch_size": list(self.patch_size),
            "resizable": self.dynamic,
            "samples": list(self.samples),
            "image_set": {"label": self.image_set_label, "images": len(self.image_set)},
            "classifier": bool(self.class_names),
        }

    # ----------------------------------------------------------------------------------------------- images
    def _prepare(self, image: Image.Image, short_side: int | None) -> Prepared:
        if self.dynamic:
            side = short_side or min(self.input_size)
            if not 8 <= side <= 1024:
                raise UserError(f"input size {side} is outside 8..1024 pixels; choose another size")
            return prepare(image, self.input_size, self.patch_size, "keep-aspect", side, self.mean, self.std)
        return prepare(image, self.input_size, self.patch_size, "model", None, self.mean, self.std)

    def _open(self, name: str, image: Image.Image, short_side: int | None) -> dict[str, Any]:
        prep = self._prepare(image, short_side)
        h, w = prep.input_size
        tokens = 1 + (h // self.patch_size[0]) * (w // self.patch_size[1])
        if self.depth * self.heads * tokens**2 * 4 > TRACE_BUDGET:
            raise UserError(
                f"a {w}x{h} input has {tokens} tokens: its attention maps ({self.depth} layers x {self.heads} heads) "
                f"would take {self.depth * self.heads * tokens**2 * 4 / 2**20:.0f} MB; choose a smaller input size"
            )
        with self.lock:
            ins = insp.inspect_model(self.model, prep.tensor[None])
            image_id = uuid.uuid4().hex[:12]
            curves = {k: [round(float(v), 4) for v in values[0]] for k, values in insp.image_curves(ins).items()}
            self.open[image_id] = item = _Open(name, prep, ins, png_uri(prep.image, smooth=True), curves)
            while len(self.open) > OPEN_IMAGES:
                self.open.popitem(last=False)
        return {"image_id": image_id, "name": name, "how": prep.how, "input_size": list(prep.input_size),
                "grid": list(ins.grid), "src": item.src}  # fmt: skip

    def open_sample(self, name: str, short_side: int | None = None) -> dict[str, Any]:
        if name not in self.samples:
            raise UserError(f"no sample image {name!r}; choose one of {', '.join(self.samples)}")
        return self._open(name, self.samples[name].image, short_side)

    def open_upload(self, data: bytes, filename: str, short_side: int | None = None) -> dict[str, Any]:
        return self._open(Path(filename).name or "upload", read_upload(data, filename or "upload"), short_side)

    def _get(self, image_id: str) -> _Open:
        item = self.open.get(image_id)
        if item is None:
            raise KeyError("this image is no longer open (the page keeps the last few); open it again")
        return item

    def _check_layer_head(self, layer: int, head: int | None) -> None:
        if not 0 <= layer < self.depth:
            raise UserError(f"layer {layer} is out of range; this model has layers 0..{self.depth - 1}")
        if head is not None and not 0 <= head < self.heads:
            raise UserError(f"head {head} is out of range; this model has heads 0..{self.heads - 1}")

    # ----------------------------------------------------------------------------------------------- the view
    def _heat(self, item: _Open, maps: torch.Tensor) -> Image.Image:
        """Overlay of a (rows, cols) map on the image the network saw."""
        return overlay(item.prep.image, upsample(maps.float(), item.prep.input_size).numpy())

    def _mask_picture(self, item: _Open, mask: torch.Tensor) -> Image.Image:
        m = upsample(mask.float(), item.prep.input_size).numpy() > 0.5
        shown = np.asarray(item.prep.image).copy()
        shown[~m] = (shown[~m] * 0.2).astype(np.uint8)
        return Image.fromarray(shown)

    def view(
        self,
        image_id: str,
        layer: int,
        head: int | None = None,
        facet: str = "key",
        threshold: float = 0.6,
        protocol: str = "mass",
    ) -> dict[str, Any]:
        """Everything the page shows for one image at (layer, head, facet, threshold, protocol)."""
        t0 = time.perf_counter()
        self._check_layer_head(layer, head)
        if facet not in self.family.facets:
            raise UserError(
                f"facet {facet!r} does not exist for this model; choose one of {', '.join(self.family.facets)}"
            )
        if protocol not in insp.MASK_PROTOCOLS:
            raise UserError(f"unknown mask protocol {protocol!r}; choose one of {', '.join(insp.MASK_PROTOCOLS)}")
        if not 0.0 < threshold <= 1.0:
            raise UserError(f"threshold {threshold} must lie in (0, 1]")
        item = self._get(image_id)
        ins = item.ins
        maps = insp.attention_map(ins, layer)[0]  # heads rows cols
        shown = maps.mean(0) if head is None else maps[head]
        mask = insp.segmentation_mask(ins, layer, protocol, threshold, head, facet)[0]
        rgb, first, ratio = insp.pca_rgb(insp.facet_features(ins, layer, facet)[0])
        rgb_up = upsample(torch.from_numpy(rgb).float().permute(2, 0, 1), item.prep.input_size).permute(1, 2, 0)
        probs = shown.flatten() / shown.sum()
        out: dict[str, Any] = {
            "image_id": image_id,
            "name": item.name,
            "layer": layer,
            "head": head,
            "facet": facet,
            "threshold": threshold,
            "protocol": protocol,
            "grid": list(ins.grid),
            "image": item.src,
            "attention": {
                "src": png_uri(self._heat(item, shown)),
                "heads": [png_uri(colorize(maps[k].numpy()), display=96) for k in range(maps.shape[0])],
                "max": float(shown.max()),
                "entropy": float(-(probs * probs.clamp_min(1e-12).log()).sum()),
            },
            "rollout": {"src": png_uri(self._heat(item, insp.rollout_map(ins, layer)[0]))},
            "mask": {"src": png_uri(self._mask_picture(item, mask)), "fraction": float(mask.float().mean())},
            "pca": {
                "src": png_uri((rgb_up.numpy() * 255).round().astype(np.uint8)),
                "first": png_uri(colorize(first)),
                "explained": [round(float(r), 4) for r in ratio],
            },
            "classes": self._classes(ins.logits),
            "curves": self._curves(item),
        }
        if self.family.has_code:
            out["atoms"] = insp.active_atoms(ins, layer, k=8)
        out["ms"] = round(1000 * (time.perf_counter() - t0), 1)
        return out

    def _classes(self, logits: torch.Tensor | None, k: int = 5) -> list[dict[str, Any]]:
        return [] if logits is None else insp.top_classes(logits[0], k, self.class_names)

    def _curves(self, item: _Open) -> dict[str, Any]:
        """Per-layer R^c and sparsity of this image and the image set's mean and std (the page draws them)."""
        mine = item.curves
        data = {
            name: {"mean": [round(float(v), 4) for v in values.mean(0)],
                   "std": [round(float(v), 4) for v in values.std(0, unbiased=False)]}
            for name, values in self.set_curves.items()
        }  # fmt: skip
        n_set = self.family.geometry(self.model)[0]
        set_tokens = item.ins.prefix + (n_set[0] // self.patch_size[0]) * (n_set[1] // self.patch_size[1])
        tokens = item.ins.prefix + item.ins.grid[0] * item.ins.grid[1]
        return {"image": mine, "image_set": data, "image_set_label": self.image_set_label, "tokens": tokens,
                "image_set_tokens": set_tokens}  # fmt: skip

    # ----------------------------------------------------------------------------------------------- jobs
    def job(self, job_id: str) -> dict[str, Any]:
        if job_id not in self.jobs:
            raise KeyError(f"no job {job_id}")
        return self.jobs[job_id].to_json()

    def _start(self, what: str, work: Callable[[Job], None]) -> Job:
        job = Job(uuid.uuid4().hex[:12], what)
        self.jobs[job.id] = job

        def run() -> None:
            try:
                work(job)
                job.state = "done"
            except Exception as e:  # reported in the page; the server keeps serving
                job.state, job.message = "error", f"{type(e).__name__}: {e}"
            job.seconds = time.perf_counter() - job.started

        threading.Thread(target=run, daemon=True, name=f"explore-{what}").start()
        return job

    def _set_tensors(self) -> torch.Tensor:
        if self._set_inputs is None:
            self._set_inputs = [
                prepare(s.image, self.input_size, self.patch_size, "model", None, self.mean, self.std)
                for s in self.image_set
            ]
        return torch.stack([p.tensor for p in self._set_inputs])

    def start_index(self, layer: int | None = None) -> dict[str, Any]:
        """Index the image set's codes (all layers when they fit in memory, else ``layer``) and its per-layer
        curves, in a thread; returns the job (the same job while one for that layer runs)."""
        if not (self.family.has_code or self.family.has_subspaces):
            raise UserError(f"a {self.family.name} model has no codes or subspaces to index")
        if not self.image_set:
            raise UserError("no image set to index; start the page with --images DIR")
        key = -1 if layer is None else layer
        running = self._index_job.get(key)
        if running and self.jobs[running].state == "running":
            return self.jobs[running].to_json()
        n_patches = (self.input_size[0] // self.patch_size[0]) * (self.input_size[1] // self.patch_size[1])
        cfg = getattr(self.model, "config", None)
        width = getattr(cfg, "code_dim", None) or getattr(cfg, "dim", 1024)  # the code's width
        per_layer = len(self.image_set) * (n_patches + 1) * width * 4
        layers = list(range(self.depth)) if per_layer * self.depth <= INDEX_BUDGET or layer is None else [layer]
        if layer is None and per_layer * self.depth > INDEX_BUDGET:
            layers = []  # curves only

        def work(job: Job) -> None:
            job.total = len(self.image_set)
            job.message = f"indexing {job.total} images ({self.image_set_label})"
            x = self._set_tensors()

            def progress(done: int, total: int) -> None:
                job.done, job.total = done, total

            index, curves = insp.index_atoms(self.model, x, layers or [0], batch_size=16, progress=progress)
            for i in layers:
                self.index[i] = index[i]
            if not self.set_curves:
                self.set_curves = curves
            job.message = f"indexed {job.total} images ({self.image_set_label})"

        job = self._start("index", work)
        self._index_job[key] = job.id
        return job.to_json()

    # ----------------------------------------------------------------------------------------------- atoms
    def atom(self, image_id: str, layer: int, coord: int, k: int = 12) -> dict[str, Any]:
        """Top patches of the image set, usage statistics and this image's activation map of one code coordinate;
        ``{"pending": job}`` while the layer is being indexed."""
        t0 = time.perf_counter()
        self._check_layer_head(layer, None)
        if not self.family.has_code:
            raise UserError(f"a {self.family.name} model has no sparse code, so no atoms")
        item = self._get(image_id)
        code = insp.facet_features(item.ins, layer, "code")[0]  # rows cols c
        if not 0 <= coord < code.shape[-1]:
            raise UserError(f"code coordinate {coord} is out of range; layer {layer} has 0..{code.shape[-1] - 1}")
        if layer not in self.index:
            return {"pending": self.start_index(layer)}
        index = self.index[layer]
        self._set_tensors()
        patches = []
        for p in insp.top_patches(index, coord, k):
            crop = insp.patch_crop(self._set_inputs[p["image"]].image, p["row"], p["col"], self.patch_size)
            patches.append({**p, "name": self.image_set[p["image"]].name, "src": png_uri(crop, display=72)})
        here = code[..., coord]
        return {
            "layer": layer,
            "coord": coord,
            "stats": insp.atom_stats(index, coord),
            "patches": patches,
            "here": {"src": png_uri(self._heat(item, here)), "max": float(here.max()), "active": int((here > 0).sum())},
            "ms": round(1000 * (time.perf_counter() - t0), 1),
        }

    def intervene(
        self, image_id: str, layer: int, coord: int, value: float = 0.0, head: int | None = None
    ) -> dict[str, Any]:
        """Clamp one code coordinate and rerun the later layers: classes and attention maps before and after."""
        t0 = time.perf_counter()
        self._check_layer_head(layer, head)
        if not np.isfinite(value):
            raise UserError(f"the clamp value must be a finite number, got {value}")
        item = self._get(image_id)
        with self.lock:
            result = insp.intervene(self.model, item.ins, layer, coord, value)
        later = []
        for later_layer in range(layer + 1, self.depth):
            a0 = insp.attention_map(item.ins, later_layer)[0]
            a1 = result.attention_map_after(later_layer)[0]
            s0, s1 = (a0.mean(0), a1.mean(0)) if head is None else (a0[head], a1[head])
            later.append({"layer": later_layer, "before": png_uri(self._heat(item, s0), display=128),
                          "after": png_uri(self._heat(item, s1), display=128),
                          "change": float((s1 - s0).abs().sum() / s0.abs().sum().clamp_min(1e-12))})  # fmt: skip
        before, after = item.ins.logits, result.logits
        out: dict[str, Any] = {
            "layer": layer,
            "coord": coord,
            "value": value,
            "classes_before": self._classes(before),
            "classes_after": self._classes(after),
            "later": later,
        }
        if before is not None and after is not None:
            top = int(before[0].argmax())
            out["top_class"] = {
                "index": top,
                "prob_before": float(before[0].softmax(-1)[top]),
                "prob_after": float(after[0].softmax(-1)[top]),
                "logit_change": float((after - before).abs().max()),
            }
        out["ms"] = round(1000 * (time.perf_counter() - t0), 1)
        return out
