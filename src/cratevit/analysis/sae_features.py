"""An SAE's features read on a model, beside its ISTA atoms: what the explore page's "SAE features" panel computes.

An SAE checkpoint (``cratevit sae train``, :mod:`.sae_train`) records where it reads: the model, the layer ``l``
(0-based block index) and the activation site (:data:`.activations.SITES`, hook ``blocks.l.POINT``). Here:

* :func:`load_sae_for`: the checkpoint read ``weights_only`` and checked against the model it is used on (the
  recorded model's weights fingerprint, :func:`weights_fingerprint`, or its file; the layer, the site's hook point
  and the activation width), each mismatch one line;
* :func:`site_tokens` / :func:`feature_codes`: the patch tokens at the hook point ``x`` (b, n_patch, d) and their
  code ``f = SAE.encode(x)`` (b, rows, cols, F);
* :func:`index_features`: the codes of an image set in an :class:`~.inspection.AtomIndex` (so the atom view's
  :func:`~.inspection.top_patches` and :func:`~.inspection.atom_stats` read them) and the SAE's metrics on it (L0,
  FVE, dead and dense fractions, :func:`~.codes.code_metrics`);
* :func:`nearest_atoms`: cosines between a feature's decoder direction ``D_sae[:, i]`` and the layer's ISTA atoms;
* :func:`clamp_feature`: "clamp and see the effect" with the error term kept, as the field splices SAEs (SAELens'
  ``use_error_term``)::

      x' = x_hat(f with f_i := v) + (x - x_hat(f))  =  x + (x_hat(f_edit) - x_hat(f))      (patch tokens only)

  computed in the right-hand form, so a feature left at its own value gives ``x' = x`` exactly and the forward is
  unchanged, bit for bit; the rest of the network runs on from the hook point (:func:`.hooks.hooks`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, UserError
from ..registry import is_autoencoder
from .activations import SITES, has_ista_dictionary, ista_dictionary, layer_activations, prefix_tokens, site_hook
from .codes import code_metrics
from .hooks import block_points, hooks
from .inspection import AtomIndex
from .sae import SparseAutoencoder
from .sae_train import load_sae

__all__ = [
    "ATOM_SITES",
    "FeatureIndex",
    "LoadedSAE",
    "SAEClamp",
    "clamp_feature",
    "feature_codes",
    "index_features",
    "load_sae_for",
    "nearest_atoms",
    "site_tokens",
    "weights_fingerprint",
]

ATOM_SITES = ("ista_in", "code")
"""Sites whose space the layer's ISTA atoms live in: ``ista_in`` (the columns of ``D``, which reconstruct it) and
``code`` (the code's own axes)."""


@dataclass
class LoadedSAE:
    """An SAE and where it reads: ``blocks.{layer}.POINT`` (``hook``) of the model at activation ``site``."""

    sae: SparseAutoencoder
    path: str
    layer: int
    site: str
    hook: str
    model: str  # the model it was trained on, as recorded
    random_weights: bool | None  # whether that model had random weights, as recorded
    recorded: dict[str, Any] = field(default_factory=dict)  # held-out metrics of eval.json beside it, if any

    @property
    def features(self) -> int:
        return self.sae.config.d_sae

    def describe(self) -> dict[str, Any]:
        """Plain values for the page: file, hook point, shape, architecture, the recorded model and metrics."""
        cfg = self.sae.config
        return {"path": self.path, "name": Path(self.path).name, "layer": self.layer, "site": self.site,
                "site_meaning": SITES[self.site], "hook": self.hook, "d_in": cfg.d_in, "features": cfg.d_sae,
                "arch": cfg.arch, "k": cfg.k if cfg.arch == "topk" else None, "trained_on": self.model,
                "random_weights": self.random_weights, "recorded": self.recorded}  # fmt: skip


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes, shapes and bytes, in name order): the same weights give the
    same value wherever the file lies. ``cratevit sae train`` records it, the explorer compares it."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _same_model(meta: dict[str, Any], model: nn.Module, spec: str) -> bool:
    """Whether the model an SAE records is the one explored: the same weights fingerprint where the SAE records
    one; else (older files) the same file through links and relative paths, or the same name."""
    if isinstance(meta.get("model_fingerprint"), str):
        return meta["model_fingerprint"] == weights_fingerprint(model)
    a, b = Path(meta["model"]), Path(spec)
    if a.is_file() and b.is_file():
        return os.path.samefile(a, b)
    return meta["model"] == spec


def _site_width(model: nn.Module, layer: int, site: str, image_size: tuple[int, int]) -> int:
    """Width of the activations at the site (one blank image through the layer)."""
    blank = torch.zeros(1, 3, *image_size, device=next(model.parameters()).device)
    return int(layer_activations(model, blank, layer, (site,))[site].shape[-1])


