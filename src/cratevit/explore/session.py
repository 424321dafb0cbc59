"""The state behind the explore page: one model, the images opened in the page, the indexed image set, and the
actions the page calls (each returns a JSON-able dict; pictures are PNG data URIs). No web library here: the
Flask app in :mod:`cratevit.explore.app` only routes requests to an :class:`Explorer`."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..analysis import inspection as insp
from ..analysis.images import Prepared, input_size_for, prepare, to_rgb
from ..analysis.layerwise import EPS
from ..analysis.visualize import to_uint8, upsample
from ..errors import UserError
from .colour import DIVERGING, SEQUENTIAL, Scale, heat_overlay, paint, stops
from .jobs import INDEX_BUDGET, Job
from .pictures import DISPLAY, histogram_json, png_uri
from .sae_view import SAE_DEFINITIONS, SAEActions
from .uploads import MAX_ASPECT, MAX_PIXELS, MAX_SIDE, UPLOAD_FORMATS, read_upload

__all__ = [
    "DEFINITIONS",
    "Explorer",
    "ImageItem",
    "Job",
    "builtin_samples",
    "data_samples",
]

CLAMP_LIMIT = 1000.0  # an intervention clamps a code coordinate to a value in [-CLAMP_LIMIT, CLAMP_LIMIT]
KEEP_JOBS = 16  # finished jobs kept for the page to poll; older ones are dropped
OPEN_IMAGES = 8  # images kept in memory (the page's recent uploads and samples)
TRACE_BUDGET = 768 * 2**20  # bytes of attention matrices one opened image may hold (every layer and head)
OPEN_BUDGET = 2 * TRACE_BUDGET  # bytes of traces all open images may hold; the oldest are dropped beyond it
SCALES = ("own", "shared")  # each map on its own colour scale, or one scale for the heads and before/after
SWEEP = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)  # clamp values of the sweep, in units of the atom's max here
SKIMAGE_SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "clock")


DEFINITIONS = {
    "layer": "layers are block indices, 0-based: 0 is the first block, depth-1 the last (as in timm's blocks.N)",
    "rc": "R^c, the compression term (nats): sum over heads k of 1/2 logdet(I + p/(n eps) Z_k^T Z_k), "
    f"Z_k = U_k^T LN(Z^l) the head's n x p token coordinates with each row scaled to unit length, eps = {EPS}; "
    "lower means the tokens are more compressed against the heads' subspaces. It grows with n: compare images "
    "with the same token count",
    "density": "code density: the fraction of the code's entries that are non-zero (sparsity = 1 - density)",
    "attention": "softmax attention of the query token (the class token, or the clicked patch) to each patch; "
    "a row sums to 1 over all tokens, the class token included",
    "entropy": "entropy (nats) of the shown map renormalised to sum to 1; log(patches) means uniform",
    "max": "largest attention weight of the shown map",
    "mask": "fraction of the patches the mask keeps",
    "pca": "explained variance ratio of the first three principal components of this image's patch features",
    "scale": "own: each map on its own colour scale from 0 to its maximum; shared: one scale for the chosen map and "
    "every head of the layer, and one for every before/after map of an intervention (before and after always "
    "share one)",
    "change": "sum |after - before| / sum |before| over the later layer's attention map",
    "difference": "after - before, on a scale symmetric about 0 (white: no change)",
    "sweep": "probability of the unedited top class when the coordinate is clamped to each value in every token "
    "(values in units of the coordinate's largest activation on this image)",
    "patch_frequency": "fraction of the image set's patch tokens where the coordinate is non-zero",
    "image_frequency": "fraction of the image set's images where it is non-zero on at least one patch",
    "usage_rank": "rank by patch frequency among the layer's code coordinates (0: the most used)",
    "dictionary": "the coordinate's column d of the layer's dictionary parameter (the direction it stands for) and the "
    "fraction of its energy in each head's subspace of the same layer, ||Q_k^T d||^2 / ||d||^2 with Q_k an "
    "orthonormal basis of head k's U_k (chance: p / dim)",
}
"""What each number of the page means (shown on hover); the page and ``docs/explore.md`` say the same."""


@dataclass
class ImageItem:
    """An image of the page: its name and the RGB picture as opened."""

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


@dataclass
class _Open:
    name: str
    prep: Prepared
    ins: insp.Inspection
    src: str  # the input picture
    curves: dict[str, list[float]]  # this image's per-layer R^c and sparsity

    @property
    def nbytes(self) -> int:
        """Memory held by the trace: every layer's attention and facets."""
        total = 0
        for r in self.ins.layers:
            for t in (r.attn, r.heads_key, r.z_in, r.z_half, *r.facets.values()):
                total += 0 if t is None else t.numel() * t.element_size()
        return total


