"""The explore page's "SAE features" panel: sparse-autoencoder features beside the ISTA atoms, as actions of the
:class:`~cratevit.explore.session.Explorer` (this mixin; the computations are
:mod:`cratevit.analysis.sae_features`'). Each action returns a JSON-able dict, as the atom actions do:

* :meth:`SAEActions.sae_features`: the SAE's features ordered by their total activation on an open image;
* :meth:`SAEActions.sae_feature`: one feature's activation map on the image, its top patches and usage over the
  indexed image set (``{"pending": job}`` while the set is indexed, in the page's job system), its decoder
  direction's nearest ISTA atoms by cosine, and the SAE's L0, FVE and dead fraction on the set;
* :meth:`SAEActions.sae_clamp`: the feature clamped at the hook point with the error term kept, the prediction and
  the later layers' attention before and after, as the atom intervention shows them.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from ..analysis import inspection as insp
from ..analysis import sae_features as sf
from ..errors import UserError
from .colour import Scale
from .jobs import INDEX_BUDGET, Job
from .pictures import histogram_json, png_uri

__all__ = ["SAE_DEFINITIONS", "SAEActions"]

SAE_DEFINITIONS = {
    "sae": "a sparse autoencoder trained after the fact on one hook point of this model (cratevit sae train): "
    "f = relu(E (s x - b_dec) + b_enc) (TopK keeps the k largest), x_hat = (D f + b_dec) / s; a feature is a "
    "coordinate of f, its direction the column D[:, i]",
    "sae_l0": "L0: mean number of non-zero SAE features per patch token of the indexed image set",
    "sae_fve": "FVE: fraction of variance explained, 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the patch "
    "tokens of the indexed image set (1: a perfect reconstruction)",
    "sae_dead": "dead fraction: the fraction of the SAE's features that are zero on every patch token of the "
    "indexed image set",
    "feature_frequency": "firing frequency: the fraction of the image set's patch tokens where the feature is non-zero",
    "feature_mean": "mean activation of the feature over all patch tokens of the image set (zeros included); "
    "'when active' averages only where it fires",
    "nearest_atoms": "cosine between the feature's decoder direction D_sae[:, i] and each ISTA atom of the same "
    "layer: the columns of blocks.l.ista.dictionary for an SAE on blocks.l.norm2 (the signal the dictionary "
    "reconstructs), the code's axes for an SAE on blocks.l.ista.code; click one to open the atom",
    "sae_clamp": "the feature set to the value on every patch token at the hook point, the error term kept: "
    "x' = x + x_hat(f with f_i = v) - x_hat(f), so an unedited feature leaves the forward unchanged; the network "
    "runs on from there",
}
"""What each number of the SAE panel means (merged into the page's hover definitions)."""


class SAEActions:
    """The SAE panel's actions, mixed into :class:`~cratevit.explore.session.Explorer` (which provides the model,
    the open images, the image set, the job system and the picture helpers used here)."""

    saes: list[sf.LoadedSAE]
    sae_index: dict[int, sf.FeatureIndex]

    def _init_saes(self) -> None:
        self.saes = []
        self.sae_index = {}
        self._sae_codes: dict[tuple[str, int], torch.Tensor] = {}
        self._sae_jobs: dict[int, str] = {}
        self._sae_lock = threading.Lock()

    def add_sae(self, path: str | Path) -> sf.LoadedSAE:
        """Load an SAE checkpoint for this model (checked: :func:`~cratevit.analysis.sae_features.load_sae_for`)."""
        loaded = sf.load_sae_for(path, self.model, self.name, self.input_size)
        self.saes.append(loaded)
        return loaded

    def _sae(self, sae: int) -> sf.LoadedSAE:
        if not self.saes:
            raise UserError("no SAE is loaded; start the page with --sae SAE_CKPT (written by `cratevit sae train`)")
        if not 0 <= sae < len(self.saes):
            raise UserError(f"SAE {sae} is out of range; this page has SAEs 0..{len(self.saes) - 1}")
        return self.saes[sae]

    def _check_feature(self, s: sf.LoadedSAE, feature: int) -> None:
        if not 0 <= feature < s.features:
            raise UserError(f"SAE feature {feature} is out of range; this SAE has features 0..{s.features - 1}")

    def _codes_here(self, image_id: str, sae: int) -> torch.Tensor:
        """The SAE's code on an open image's patches, (rows, cols, F), computed once per image."""
        item = self._get(image_id)
        key = (image_id, sae)
        with self._sae_lock:
            for k in [k for k in self._sae_codes if k[0] not in self.open]:  # images no longer open
                del self._sae_codes[k]
            if key not in self._sae_codes:
                s = self.saes[sae]
                with self.lock:
                    tokens = sf.site_tokens(self.model, s, item.prep.tensor[None])
                self._sae_codes[key] = sf.feature_codes(s, tokens, item.ins.grid)[0]
            return self._sae_codes[key]

    def sae_features(self, image_id: str, sae: int, k: int = 12) -> dict[str, Any]:
        """The SAE and its ``k`` features with the largest total activation on this image's patches."""
        t0 = time.perf_counter()
        s = self._sae(sae)
        codes = self._codes_here(image_id, sae).flatten(0, 1)  # patches F
        total = codes.sum(0)
        values, idx = total.topk(min(k, total.numel()))
        top = [
            {
                "feature": int(j),
                "total": float(v),
                "max": float(codes[:, j].max()),
                "patches": int((codes[:, j] > 0).sum()),
            }
            for v, j in zip(values, idx, strict=True)
            if v > 0
        ]
        return {"sae": sae, **s.describe(), "features_here": top, "active_here": int((total > 0).sum()),
                "metrics": self.sae_index[sae].metrics if sae in self.sae_index else None,
                "ms": round(1000 * (time.perf_counter() - t0), 1)}  # fmt: skip

    def start_sae_index(self, sae: int, rebuild: bool = False) -> dict[str, Any]:
        """Index the image set's SAE codes in a thread (the page's job system); the running job while one runs, a
        finished one at once when indexed unless ``rebuild``. Images beyond the memory budget are left out."""
        s = self._sae(sae)
        if not self.image_set:
            raise UserError("no image set to index; start the page with --images DIR")
        running = self._sae_jobs.get(sae)
        if running and running in self.jobs and self.jobs[running].state == "running":
            return self.jobs[running].to_json()
        grid = (self.input_size[0] // self.patch_size[0], self.input_size[1] // self.patch_size[1])
        per_image = grid[0] * grid[1] * s.features * 4
        n = max(1, min(len(self.image_set), INDEX_BUDGET // per_image))
        label = self.image_set_label + ("" if n == len(self.image_set) else f" (the first {n}: the memory budget)")
        if not rebuild and sae in self.sae_index:
            done = Job(uuid.uuid4().hex[:12], "sae_index", n, n, "done", f"already indexed: {n} images ({label})",
                       seconds=1e-6)  # fmt: skip
            self._remember(done)
            return done.to_json()

        def work(job: Job) -> None:
            job.total = n
            job.message = f"indexing SAE {sae} ({s.hook}) on {n} images ({label})"
            x = self._set_tensors()[:n]

            def progress(done: int, total: int) -> None:
                job.done, job.total = done, total

            fi = sf.index_features(self.model, s, x, grid, batch_size=16, progress=progress, lock=self.lock)
            fi.metrics["image_set"] = label
            self.sae_index[sae] = fi
            job.message = f"indexed SAE {sae} ({s.hook}) on {n} images ({label})"

        job = self._start("sae_index", work)
        self._sae_jobs[sae] = job.id
        return job.to_json()

    def sae_feature(self, image_id: str, sae: int, feature: int, k: int = 12) -> dict[str, Any]:
        """One feature: its map on this image (colour bar from 0), its top patches, usage and histogram over the
        image set, its nearest ISTA atoms, and the SAE's metrics; ``{"pending": job}`` while the set is indexed."""
        t0 = time.perf_counter()
        s = self._sae(sae)
        self._check_feature(s, feature)
        item = self._get(image_id)
        here = self._codes_here(image_id, sae)[..., feature]
        if sae not in self.sae_index:
            return {"pending": self.start_sae_index(sae)}
        fi = self.sae_index[sae]
        self._set_tensors()
        patches = []
        for p in insp.top_patches(fi.index, feature, k):
            crop = insp.patch_crop(self._set_inputs[p["image"]].image, p["row"], p["col"], self.patch_size)
            patches.append({**p, "name": self.image_set[p["image"]].name, "src": png_uri(crop, display=72)})
        stats = insp.atom_stats(fi.index, feature)
        stats["features"] = stats.pop("code_dim")
        scale = Scale.from_zero([here])
        return {
            "sae": sae,
            "feature": feature,
            "layer": s.layer,
            "site": s.site,
            "hook": s.hook,
            "stats": stats,
            "metrics": fi.metrics,
            "recorded": s.recorded,
            "patches": patches,
            "histogram": histogram_json(fi.index.codes[..., feature]),
            "nearest_atoms": sf.nearest_atoms(self.model, s, feature),
            "direction_norm": float(s.sae.dictionary.detach()[:, feature].norm()),
            "here": {"src": self._heat(item, here, scale), "scale": scale.to_json(), "max": float(here.max()),
                     "active": int((here > 0).sum()), "values": [[round(float(v), 5) for v in r] for r in here]},
            "ms": round(1000 * (time.perf_counter() - t0), 1),
        }  # fmt: skip

    def sae_clamp(
        self,
        image_id: str,
        sae: int,
        feature: int,
        value: float = 0.0,
        head: int | None = None,
        scale: str = "own",
    ) -> dict[str, Any]:
        """Clamp one SAE feature to ``value`` on every patch token at its hook point (error term kept) and run the
        network on: the prediction and the later layers' attention before and after, as :meth:`intervene`."""
        t0 = time.perf_counter()
        s = self._sae(sae)
        self._check_clamp(s.layer, head, value)
        self._check_feature(s, feature)
        self._check_scale(scale)
        item = self._get(image_id)
        with self.lock:
            result = sf.clamp_feature(self.model, s, item.prep.tensor[None], feature, value)
        pairs = []
        prefix, (rows, cols) = item.ins.prefix, item.ins.grid
        if prefix > 0:  # class-token rows over the patches
            for j in sorted(result.patterns_after):
                a0 = result.patterns_before[j][0, :, 0, prefix:].reshape(-1, rows, cols)
                a1 = result.patterns_after[j][0, :, 0, prefix:].reshape(-1, rows, cols)
                pairs.append((j, *((a0.mean(0), a1.mean(0)) if head is None else (a0[head], a1[head]))))
        out: dict[str, Any] = {"sae": sae, "feature": feature, "value": value, "head": head, "layer": s.layer,
                               "hook": s.hook, "peak_here": float(self._codes_here(image_id, sae)[..., feature].max())}  # fmt: skip
        out.update(self._effect(item, pairs, scale, result.logits_before, result.logits_after))
        out["ms"] = round(1000 * (time.perf_counter() - t0), 1)
        return out