def load_sae_for(path: str | Path, model: nn.Module, model_spec: str, image_size: tuple[int, int]) -> LoadedSAE:
    """Read an SAE checkpoint (``weights_only``, :func:`.sae_train.load_sae`) and check that it reads ``model``:
    trained on ``model_spec``, at a layer and site the model has, on activations of the site's width. Every
    mismatch is one line naming the file, what it records and what to pass instead."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--sae {path}: no such file; pass the sae.pt written by `cratevit sae train`")
    sae, state = load_sae(path)
    meta = state.get("meta") if isinstance(state.get("meta"), dict) else {}
    layer, site, trained_on = meta.get("layer"), meta.get("site"), meta.get("model")
    if not isinstance(layer, int) or site not in SITES or not isinstance(trained_on, str):
        raise CheckpointError(
            f"{path} records no hook point (layer, site, model); pass an SAE written by `cratevit sae train`"
        )
    if not _same_model(meta, model, model_spec):
        other = "other weights than" if "model_fingerprint" in meta else "a model other than"
        raise UserError(
            f"{path} was trained on {trained_on}, {other} {model_spec}; pass an SAE trained on this model "
            f"(`cratevit sae train {model_spec} --layer {layer}`)"
        )
    depth = len(model.blocks)
    if not 0 <= layer < depth:
        raise UserError(
            f"{path} reads layer {layer} (0-based), but {model_spec} has layers 0..{depth - 1}; "
            "pass an SAE trained on this model"
        )
    hook = site_hook(model, layer, site)  # a site the block does not compute: one line
    width = _site_width(model, layer, site, image_size)
    if width != sae.config.d_in:
        raise UserError(
            f"{path} was trained on activations of width {sae.config.d_in}, but {hook} of {model_spec} has width "
            f"{width}; pass an SAE trained on this model's layer {layer} (0-based)"
        )
    recorded: dict[str, Any] = {}
    beside = path.parent / "eval.json"
    if beside.is_file():
        try:
            ev = json.loads(beside.read_text(encoding="utf-8"))
            if (
                isinstance(ev, dict)
                and isinstance(ev.get("sae"), dict)
                and ev.get("checkpoint", "").endswith(path.name)
            ):
                recorded = {k: ev["sae"][k] for k in ("l0", "fve", "dead_fraction", "loss_recovered") if k in ev["sae"]}
                recorded["images"] = ev.get("images")
        except (OSError, ValueError):
            recorded = {}
    return LoadedSAE(sae.eval(), str(path), layer, site, hook, trained_on, meta.get("random_weights"), recorded)


def _forward(model: nn.Module) -> Callable[[Tensor], Any]:
    return model.forward_encoder if is_autoencoder(model) else model


@torch.no_grad()
def site_tokens(model: nn.Module, s: LoadedSAE, x: Tensor) -> Tensor:
    """The patch tokens at the SAE's hook point for images ``x`` (b, c, H, W): (b, n_patches, d_in)."""
    return layer_activations(model, x, s.layer, (s.site,))[s.site][:, prefix_tokens(model) :]