class Explorer(SAEActions):
    """One model and what the page has opened. Requests run in threads: opening images and interventions are
    serialised by a lock; the image-set index runs beside them in its own thread (a white-box forward pass keeps no
    state, and timm models, whose passes toggle hooks, have nothing to index). ``trained=False`` marks a model with
    random weights: the page says so in its header."""

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
        trained: bool = True,
    ) -> None:
        self.model = model.eval()
        self.name = name
        self.trained = trained
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
        self._jobs_lock = threading.Lock()
        self.open: OrderedDict[str, _Open] = OrderedDict()
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.index: dict[int, insp.AtomIndex] = {}
        self.set_curves: dict[str, torch.Tensor] = {}
        self._set_inputs: list[Prepared] | None = None
        self._index_job: dict[int, str] = {}
        self._init_saes()

    # ----------------------------------------------------------------------------------------------- info
    def info(self) -> dict[str, Any]:
        f = self.family
        return {
            "model": self.name,
            "family": insp.family_label(self.model),
            "weights": "trained" if self.trained else "random weights",
            "depth": self.depth,
            "heads": self.heads,
            "facets": list(f.facets),
            "protocols": list(insp.MASK_PROTOCOLS),
            "scales": list(SCALES),
            "has_code": f.has_code,
            "has_curves": f.has_subspaces or f.has_code,
            "input_size": list(self.input_size),
            "patch_size": list(self.patch_size),
            "resizable": self.dynamic,
            "samples": list(self.samples),
            "image_set": {"label": self.image_set_label, "images": len(self.image_set)},
            "classifier": bool(self.class_names),
            "definitions": {**DEFINITIONS, **SAE_DEFINITIONS},
            "saes": [{"sae": i, **s.describe()} for i, s in enumerate(self.saes)],
            "colormaps": {SEQUENTIAL: stops(SEQUENTIAL), DIVERGING: stops(DIVERGING)},
            "limits": {
                "max_side": MAX_SIDE,
                "max_aspect": MAX_ASPECT,
                "max_pixels": MAX_PIXELS,
                "formats": list(UPLOAD_FORMATS),
                "clamp": [-CLAMP_LIMIT, CLAMP_LIMIT],
            },
        }

    # ----------------------------------------------------------------------------------------------- images
    def _input_size(self, size: tuple[int, int], short_side: int | None) -> tuple[int, int]:
        """The network input (height, width) for an image of ``size`` (height, width), without resizing it."""
        if not self.dynamic:
            return self.input_size
        side = short_side or min(self.input_size)
        if not 8 <= side <= 1024:
            raise UserError(f"input size {side} is outside 8..1024 pixels; choose another size")
        return input_size_for(size, self.patch_size, self.input_size, "keep-aspect", side)

    def _check_tokens(self, size: tuple[int, int], short_side: int | None) -> None:
        """Refuse an input whose attention maps would not fit :data:`TRACE_BUDGET` (before any resize)."""
        h, w = self._input_size(size, short_side)
        tokens = 1 + (h // self.patch_size[0]) * (w // self.patch_size[1])
        if self.depth * self.heads * tokens**2 * 4 > TRACE_BUDGET:
            raise UserError(
                f"a {w}x{h} input has {tokens} tokens: its attention maps ({self.depth} layers x {self.heads} heads) "
                f"would take {self.depth * self.heads * tokens**2 * 4 / 2**20:.0f} MB; choose a smaller input size"
            )

    def _open(self, name: str, image: Image.Image, short_side: int | None) -> dict[str, Any]:
        self._check_tokens((image.height, image.width), short_side)
        if self.dynamic:
            side = short_side or min(self.input_size)
            prep = prepare(image, self.input_size, self.patch_size, "keep-aspect", side, self.mean, self.std)
        else:
            prep = prepare(image, self.input_size, self.patch_size, "model", None, self.mean, self.std)
        with self.lock:
            ins = insp.inspect_model(self.model, prep.tensor[None])
            image_id = uuid.uuid4().hex[:12]
            curves = {k: [round(float(v), 4) for v in values[0]] for k, values in insp.image_curves(ins).items()}
            self.open[image_id] = item = _Open(name, prep, ins, png_uri(prep.image, smooth=True), curves)
            while len(self.open) > OPEN_IMAGES or (
                len(self.open) > 1 and sum(o.nbytes for o in self.open.values()) > OPEN_BUDGET
            ):
                self.open.popitem(last=False)  # the oldest image: the page asks to open it again
        return {"image_id": image_id, "name": name, "how": prep.how, "input_size": list(prep.input_size),
                "grid": list(ins.grid), "src": item.src}  # fmt: skip

    def open_sample(self, name: str, short_side: int | None = None) -> dict[str, Any]:
        if name not in self.samples:
            raise UserError(f"no sample image {name!r}; choose one of {', '.join(self.samples)}")
        return self._open(name, self.samples[name].image, short_side)

    def open_upload(self, data: bytes, filename: str, short_side: int | None = None) -> dict[str, Any]:
        """Open an uploaded file: its header's size and the token count are checked before it is decoded."""
        name = Path(filename).name or "upload"
        image = read_upload(data, name, check=lambda w, h: self._check_tokens((h, w), short_side))
        return self._open(name, image, short_side)

    def _get(self, image_id: str) -> _Open:
        item = self.open.get(image_id)
        if item is None:
            raise KeyError("this image is no longer open (the page keeps the last few); open it again")
        return item

    def _check_layer_head(self, layer: int, head: int | None) -> None:
        if not 0 <= layer < self.depth:
            raise UserError(
                f"layer {layer} is out of range; this model has layers 0..{self.depth - 1} (block indices, 0-based)"
            )
        if head is not None and not 0 <= head < self.heads:
            raise UserError(f"head {head} is out of range; this model has heads 0..{self.heads - 1}")

    def _check_scale(self, scale: str) -> None:
        if scale not in SCALES:
            raise UserError(f"unknown colour scale {scale!r}; choose one of {', '.join(SCALES)}")

    # ----------------------------------------------------------------------------------------------- the view
    def _heat(self, item: _Open, values: torch.Tensor, scale: Scale, display: int = DISPLAY, **kw: Any) -> str:
        """A (rows, cols) map over the image the network saw, on ``scale``, as a data URI."""
        return png_uri(heat_overlay(item.prep.image, values, scale, **kw), display=display)

    def _mask_picture(self, item: _Open, mask: torch.Tensor) -> Image.Image:
        m = upsample(mask.float(), item.prep.input_size).numpy() > 0.5
        shown = np.asarray(item.prep.image).copy()
        shown[~m] = (shown[~m] * 0.2).astype(np.uint8)
        return Image.fromarray(shown)

    def _query_rows(self, item: _Open, layer: int, query: int | None) -> torch.Tensor:
        """Attention of one query token to the patches at ``layer``: (heads, rows, cols); ``query`` is a patch
        index (row-major) or None for the class token."""
        ins = item.ins
        rows, cols = ins.grid
        if query is None:
            return insp.attention_map(ins, layer)[0]
        if not 0 <= query < rows * cols:
            raise UserError(f"query patch {query} is out of range; this image has patches 0..{rows * cols - 1}")
        attn = ins.layer(layer).attn
        if attn is None:
            raise UserError(f"layer {layer} recorded no attention")
        return attn[0, :, ins.prefix + query, ins.prefix :].reshape(-1, rows, cols)

    def view(
        self,
        image_id: str,
        layer: int,
        head: int | None = None,
        facet: str = "key",
        threshold: float = 0.6,
        protocol: str = "mass",
        query: int | None = None,
        scale: str = "own",
    ) -> dict[str, Any]:
        """Everything the page shows for one image at (layer, head, facet, threshold, protocol); ``query``: the
        attention from that patch instead of the class token; ``scale``: one of :data:`SCALES`."""
        t0 = time.perf_counter()
        self._check_layer_head(layer, head)
        if facet not in self.family.facets:
            raise UserError(
                f"facet {facet!r} does not exist for this model; choose one of {', '.join(self.family.facets)}"
            )
        if protocol not in insp.MASK_PROTOCOLS:
            raise UserError(f"unknown mask protocol {protocol!r}; choose one of {', '.join(insp.MASK_PROTOCOLS)}")
        self._check_scale(scale)
        if not 0.0 < threshold <= 1.0:
            raise UserError(f"threshold {threshold} must lie in (0, 1]")
        item = self._get(image_id)
        ins = item.ins
        maps = self._query_rows(item, layer, query)  # heads rows cols
        shown = maps.mean(0) if head is None else maps[head]
        shared = Scale.from_zero([*maps, shown])
        main = shared if scale == "shared" else Scale.from_zero([shown])
        head_scales = [shared if scale == "shared" else Scale.from_zero([m]) for m in maps]
        cols = ins.grid[1]
        mark = None if query is None else (query // cols, query % cols, self.patch_size)
        mask = insp.segmentation_mask(ins, layer, protocol, threshold, head, facet)[0]
        rgb, first, ratio = insp.pca_rgb(insp.facet_features(ins, layer, facet)[0])
        rgb_up = upsample(torch.from_numpy(rgb).float().permute(2, 0, 1), item.prep.input_size).permute(1, 2, 0)
        full = ins.layer(layer).attn[0]
        pattern = full.mean(0) if head is None else full[head]  # query x key, every token
        pattern_scale = Scale.from_zero([pattern])
        rollout = insp.rollout_map(ins, layer)[0]
        probs = shown.flatten() / shown.sum()
        out: dict[str, Any] = {
            "image_id": image_id,
            "name": item.name,
            "layer": layer,
            "head": head,
            "facet": facet,
            "threshold": threshold,
            "protocol": protocol,
            "scale": scale,
            "query": None if query is None else {"patch": query, "row": query // cols, "col": query % cols},
            "grid": list(ins.grid),
            "image": item.src,
            "attention": {
                "src": self._heat(item, shown, main, mark=mark),
                "scale": main.to_json(),
                "heads": [
                    {"src": png_uri(paint(m, s), display=96), "scale": s.to_json()}
                    for m, s in zip(maps, head_scales, strict=True)
                ],
                "values": [[round(float(v), 6) for v in row] for row in shown],
                "max": float(shown.max()),
                "entropy": float(-(probs * probs.clamp_min(1e-12).log()).sum()),
            },
            "pattern": {
                "src": png_uri(paint(pattern, pattern_scale)),
                "scale": pattern_scale.to_json(),
                "tokens": int(pattern.shape[0]),
                "prefix": ins.prefix,
            },
            "rollout": {
                "src": self._heat(item, rollout, Scale.from_zero([rollout])),
                "scale": Scale.from_zero([rollout]).to_json(),
            },
            "mask": {"src": png_uri(self._mask_picture(item, mask)), "fraction": float(mask.float().mean())},
            "pca": {
                "src": png_uri((rgb_up.numpy() * 255).round().astype(np.uint8)),
                "first": png_uri(paint(first, Scale(float(first.min()), float(first.max())))),
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
        job = self.jobs.get(job_id)
        if job is None:
            raise KeyError(f"no job {job_id} (finished jobs are dropped after {KEEP_JOBS} newer ones)")
        return job.to_json()

    def _remember(self, job: Job) -> None:
        """Keep ``job`` and drop the oldest finished jobs beyond :data:`KEEP_JOBS`."""
        with self._jobs_lock:
            self.jobs[job.id] = job
            finished = [k for k, j in self.jobs.items() if j.state != "running"]
            for k in finished[: max(0, len(self.jobs) - KEEP_JOBS)]:
                del self.jobs[k]

    def _start(self, what: str, work: Callable[[Job], None]) -> Job:
        job = Job(uuid.uuid4().hex[:12], what)
        self._remember(job)

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

    def start_index(self, layer: int | None = None, rebuild: bool = False) -> dict[str, Any]:
        """Index the image set's codes (all layers when they fit in memory, else ``layer``) and its per-layer
        curves, in a thread; returns the job (the same job while one for that layer runs). An image set is indexed
        once: later calls return a finished job at once unless ``rebuild``."""
        if not (self.family.has_code or self.family.has_subspaces):
            raise UserError(f"a {self.family.name} model has no codes or subspaces to index")
        if not self.image_set:
            raise UserError("no image set to index; start the page with --images DIR")
        if layer is not None:
            self._check_layer_head(layer, None)
        key = -1 if layer is None else layer
        running = self._index_job.get(key)
        if running and running in self.jobs and self.jobs[running].state == "running":
            return self.jobs[running].to_json()
        n_patches = (self.input_size[0] // self.patch_size[0]) * (self.input_size[1] // self.patch_size[1])
        cfg = getattr(self.model, "config", None)
        width = getattr(cfg, "code_dim", None) or getattr(cfg, "dim", 1024)  # the code's width
        per_layer = len(self.image_set) * (n_patches + 1) * width * 4
        layers = list(range(self.depth)) if per_layer * self.depth <= INDEX_BUDGET or layer is None else [layer]
        if layer is None and per_layer * self.depth > INDEX_BUDGET:
            layers = []  # curves only
        if not self.family.has_code:
            layers = []
        n = len(self.image_set)
        if not rebuild and self.set_curves and all(i in self.index for i in layers):
            done = Job(uuid.uuid4().hex[:12], "index", n, n, "done", f"already indexed: {n} images "
                       f"({self.image_set_label}); ask for a rebuild to index again", seconds=1e-6)  # fmt: skip
            self._remember(done)
            return done.to_json()

        def work(job: Job) -> None:
            job.total = n
            job.message = f"indexing {job.total} images ({self.image_set_label})"
            x = self._set_tensors()

            def progress(done: int, total: int) -> None:
                job.done, job.total = done, total

            if self.family.has_code:
                index, curves = insp.index_atoms(self.model, x, layers or [0], batch_size=16, progress=progress)
            else:  # subspaces only: the curves
                index, curves = {}, self._curves_only(x, progress)
            for i in layers:
                self.index[i] = index[i]
            if rebuild or not self.set_curves:
                self.set_curves = curves
            job.message = f"indexed {job.total} images ({self.image_set_label})"

        job = self._start("index", work)
        self._index_job[key] = job.id
        return job.to_json()

    def _curves_only(self, x: torch.Tensor, progress: Callable[[int, int], None]) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        for done, batch in enumerate(x.split(16)):
            with torch.no_grad():
                for name, value in insp.image_curves(insp.inspect_model(self.model, batch)).items():
                    parts.setdefault(name, []).append(value)
            progress(min(len(x), 16 * (done + 1)), len(x))
        return {name: torch.cat(v) for name, v in parts.items()}

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
        scale = Scale.from_zero([here])
        return {
            "layer": layer,
            "coord": coord,
            "dictionary": self._dictionary_column(layer, coord),
            "stats": insp.atom_stats(index, coord),
            "patches": patches,
            "histogram": histogram_json(index.codes[..., coord]),
            "here": {
                "src": self._heat(item, here, scale),
                "scale": scale.to_json(),
                "max": float(here.max()),
                "active": int((here > 0).sum()),
            },
            "ms": round(1000 * (time.perf_counter() - t0), 1),
        }

    def _dictionary_column(self, layer: int, coord: int) -> dict[str, Any] | None:
        """Column ``coord`` of the layer's dictionary parameter (``blocks.{layer}.*dictionary``, its second axis the
        code's), its norm, and the fraction of its energy in each head's subspace of the same layer,
        ``||Q_k^T d||^2 / ||d||^2`` with ``Q_k`` an orthonormal basis of the rows of head k's ``subspace_proj``
        (chance: ``p / dim``). None for a model without one (a timm ViT)."""
        params = dict(self.model.named_parameters())
        prefix = f"blocks.{layer}."
        names = [n for n in params if n.startswith(prefix) and n.endswith("dictionary")]
        if len(names) != 1 or params[names[0]].ndim != 2 or not coord < params[names[0]].shape[1]:
            return None
        col = params[names[0]].detach()[:, coord].double()
        out: dict[str, Any] = {"name": f"{names[0]}[:, {coord}]", "values": [round(float(v), 5) for v in col],
                               "norm": float(col.norm())}  # fmt: skip
        proj = [n for n in params if n.startswith(prefix) and n.endswith("subspace_proj.weight")]
        if len(proj) == 1 and params[proj[0]].shape[1] == col.numel():
            u = params[proj[0]].detach().double().reshape(self.heads, -1, col.numel())  # heads p dim
            energy = col.pow(2).sum().clamp_min(1e-300)
            bases = [torch.linalg.qr(u[k].T).Q for k in range(self.heads)]  # dim p, orthonormal columns
            out["head_energy"] = [float((q.T @ col).pow(2).sum() / energy) for q in bases]
            out["chance"] = u.shape[1] / col.numel()
            out["subspaces"] = proj[0]
        return out

    def _check_clamp(self, layer: int, head: int | None, value: float) -> None:
        self._check_layer_head(layer, head)
        if not np.isfinite(value):
            raise UserError(f"the clamp value must be a finite number, got {value}")
        if not -CLAMP_LIMIT <= value <= CLAMP_LIMIT:
            raise UserError(
                f"clamp value {value:g} is out of range; choose a value in {-CLAMP_LIMIT:g}..{CLAMP_LIMIT:g}"
            )

    def intervene(
        self, image_id: str, layer: int, coord: int, value: float = 0.0, head: int | None = None, scale: str = "own"
    ) -> dict[str, Any]:
        """Clamp one code coordinate and rerun the later layers: classes and attention maps before and after (on
        one colour scale per layer, or one for all with ``scale="shared"``) and their difference."""
        t0 = time.perf_counter()
        self._check_clamp(layer, head, value)
        self._check_scale(scale)
        item = self._get(image_id)
        with self.lock:
            result = insp.intervene(self.model, item.ins, layer, coord, value)
        pairs = []
        for later_layer in range(layer + 1, self.depth):
            a0 = insp.attention_map(item.ins, later_layer)[0]
            a1 = result.attention_map_after(later_layer)[0]
            pairs.append((later_layer, *((a0.mean(0), a1.mean(0)) if head is None else (a0[head], a1[head]))))
        out: dict[str, Any] = {"layer": layer, "coord": coord, "value": value, "head": head}
        out.update(self._effect(item, pairs, scale, item.ins.logits, result.logits))
        out["ms"] = round(1000 * (time.perf_counter() - t0), 1)
        return out

    def _effect(
        self,
        item: _Open,
        pairs: Sequence[tuple[int, torch.Tensor, torch.Tensor]],
        scale: str,
        before: torch.Tensor | None,
        after: torch.Tensor | None,
    ) -> dict[str, Any]:
        """What an edit did: top classes before and after, the unedited top class's probability and the largest
        logit change, and per later layer (``pairs``: layer, map before, map after) the before/after maps on one
        scale (``scale``: one of :data:`SCALES`) and their difference on a symmetric one."""
        every = [m for _, s0, s1 in pairs for m in (s0, s1)]
        diffs = [s1 - s0 for _, s0, s1 in pairs]
        later = []
        for (later_layer, s0, s1), d in zip(pairs, diffs, strict=True):
            sc = Scale.from_zero(every) if scale == "shared" else Scale.from_zero([s0, s1])
            dsc = Scale.symmetric(diffs) if scale == "shared" else Scale.symmetric([d])
            later.append({"layer": later_layer, "before": self._heat(item, s0, sc, 128),
                          "after": self._heat(item, s1, sc, 128), "difference": self._heat(item, d, dsc, 128, alpha=0.75),
                          "scale": sc.to_json(),
                          "difference_scale": dsc.to_json(),
                          "change": float((s1 - s0).abs().sum() / s0.abs().sum().clamp_min(1e-12))})  # fmt: skip
        out: dict[str, Any] = {
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
        return out

    def sweep(self, image_id: str, layer: int, coord: int) -> dict[str, Any]:
        """The unedited top class's probability with the coordinate clamped to each of :data:`SWEEP` times its
        largest activation on this image (1 where it is silent here)."""
        t0 = time.perf_counter()
        self._check_layer_head(layer, None)
        item = self._get(image_id)
        if item.ins.logits is None:
            raise UserError("this model has no classifier, so there is no class probability to sweep")
        if not self.family.has_code:
            raise UserError(f"a {self.family.name} model has no sparse code to clamp")
        code = insp.facet_features(item.ins, layer, "code")[0]
        if not 0 <= coord < code.shape[-1]:
            raise UserError(f"code coordinate {coord} is out of range; layer {layer} has 0..{code.shape[-1] - 1}")
        peak = float(code[..., coord].max())
        unit = peak if peak > 0 else 1.0
        before = item.ins.logits[0].softmax(-1)
        top = int(before.argmax())
        values, probs = [], []
        for factor in SWEEP:
            value = min(factor * unit, CLAMP_LIMIT)
            with self.lock:
                result = insp.intervene(self.model, item.ins, layer, coord, value)
            values.append(value)
            probs.append(float(result.logits[0].softmax(-1)[top]))
        name = self.class_names[top] if self.class_names else f"class {top}"
        return {"layer": layer, "coord": coord, "values": values, "prob": probs, "class": name,
                "prob_before": float(before[top]), "peak_here": peak,
                "ms": round(1000 * (time.perf_counter() - t0), 1)}  # fmt: skip
