"""Training a sparse autoencoder (:mod:`.sae`) on a stream of activations, resumably.

* :class:`ActivationCache`: activations on disk in chunks (``chunk_00000.safetensors`` ..., each ``(tokens, d)``,
  and ``index.json`` written last, so a cache cut short is recognised as incomplete), read one chunk at a time:
  the cache need not fit in memory. :meth:`ActivationCache.batches` yields shuffled fixed-size batches forever
  (epoch ``e`` visits the chunks, and the rows of each chunk, in an order seeded by ``(seed, e)``), so the stream
  is a pure function of the cache and the seed;
* :func:`tensor_batches`: the same for a tensor already in memory;
* :func:`train_sae`: Adam (betas 0.9, 0.999), linear learning-rate warm-up then constant, linear decay to 0 over
  the last ``decay_fraction`` of the steps (Anthropic's April 2024 update), linear L1 warm-up (``"relu"``),
  gradient clipping, unit-norm decoder columns, dead-feature resampling (``resample_every``) or AuxK (TopK);
  ``metrics.jsonl`` (one record per ``log_every`` steps), ``curves.png`` and ``sae.pt`` in the run folder.

Resuming: ``sae.pt`` holds the SAE, the optimizer, the step, the resampling generator's state and how many
records of ``metrics.jsonl`` it had written; the trainer skips the batches already used, so a resumed run given
the same stream ends with the same weights, bit for bit, as an uninterrupted one. Checkpoints are written
atomically (:func:`cratevit.checkpoint.atomic_save`) and read with ``weights_only`` (:func:`load_file`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import atomic_path, atomic_save, load_file
from ..errors import CheckpointError, UserError
from .sae import SAEConfig, SparseAutoencoder

__all__ = [
    "SAE_FORMAT",
    "ActivationCache",
    "SAETrainConfig",
    "load_sae",
    "plot_sae_curves",
    "save_sae",
    "tensor_batches",
    "train_sae",
]

SAE_FORMAT = "cratevit-sae"
"""The format tag of an SAE checkpoint (``sae.pt``)."""
CHECKPOINT_NAME = "sae.pt"


# --------------------------------------------------------------------------------------------- streams
def _epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + salt) % (1 << 62))


def tensor_batches(x: Tensor, batch_size: int, seed: int = 0) -> Iterator[Tensor]:
    """Batches of ``batch_size`` rows of ``x`` (tokens, d), reshuffled every epoch (seeded), forever."""
    x = x.reshape(-1, x.shape[-1])
    if len(x) < batch_size:
        raise UserError(f"{len(x)} activation rows cannot make one batch of {batch_size}; lower the batch size")
    epoch = 0
    while True:
        order = torch.randperm(len(x), generator=_epoch_generator(seed, epoch))
        for start in range(0, len(x) - batch_size + 1, batch_size):
            yield x[order[start : start + batch_size]]
        epoch += 1


class ActivationCache:
    """A folder of activation chunks (see the module docstring). Open an existing one with
    ``ActivationCache(folder)``; write one with :meth:`write`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "index.json"
        if not index.is_file():
            raise UserError(f"{self.folder} is not a complete activation cache (no index.json); write it again")
        data = json.loads(index.read_text(encoding="utf-8"))
        self.dim: int = int(data["dim"])
        self.chunk_sizes: list[int] = [int(n) for n in data["chunk_sizes"]]
        self.meta: dict[str, Any] = dict(data.get("meta", {}))

    @property
    def num_tokens(self) -> int:
        return sum(self.chunk_sizes)

    def chunk(self, i: int) -> Tensor:
        from safetensors.torch import load_file as load_tensors

        return load_tensors(str(self.folder / f"chunk_{i:05d}.safetensors"))["x"]

    def load_all(self) -> Tensor:
        """Every token, (num_tokens, dim): only for caches that fit in memory."""
        return torch.cat([self.chunk(i) for i in range(len(self.chunk_sizes))])

    @classmethod
    def write(
        cls, folder: str | Path, chunks: Iterable[Tensor], meta: dict[str, Any] | None = None, chunk_tokens: int = 65536
    ) -> ActivationCache:
        """Write activations given as an iterable of tensors ``(..., d)`` (e.g. one per image batch) into chunks of
        about ``chunk_tokens`` rows; ``meta`` (plain values) is kept in ``index.json``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "index.json").unlink(missing_ok=True)
        sizes: list[int] = []
        pending: list[Tensor] = []
        dim = None

        def flush() -> None:
            x = torch.cat(pending).float().contiguous()
            with atomic_path(folder / f"chunk_{len(sizes):05d}.safetensors") as tmp:
                save_file({"x": x}, str(tmp))
            sizes.append(len(x))
            pending.clear()

        for t in chunks:
            t = t.detach().reshape(-1, t.shape[-1]).cpu()
            if dim is not None and t.shape[-1] != dim:
                raise UserError(f"activation widths differ within one cache: {dim} then {t.shape[-1]}")
            dim = int(t.shape[-1])
            pending.append(t)
            if sum(len(p) for p in pending) >= chunk_tokens:
                flush()
        if pending:
            flush()
        if dim is None:
            raise UserError("no activations to cache (no images?)")
        text = json.dumps({"dim": dim, "chunk_sizes": sizes, "meta": meta or {}}, indent=2)
        with atomic_path(folder / "index.json") as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
        return cls(folder)

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[Tensor]:
        """Shuffled batches of ``batch_size`` rows, forever; one chunk in memory at a time (plus a carry)."""
        if self.num_tokens < batch_size:
            raise UserError(f"the cache holds {self.num_tokens} tokens, fewer than one batch of {batch_size}")
        epoch, carry = 0, None
        while True:
            for c in torch.randperm(len(self.chunk_sizes), generator=_epoch_generator(seed, epoch)).tolist():
                x = self.chunk(c)
                x = x[torch.randperm(len(x), generator=_epoch_generator(seed, epoch, salt=c + 1))]
                if carry is not None:
                    x = torch.cat([carry, x])
                full = len(x) // batch_size * batch_size
                yield from x[:full].split(batch_size)
                carry = x[full:] if full < len(x) else None
            epoch += 1


# --------------------------------------------------------------------------------------------- training
@dataclass
class SAETrainConfig:
    """How an SAE is trained (the SAE's own shape and sparsity are in :class:`SAEConfig`)."""

    steps: int = 2000
    lr: float = 4e-4
    warmup_steps: int = 100  # linear learning-rate warm-up
    decay_fraction: float = 0.2  # linear decay to 0 over this last fraction of the steps
    l1_warmup_steps: int = 200  # "relu": lambda grows linearly from 0 over these steps
    grad_clip: float = 1.0  # max gradient norm (0: off)
    resample_every: int = 0  # resample dead features every this many steps (0: never; Anthropic: 25,000)
    resample_until: float = 0.7  # ... but not in the last 30% of the steps
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    plot: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.log_every < 1 or self.checkpoint_every < 1:
            raise UserError("SAE training needs steps >= 1, lr > 0, log_every >= 1 and checkpoint_every >= 1")
        if not 0 <= self.decay_fraction <= 1:
            raise UserError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAETrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based)."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        decay_start = self.steps * (1 - self.decay_fraction)
        decay = 1.0 if step < decay_start else max(0.0, (self.steps - step) / max(self.steps - decay_start, 1))
        return self.lr * warm * decay

    def l1_scale(self, step: int) -> float:
        return min(1.0, (step + 1) / self.l1_warmup_steps) if self.l1_warmup_steps > 0 else 1.0