@torch.no_grad()
def feature_codes(s: LoadedSAE, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """The SAE code of patch tokens (b, rows*cols, d_in) on the patch grid: (b, rows, cols, F)."""
    return s.sae.encode(tokens).reshape(tokens.shape[0], *grid, -1)


@dataclass
class FeatureIndex:
    """An SAE's codes over an image set (``index.codes``: (images, rows, cols, F)) and its metrics there."""

    index: AtomIndex
    metrics: dict[str, Any]


@torch.no_grad()
def index_features(
    model: nn.Module,
    s: LoadedSAE,
    images: Tensor,
    grid: tuple[int, int],
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    lock: AbstractContextManager | None = None,
) -> FeatureIndex:
    """Codes of the SAE over ``images`` (N, c, H, W) with patch grid ``grid``, and its L0, FVE, dead and dense
    fractions on their patch tokens (:func:`.codes.code_metrics`; dead: never non-zero on the set). ``lock``: held
    around each batch's hooked forward (a server whose other requests run the same model)."""
    codes, xs, x_hats = [], [], []
    for done, batch in enumerate(images.split(batch_size)):
        with lock or nullcontext():
            x = site_tokens(model, s, batch)
        f = s.sae.encode(x)
        codes.append(f.reshape(len(batch), *grid, -1).float())
        xs.append(x)
        x_hats.append(s.sae.decode(f))
        if progress is not None:
            progress(min(len(images), batch_size * (done + 1)), len(images))
    if not codes:
        raise UserError("no images to index")
    all_codes = torch.cat(codes)
    metrics = code_metrics(torch.cat(xs), all_codes, torch.cat(x_hats)).to_dict()
    metrics["images"] = len(images)
    return FeatureIndex(AtomIndex(s.layer, all_codes, None, {"images": len(images)}), metrics)


def nearest_atoms(model: nn.Module, s: LoadedSAE, feature: int, k: int = 6) -> dict[str, Any] | None:
    """The ``k`` ISTA atoms of the SAE's layer nearest to feature ``feature``'s decoder direction ``u = D_sae[:, i]``
    by cosine: against the dictionary's columns ``cos(u, D_:,j)`` at the ``ista_in`` site (the signal ``D``
    reconstructs), against the code's axes ``u_j / ||u||`` at the ``code`` site. None where the layer has no atoms
    in the SAE's space (another site, or no single dictionary)."""
    u = s.sae.dictionary.detach()[:, feature].double()
    if s.site == "code":
        cos = u / u.norm().clamp_min(1e-300)
        space = f"the code's axes (blocks.{s.layer}.ista.code)"
    elif s.site == "ista_in" and has_ista_dictionary(model, s.layer):
        d = ista_dictionary(model, s.layer).double()  # (dim, atoms)
        if d.shape[0] != u.numel():
            return None
        cos = (u @ d) / (u.norm() * d.norm(dim=0)).clamp_min(1e-300)
        space = f"the columns of blocks.{s.layer}.ista.dictionary"
    else:
        return None
    values, idx = cos.topk(min(k, cos.numel()))
    return {"space": space, "atoms": [{"coord": int(j), "cosine": round(float(v), 4)} for v, j in zip(values, idx, strict=True)],
            "max_abs": round(float(cos.abs().max()), 4), "count": int(cos.numel())}  # fmt: skip


@dataclass
class SAEClamp:
    """Outputs with and without one SAE feature clamped (:func:`clamp_feature`): logits (None without a classifier)
    and the attention patterns (b, heads, n, n) of the layers downstream of the hook point, by layer."""

    logits_before: Tensor | None
    logits_after: Tensor | None
    patterns_before: dict[int, Tensor]
    patterns_after: dict[int, Tensor]


def _pattern_names(model: nn.Module, first: int) -> dict[int, str]:
    """Layer -> its attention-pattern hook, for the blocks from ``first`` on that have one."""
    out = {}
    for j in range(first, len(model.blocks)):
        pattern = [p for p in block_points(model.blocks[j]) if p.endswith(".pattern")]
        if pattern:
            out[j] = f"blocks.{j}.{pattern[0]}"
    return out


@torch.no_grad()
def clamp_feature(model: nn.Module, s: LoadedSAE, x: Tensor, feature: int, value: float) -> SAEClamp:
    """Set feature ``feature`` to ``value`` on every patch token at the SAE's hook point, keep the error term
    (``x + x_hat(f_edit) - x_hat(f)``, see the module docstring) and run the network on; both passes (with and
    without the edit) go through the same hooked blocks, so their difference is the edit's alone."""
    if not 0 <= feature < s.features:
        raise UserError(f"SAE feature {feature} is out of range; this SAE has features 0..{s.features - 1}")
    p = prefix_tokens(model)
    sae = s.sae

    def splice(t: Tensor, _name: str) -> Tensor:
        f = sae.encode(t[:, p:])
        edited = f.clone()
        edited[..., feature] = value
        return torch.cat([t[:, :p], t[:, p:] + (sae.decode(edited) - sae.decode(f))], dim=1)

    first = s.layer if s.site == "z_in" else s.layer + 1  # the first attention the edit reaches
    names = _pattern_names(model, first)

    def run(edit: bool) -> tuple[Any, dict[int, Tensor]]:
        cache: dict[str, Tensor] = {}

        def keep(t: Tensor, name: str) -> None:
            cache[name] = t

        # the hook point is hooked in both passes (read-only without the edit), so the same blocks run the same way
        fns = {**dict.fromkeys(names.values(), keep), s.hook: splice if edit else (lambda _t, _n: None)}
        with hooks(model, fns):
            out = _forward(model)(x)
        return out, {j: cache[n] for j, n in names.items()}

    was_training = model.training
    model.eval()
    try:
        (out0, before), (out1, after) = run(False), run(True)
    finally:
        model.train(was_training)

    def logits(out: Any) -> Tensor | None:
        ok = isinstance(out, Tensor) and out.ndim == 2 and not is_autoencoder(model)
        return out if ok and int(getattr(model, "num_classes", 0) or 0) > 0 else None

    return SAEClamp(logits(out0), logits(out1), before, after)