def save_sae(
    path: str | Path,
    sae: SparseAutoencoder,
    train: SAETrainConfig | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    **extra: Any,
) -> Path:
    """Write an SAE checkpoint atomically: format tag, configurations, weights, and training state if given."""
    obj = {
        "format": SAE_FORMAT,
        "format_version": 1,
        "sae_config": sae.config.to_dict(),
        "model": sae.state_dict(),
        **({"train_config": train.to_dict()} if train is not None else {}),
        **({"optimizer": optimizer.state_dict()} if optimizer is not None else {}),
        **extra,
    }
    return atomic_save(obj, path)


def load_sae(path: str | Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """An SAE checkpoint -> (SAE in eval mode, the rest of the file). Read with ``weights_only``."""
    obj = load_file(path)
    if not isinstance(obj, dict) or obj.get("format") != SAE_FORMAT:
        raise CheckpointError(
            f"{path} is not an SAE checkpoint (expected format {SAE_FORMAT!r}); pass the sae.pt written by "
            f"`cratevit sae train`"
        )
    sae = SparseAutoencoder(SAEConfig.from_dict(obj["sae_config"]))
    missing, unexpected = sae.load_state_dict(obj["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: SAE weights do not match its configuration (missing {missing}, extra {unexpected})"
        )
    return sae.eval(), {k: v for k, v in obj.items() if k != "model"}


def _metrics_log(run_dir: Path | None, keep: int) -> list[dict[str, Any]]:
    """Records of an existing ``metrics.jsonl`` to keep (a resumed run keeps its checkpoint's), rewritten."""
    if run_dir is None:
        return []
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)[:keep] if keep and path.exists() else []
    lines = [line for line in lines if line.endswith("\n")]
    path.write_text("".join(lines))
    return [json.loads(line) for line in lines]


def train_sae(
    sae: SparseAutoencoder,
    stream: Iterable[Tensor],
    cfg: SAETrainConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    meta: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train ``sae`` on batches ``(tokens, d_in)`` from ``stream`` for ``cfg.steps`` steps; returns the logged
    records. With ``run_dir``: ``metrics.jsonl``, ``curves.png`` and ``sae.pt`` (every ``checkpoint_every`` steps
    and at the end) are written there, and ``resume=True`` continues from its ``sae.pt`` (the stream must replay
    the same batches, as :class:`ActivationCache` and :func:`tensor_batches` do). ``progress(record)`` is called
    with each logged record; ``meta`` (plain values: the model, layer, data) is stored in the checkpoint."""
    run = Path(run_dir) if run_dir is not None else None
    if resume and run is None:
        raise UserError("resuming needs the run folder that holds sae.pt")
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    generator = torch.Generator().manual_seed(cfg.seed)
    step, keep, resampled = 0, 0, 0  # resampled: features resampled since the last logged record
    if resume:
        ckpt = run / CHECKPOINT_NAME
        if not ckpt.is_file():
            raise UserError(f"nothing to resume: {ckpt} does not exist; start without --resume")
        loaded, state = load_sae(ckpt)
        if loaded.config != sae.config:
            raise UserError(f"{ckpt} holds an SAE of another shape ({loaded.config}); use another --output")
        sae.load_state_dict(loaded.state_dict())
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, keep, resampled = int(state["step"]), int(state["metrics_lines"]), int(state["resampled"])
    if run is not None:
        run.mkdir(parents=True, exist_ok=True)
    records = _metrics_log(run, keep)
    batches = iter(stream)
    for _ in range(step):  # the batches an interrupted run already used
        next(batches)
    sae.train()
    t0, tokens = time.perf_counter(), 0

    def checkpoint() -> None:
        if run is not None:
            save_sae(
                run / CHECKPOINT_NAME,
                sae,
                cfg,
                optimizer,
                step=step,
                generator=generator.get_state(),
                metrics_lines=len(records),
                resampled=resampled,
                meta=meta or {},
            )

    while step < cfg.steps:
        try:
            x = next(batches).float()
        except StopIteration:
            break
        if step == 0 and not resume:
            sae.initialize_from(x)
        lr = cfg.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        out = sae.loss(x, l1_coeff=sae.config.l1_coeff * cfg.l1_scale(step))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_gradient()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        optimizer.step()
        sae.normalize_dictionary()
        step += 1
        tokens += len(x)
        if cfg.resample_every and step % cfg.resample_every == 0 and step < cfg.resample_until * cfg.steps:
            resampled += sae.resample(x, sae.dead_mask(), optimizer, generator)
        if step % cfg.log_every == 0 or step == cfg.steps:
            record = {
                "kind": "train",
                "step": step,
                "steps": cfg.steps,
                "loss": float(out.loss.detach()),
                "mse": float(out.mse.detach()),
                "sparsity": float(out.sparsity.detach()),
                "aux": float(out.aux.detach()),
                "l0": out.l0,
                "fve": out.fve,
                "dead_fraction": float(sae.dead_mask().float().mean()),
                "resampled": resampled,  # since the previous record
                "lr": lr,
                "tokens_s": tokens / max(time.perf_counter() - t0, 1e-9),
            }
            if not all(math.isfinite(record[k]) for k in ("loss", "mse")):
                raise UserError(f"SAE loss is not finite at step {step}; lower --lr or check the activations")
            records.append(record)
            resampled = 0
            if run is not None:
                with (run / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if progress is not None:
                progress(record)
        if run is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            checkpoint()
            if cfg.plot:
                plot_sae_curves(records, run / "curves.png")
    sae.eval()
    return records


def plot_sae_curves(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Loss, fraction of variance explained, L0 and dead fraction against the step, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    train = [r for r in records if r.get("kind") == "train"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    x = [r["step"] for r in train]
    panels = (
        ("loss", "loss", "training loss"),
        ("fve", "fraction of variance explained", "reconstruction (batch)"),
        ("l0", "active features per token (L0)", "sparsity (batch)"),
        ("dead_fraction", "fraction of features", "dead features"),
    )
    for ax, (key, label, title) in zip(axes, panels, strict=True):
        ax.plot(x, [r[key] for r in train], lw=1)
        ax.set(xlabel="step", ylabel=label, title=title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
