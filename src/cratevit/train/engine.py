"""The training engine behind ``cratevit train`` and ``cratevit finetune``: one configuration, one loop.

A run is described by a :class:`TrainConfig`. Fields left ``None`` take the recipe of the data (see
:data:`RECIPES`): the ImageNet recipe for image folders, the transfer recipe for CIFAR/Flowers/Pets, and a quick
recipe for the built-in digits. The run directory receives ``config.json`` (rerun with ``--config``),
``metrics.jsonl``, ``last.pt``, ``best.pt``, ``curves.png`` and, with ``--tensorboard``, an event file.

Nothing is lost: checkpoints are written atomically, at each epoch's end and every ``--save-every`` steps (by
default every 10 minutes); SIGTERM/SIGINT (also sent to the data workers, as ``timeout``, SLURM and Kubernetes do)
save a resumable ``last.pt`` at the current step; resuming (``--resume``) continues mid-epoch with the same data
order, augmentation and dropout, so the final weights and ``metrics.jsonl`` equal those of an uninterrupted run.
Nothing is silently wrong: non-finite weights are never saved, a run directory is locked while a run uses it, and
batches whose images are all unreadable are not counted as steps.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import (
    CheckpointError,
    atomic_save,
    checkpoint_dict,
    create_model,
    is_reference_state,
    load_file,
    load_into,
    load_model,
    load_state_dict_strict,
)
from ..data import Batch, EpochSampler, SeededDataset, build_datasets, build_eval_dataset, collate_skip, data_info
from ..errors import UserError, require
from ..models.crate_mae import CRATEMAE, crate_classifier_from_mae
from ..presets import data_preprocessing, get_config, list_models, pretrained_cfg_for, resolve_name
from ..registry import is_family_model
from .config import RECIPES, SAVE_EVERY_MINUTES, TrainConfig, resolve_config
from .distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    any_true,
    barrier,
    cleanup,
    init_distributed,
)
from .memory import check_training_memory
from .objectives import make_objective

__all__ = ["RECIPES", "TrainConfig", "Trainer", "load_run_config", "resolve_config", "train"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PLOT_EVERY_S = 60.0  # redraw curves.png at most this often (and after the last epoch): plotting costs ~0.5 s
LOCK_NAME = ".lock"  # the run directory's lock file (fcntl.flock, held for the run's lifetime)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def load_run_config(path: str | Path) -> TrainConfig:
    """The configuration of a run: from its ``config.json`` (or any YAML/JSON file), or from a checkpoint's
    ``train_config``."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"--config {path}: configuration file not found; pass a run's config.json")
    if path.suffix in (".json", ".yaml", ".yml"):
        import yaml  # JSON is YAML

        try:
            obj = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            reason = getattr(e, "problem", None) or type(e).__name__
            raise UserError(
                f"--config {path} is not valid YAML/JSON{at} ({reason}); fix the file or pass a run's config.json"
            ) from None
        return TrainConfig.from_dict(obj, source=f"--config {path}")
    return TrainConfig.from_dict(
        dict(read_resume_checkpoint(path, option="--config")["train_config"]), source=f"--config {path}"
    )


def resume_path(path: str | Path, option: str = "--resume") -> Path:
    """``--resume`` accepts a checkpoint file or a run directory (its ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"{option} {path}: no such checkpoint; pass a run directory or its last.pt")
    return path


def read_resume_checkpoint(path: str | Path, option: str = "--resume") -> dict[str, Any]:
    """A training checkpoint, read with ``weights_only=True``; ``option`` names the flag in messages."""
    path = resume_path(path, option)
    try:
        obj = load_file(path)
    except CheckpointError as e:  # corrupt, truncated, or not a checkpoint: one line
        raise UserError(f"{option} {e}") from None
    if not isinstance(obj, dict) or "train_config" not in obj or "optimizer" not in obj:
        raise UserError(
            f"{option} {path} is not a cratevit training checkpoint (no optimizer state); "
            f"use --pretrained to start from its weights instead"
        )
    return obj


# --------------------------------------------------------------------------------------------------- model
def is_crate_arch(arch: str) -> bool:
    try:
        resolve_name(arch)
    except UserError:
        return False
    return True


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """A cratevit preset or a timm model, with the class count and optional size overrides."""
    if is_crate_arch(cfg.arch):
        known = {f.name for f in fields(get_config(cfg.arch))}
        unknown = sorted(set(cfg.model_kwargs or {}) - known)
        if unknown:
            raise UserError(f"--model-kwargs: unknown {cfg.arch} option(s) {unknown}; its options: {sorted(known)}")
        num_classes = None if cfg.objective == "mae" else num_classes  # an autoencoder has no classifier
        try:
            return create_model(
                cfg.arch,
                num_classes=num_classes,
                image_size=cfg.image_size,
                patch_size=cfg.patch_size,
                **(cfg.model_kwargs or {}),
            )
        except (TypeError, ValueError) as e:  # a value of the wrong type or out of range in --model-kwargs
            if not cfg.model_kwargs:
                raise
            raise UserError(
                f"cannot build {cfg.arch} with --model-kwargs {json.dumps(cfg.model_kwargs)}: {e}"
            ) from None
    import timm

    if not timm.is_model(cfg.arch):
        raise UserError(
            f"unknown --arch {cfg.arch!r}: not a cratevit preset ({', '.join(list_models())}) "
            f"nor a timm model name (see timm.list_models())"
        )
    kwargs: dict[str, Any] = {**(cfg.model_kwargs or {}), "num_classes": num_classes}
    if cfg.image_size is not None:
        kwargs["img_size"] = cfg.image_size
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    try:
        return timm.create_model(cfg.arch, pretrained=False, **kwargs)
    except TypeError as e:
        raise UserError(f"timm model {cfg.arch!r} does not accept {sorted(kwargs)}: {e}") from None


def model_image_size(model: nn.Module) -> int:
    if is_family_model(model):
        return model.config.image_size[0]
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    return int(model.pretrained_cfg["input_size"][-1])


def load_pretrained(model: nn.Module, path: str) -> None:
    """Start from a checkpoint's weights, replacing the classifier when the class count differs."""
    if is_family_model(model):
        load_into(model, path, drop_head=True)
        return
    try:
        obj = load_file(path)
    except CheckpointError as e:
        raise CheckpointError(f"--pretrained {path}: {str(e)[:300]}") from None
    state = dict(obj.get("model", obj.get("state_dict", obj)))
    own = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    head = {k for k in state if k in own and state[k].shape != own[k].shape and k.startswith(("head.", "fc."))}
    for k in head:
        state[k] = own[k]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"--pretrained {path} does not fit {type(model).__name__}: {str(e)[:300]}") from None


def checkpoint_payload(model: nn.Module, arch: str, **extra: Any) -> dict[str, Any]:
    """Our checkpoint layout for CRATE; the same keys with the timm name for timm models."""
    if is_family_model(model):
        return checkpoint_dict(model, arch=arch, **extra)
    return {"format": "timm", "arch": arch, "model": model.state_dict(), **extra}


# --------------------------------------------------------------------------------------------------- helpers
class StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (restored on exit)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in SIGNALS:
            with suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(worker_id: int) -> None:
    """Data-loading workers leave SIGTERM and SIGINT to the main process, which saves a checkpoint and then stops
    them: ``timeout``, SLURM, Kubernetes and Ctrl-C signal the whole process group, and a worker killed by one
    would crash the main process before it saves. A signal that arrived while the worker started is discarded."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold SIGTERM/SIGINT while data workers are forked (they inherit the mask and ignore the signals before
    unblocking them); the main process receives a signal held here when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class RunLock:
    """An exclusive ``fcntl.flock`` on the run directory's lock file, held for the run's lifetime: two runs never
    write the same directory. The lock file records the holder's process id (for the message)."""

    def __init__(self, run_dir: Path) -> None:
        import fcntl

        self.path = run_dir / LOCK_NAME
        self.file = self.path.open("a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            pid = self.file.read().strip() or "?"
            self.file.close()
            raise UserError(
                f"{run_dir} is in use by another cratevit run (pid {pid}); wait for it to end, or "
                f"choose another --output"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    @staticmethod
    def check(run_dir: Path) -> None:
        """Refuse early (before any work) if another run holds ``run_dir``."""
        if (run_dir / LOCK_NAME).exists():
            RunLock(run_dir).release()

    def release(self) -> None:
        import fcntl

        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def signal_name(signum: int) -> str:
    try:
        return f"{signum} ({signal.Signals(signum).name})"
    except ValueError:
        return str(signum)


class Diverged(UserError):
    """The loss, the gradients or the weights became non-finite; nothing non-finite was saved."""


def _is_mae_file(path: str) -> bool:
    """Whether a checkpoint file holds a CRATE-MAE (ours or the official layout), peeking with mmap."""
    try:
        obj = load_file(path, mmap=True) if Path(path).suffix != ".safetensors" else None
    except CheckpointError:
        return False  # the loader reports unreadable files
    if not isinstance(obj, dict):
        return False
    weights = obj.get("model", obj)
    return obj.get("model_family") == "crate_mae" or (
        isinstance(weights, dict) and is_reference_state(weights, "crate_mae")
    )


def mae_pretrained_classifier(cfg: TrainConfig, num_classes: int) -> nn.Module | None:
    """For a classification run whose ``--pretrained`` file is a CRATE-MAE: a CRATE classifier built from its
    encoder (``--arch`` does not apply: the encoder fixes the architecture). None for any other file."""
    if cfg.objective != "classification" or not cfg.pretrained or not _is_mae_file(cfg.pretrained):
        return None
    mae = load_model(cfg.pretrained)
    assert isinstance(mae, CRATEMAE)
    return crate_classifier_from_mae(mae, num_classes)


def accuracy_counts(logits: Tensor, targets: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the top-k logits, for each k."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == targets[:, None]
    return [int(hit[:, : min(k, logits.shape[1])].any(dim=1).sum()) for k in ks]


def rng_state() -> dict[str, Any]:
    cuda = [s.cpu() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """JSON lines (and optional TensorBoard scalars) in the run directory; a no-op on non-main ranks.

    ``keep`` lines of an existing file are kept and the rest dropped: a resumed run keeps exactly the records
    written before its checkpoint (``metrics_lines``), so the log ends as an uninterrupted run's."""

    def __init__(self, run_dir: Path | None, tensorboard: bool, keep: int = 0, purge_step: int | None = None) -> None:
        self.path = run_dir / "metrics.jsonl" if run_dir else None
        self.lines = 0
        self.writer = None
        if self.path is not None:
            old = self.path.read_text().splitlines(keepends=True)[:keep] if keep != 0 and self.path.exists() else []
            old = [line for line in old if line.endswith("\n")]  # a line cut by a kill is not a record
            with writing(self.path):
                self.path.write_text("".join(old))
            self.lines = len(old)
        if run_dir is not None and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def write(self, record: dict[str, Any], step: int) -> None:
        if self.path is None:
            return
        with writing(self.path), self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.lines += 1
        if self.writer is not None:
            kind = record["kind"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step", "global_step"):
                    self.writer.add_scalar(f"{kind}/{k}", v, step)
            self.writer.flush()

    def history(self) -> list[dict[str, Any]]:
        if self.path is None or not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EFBIG: "the file is too large",
}


@contextmanager
def writing(path: Path, note: str = "") -> Iterator[None]:
    """Turn a full, read-only or forbidden output disk into one line naming the file (``note``: what is kept)."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        fix = "free space or choose another --output" if full else "choose another --output or fix its permissions"
        raise UserError(f"cannot write {path}: {WRITE_ERRORS[e.errno]} ({e.strerror}){note}; {fix}") from None


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy against epochs, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    accuracy = all("acc" in r for r in train) and all("top1" in r for r in val)  # not for masked autoencoding
    fig, axes = plt.subplots(1, 2 if accuracy else 1, figsize=(10 if accuracy else 5.5, 4), squeeze=False)
    ax_loss, ax_acc = axes[0, 0], axes[0, -1]
    if train:
        x = [r["epoch"] + r["step"] / r["steps"] for r in train]
        ax_loss.plot(x, [r["loss"] for r in train], label="train", lw=1)
        if accuracy:
            ax_acc.plot(x, [100 * r["acc"] for r in train], label="train (batch)", lw=1, alpha=0.6)
    if val:
        x = [r["epoch"] + 1 for r in val]
        ax_loss.plot(x, [r["loss"] for r in val], "o-", label="val")
        if accuracy:
            ax_acc.plot(x, [r["top1"] for r in val], "o-", label="val top-1")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    if accuracy:
        ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


class Progress:
    """A tqdm bar on a terminal; plain lines every ``print_freq`` steps otherwise."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str, print_freq: int) -> None:
        self.tty = enabled and sys.stderr.isatty()
        self.enabled, self.print_freq, self.desc, self.total = enabled, max(print_freq, 1), desc, total
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=True)

    def update(self, step: int, stats: dict[str, float] | None = None, text: str | None = None) -> None:
        if not self.enabled:
            return
        if text is None and stats is not None:
            acc = f"acc {100 * stats['acc']:.1f}% " if "acc" in stats else ""
            text = f"loss {stats['loss']:.4f} {acc}lr {stats['lr']:.2e} {stats['img_s']:.0f} img/s"
        text = text or ""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif step % self.print_freq == 0 or step == self.total:
            print(f"{self.desc} [{step}/{self.total}] {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Builds the model, data, optimiser and schedule of a run, and trains, evaluates and checkpoints it."""

    def __init__(
        self,
        cfg: TrainConfig,
        dist: DistInfo,
        resume: str | None = None,
        evaluate_only: bool = False,
        resume_state: dict[str, Any] | None = None,
    ):
        self.dist = dist
        if resume and resume_state is None:
            resume_state = read_resume_checkpoint(resume)
        self.resume_state = resume_state
        self.evaluate_only = evaluate_only
        if cfg.tensorboard:
            require("tensorboard", "tensorboard", "--tensorboard")
        self.info = data_info(cfg.data, cfg.dummy, cfg.num_classes, evaluate_only=evaluate_only)
        self.cfg = cfg = resolve_config(cfg, self.info)
        self.run_dir = self._run_dir(resume, evaluate_only)
        if cfg.batch_size % dist.world_size:
            raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {dist.world_size} processes")
        self.local_batch = cfg.batch_size // dist.world_size
        if cfg.amp == "fp16" and dist.device.type != "cuda":
            raise UserError("--amp fp16 needs a CUDA GPU; use --amp bf16 on the CPU")

        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        from_mae = mae_pretrained_classifier(cfg, self.info.num_classes)
        if from_mae is not None:  # the run records the encoder's name as its architecture
            self.cfg = cfg = replace(cfg, arch=from_mae.config.name or "crate_mae_encoder")
        self.model = build_model(cfg, self.info.num_classes) if from_mae is None else from_mae
        if is_family_model(self.model):  # checkpoints record the data's preprocessing (cratevit.presets)
            self.model.pretrained_cfg = self.model.default_cfg = pretrained_cfg_for(
                self.model.config, data_preprocessing(self.info.kind)
            )
        if cfg.pretrained and self.resume_state is None and from_mae is None:
            load_pretrained(self.model, cfg.pretrained)
        if is_family_model(self.model) and self.info.classes:  # predict / export name the classes
            self.model.pretrained_cfg = {**self.model.pretrained_cfg, "label_names": list(self.info.classes)}
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if not evaluate_only:  # a run the machine cannot hold says so now, not after the kernel kills it
            check_training_memory(self.model, cfg, self.local_batch, dist.device)
        self.model.to(dist.device)
        self.image_size = model_image_size(self.model)
        self.forward_model: nn.Module = torch.compile(self.model) if cfg.compile else self.model
        self.train_model = self.forward_model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.train_model = DDP(self.forward_model, device_ids=ids)

        self._build_data()
        self._build_optimisation()
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_top1 = -1.0 if self.objective.classifies else float("-inf")  # the best validation score
        self.batch_in_epoch = 0  # batches drawn this epoch: steps + batches whose images were all unreadable
        self.metrics_lines: int | None = 0  # records of metrics.jsonl to keep (a resumed run: its checkpoint's)
        self._saved_time, self._saved_step = time.monotonic(), 0  # when and at which step last.pt was written
        if dist.enabled:  # dropout etc. differ between ranks
            torch.manual_seed(cfg.seed + 7919 * dist.rank)
        if self.resume_state is not None:
            self._load_state(self.resume_state)
            self.resume_state = None

    # ------------------------------------------------------------------------------------------- building
    def _run_dir(self, resume: str | None, evaluate_only: bool) -> Path | None:
        cfg = self.cfg
        if evaluate_only:
            return None
        if cfg.output:
            run_dir = Path(cfg.output)
        elif resume:
            run_dir = resume_path(resume).parent.absolute()
        else:
            arch = (cfg.arch or "model").replace("/", "_")
            data = "dummy" if cfg.dummy else Path(cfg.data).name
            run_dir = Path("runs").absolute() / f"{data}-{arch}-{time.strftime('%Y%m%d-%H%M%S')}"
        if run_dir.exists() and not run_dir.is_dir():
            raise NotADirectoryError(f"--output {run_dir} is a file; pass a directory")
        if self.dist.is_main and run_dir.is_dir():
            RunLock.check(run_dir)  # another run is writing there: say so before anything else
        if not resume and (run_dir / "last.pt").exists():
            raise UserError(
                f"{run_dir} already holds a run (last.pt); continue it with --resume {run_dir}, "
                f"or choose another --output"
            )
        return run_dir if self.dist.is_main else None

    def _build_data(self) -> None:
        cfg, dist = self.cfg, self.dist
        if self.evaluate_only:  # the validation split alone (a folder may be the val folder itself)
            train_ds, val_ds = (
                None,
                build_eval_dataset(self.info, self.image_size, cfg.data_dir, cfg.download, cfg.seed),
            )
        else:
            augment = {"randaug_n": cfg.randaug_n, "erase_prob": cfg.erase_prob}
            if self.info.kind != "folder" or cfg.randaug_m != 14:  # ImageNet keeps torchvision's magnitude 9
                augment["randaug_m"] = cfg.randaug_m
            train_ds, val_ds = build_datasets(
                self.info, self.image_size, cfg.data_dir, cfg.randaug, cfg.download, cfg.seed, augment
            )
        if train_ds is not None and len(train_ds) < cfg.batch_size:
            raise UserError(
                f"the training set has {len(train_ds)} images, fewer than --batch-size "
                f"{cfg.batch_size}; lower the batch size"
            )
        self.train_sampler = EpochSampler(len(train_ds or val_ds), cfg.seed, True, dist.rank, dist.world_size)
        self.val_sampler = EpochSampler(len(val_ds), cfg.seed, False, dist.rank, dist.world_size, pad=False)
        common = {
            "num_workers": cfg.workers,
            "collate_fn": collate_skip,
            "worker_init_fn": ignore_stop_signals,
            "pin_memory": dist.device.type == "cuda",
            "persistent_workers": False,
        }
        # Each loader draws its workers' base seed from its own generator, not from the global RNG: creating an
        # iterator after --resume restored the RNG state must not shift the dropout masks of the next steps.
        # (Augmentation does not depend on it: SeededDataset seeds every sample.)
        self.train_loader = torch.utils.data.DataLoader(
            SeededDataset(train_ds if train_ds is not None else val_ds),
            batch_size=self.local_batch,
            sampler=self.train_sampler,
            drop_last=train_ds is not None,
            generator=torch.Generator().manual_seed(cfg.seed),
            **common,
        )
        self.val_loader = torch.utils.data.DataLoader(
            SeededDataset(val_ds),
            batch_size=self.local_batch,
            sampler=self.val_sampler,
            generator=torch.Generator().manual_seed(cfg.seed),
            **common,
        )
        self.steps_per_epoch = len(self.train_loader)
        if cfg.steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.steps_per_epoch)

    def _build_optimisation(self) -> None:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        cfg = self.cfg
        extra = {"betas": tuple(cfg.betas)} if cfg.betas else {}
        try:
            self.optimizer = create_optimizer_v2(
                self.model,
                opt=cfg.optimizer.lower(),
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                momentum=cfg.momentum,
                **extra,
            )
        except (AssertionError, ValueError) as e:
            raise UserError(f"--optimizer {cfg.optimizer!r}: {e}; try lion, adamw or sgd") from None
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer,
            sched="cosine",
            num_epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.lr * 0.01,
            min_lr=cfg.min_lr,
            step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch,
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
        # what is optimised: the only difference between train/finetune and pretrain (cratevit.train.objectives)
        options = {"label_smoothing": cfg.label_smoothing, "mixup": cfg.mixup, "cutmix": cfg.cutmix}
        self.objective = make_objective(
            cfg.objective, self.model, self.info.num_classes, options, cfg.seed, self.dist.rank
        )

    def autocast(self) -> AbstractContextManager:
        if self.cfg.amp == "none":
            return nullcontext()
        return torch.autocast(self.dist.device.type, dtype=AMP_DTYPES[self.cfg.amp])

    # ------------------------------------------------------------------------------------------- state
    def state(self, rng_ranks: list[Any] | None = None) -> dict[str, Any]:
        """A checkpoint that :meth:`_load_state` continues from exactly (``rng_ranks``: every process's RNG)."""
        log = getattr(self, "log", None)
        return checkpoint_payload(
            self.model,
            self.cfg.arch,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            epoch=self.epoch,
            step_in_epoch=self.step_in_epoch,
            batch_in_epoch=self.batch_in_epoch,
            global_step=self.global_step,
            best_top1=self.best_top1,
            rng=rng_state(),
            rng_ranks=rng_ranks,
            metrics_lines=log.lines if log else 0,
            train_config=asdict(self.cfg),
        )

    def _load_state(self, ckpt: dict[str, Any]) -> None:
        if is_family_model(self.model):
            load_state_dict_strict(self.model, ckpt["model"], source="--resume")
        else:
            self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        schedule = ("epochs", "warmup_epochs", "lr", "min_lr")
        before = ckpt["train_config"]
        if all(before.get(k) == getattr(self.cfg, k) for k in schedule):  # else: the new schedule (e.g. more epochs)
            self.scheduler.load_state_dict(dict(ckpt["scheduler"]))
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step_in_epoch = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
        self.batch_in_epoch = int(ckpt.get("batch_in_epoch", self.step_in_epoch))
        self.global_step, self.best_top1 = int(ckpt["global_step"]), float(ckpt["best_top1"])
        self.metrics_lines = ckpt.get("metrics_lines")  # None (older checkpoints): keep the whole log
        self._saved_step = self.global_step
        self.scheduler.step_update(self.global_step)
        ranks, dist = ckpt.get("rng_ranks"), self.dist
        if not dist.enabled:
            set_rng_state(ckpt["rng"])
        elif ranks and len(ranks) == dist.world_size:
            set_rng_state(ranks[dist.rank])
        else:  # another process count: the dropout of the remaining steps differs from the first run's
            torch.manual_seed(self.cfg.seed + 7919 * dist.rank + self.global_step)

    def save(self, name: str) -> Path | None:
        """Write a checkpoint atomically (called by every process: it gathers their RNG states). Non-finite
        weights are never written: the run stops instead, keeping the previous file."""
        ranks = all_gather_objects(rng_state(), self.dist) if self.dist.enabled else None
        bad = [k for k, v in self.model.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]
        if bad:
            raise self._diverged(f"weights ({len(bad)} tensors, e.g. {bad[0]})", "non-finite", 0)
        if name == "last.pt":
            self._saved_time, self._saved_step = time.monotonic(), self.global_step
        if self.run_dir is None:
            return None
        path = self.run_dir / name
        with writing(path, f"; the previous {name} is kept" if path.exists() else "; no checkpoint was written"):
            atomic_save(self.state(ranks), path)
        return path

    def _diverged(self, what: str, value: Any, ahead: int) -> Diverged:
        """The error that stops a run whose numbers became non-finite, saying truthfully what is on disk
        (``ahead``: 1 while computing the next step, 0 after it)."""
        where = f"epoch {self.epoch} step {self.step_in_epoch + ahead} (global step {self.global_step + ahead})"
        if self.run_dir is None:
            kept = "the first process writes the checkpoints; lower --lr or set --clip-grad"
        elif (self.run_dir / "last.pt").exists():
            kept = (
                f"the last good checkpoint {self.run_dir / 'last.pt'} is kept: continue from it with --resume "
                f"{self.run_dir} and a lower --lr (or set --clip-grad)"
            )
        else:
            kept = f"no checkpoint was written yet in {self.run_dir}: start again with a lower --lr or set --clip-grad"
        return Diverged(f"the {what} became {value} at {where}; stopped before saving non-finite weights; {kept}")

    # ------------------------------------------------------------------------------------------- loop
    def fit(self) -> int:
        """Train to the last epoch; returns 0, or 128 + signal number if stopped by SIGTERM/SIGINT."""
        lock = None
        if self.run_dir is not None:
            with writing(self.run_dir):
                self.run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(self.run_dir)
        try:
            return self._fit()
        finally:
            if lock is not None:
                lock.release()

    def _fit(self) -> int:
        cfg = self.cfg
        if self.run_dir is not None:
            for stale in [*self.run_dir.glob(".*.pt.*.tmp"), self.run_dir / "curves.tmp.png"]:
                stale.unlink(missing_ok=True)  # half-written by a killed run (we hold the lock: nobody else writes)
            with writing(self.run_dir / "config.json"):
                (self.run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        resumed = self.global_step > 0 or self.epoch > 0
        self.log = MetricsLog(
            self.run_dir, cfg.tensorboard, keep=self.metrics_lines, purge_step=self.global_step + 1 if resumed else None
        )
        self._plotted = time.perf_counter()
        self._announce()
        try:
            with StopFlag() as stop:
                while self.epoch < cfg.epochs:
                    signum = self.train_epoch(stop)
                    if signum:
                        self.save("last.pt")
                        self._say(
                            f"stopped by signal {signal_name(signum)} at epoch {self.epoch} step "
                            f"{self.step_in_epoch}; saved {self.run_dir / 'last.pt' if self.run_dir else ''}; "
                            f"continue with --resume {self.run_dir}"
                        )
                        return 128 + signum
                    self.end_epoch()
        finally:
            self.log.close()
        best = (
            f"top-1 {self.best_top1:.2f}%"
            if self.objective.classifies
            else f"{self.objective.name} loss {-self.best_top1:.4f}"
        )
        self._say(f"done: best val {best} ; run directory {self.run_dir}")
        return 0

    def _say(self, text: str) -> None:
        if self.dist.is_main:
            print(text, flush=True)

    def _announce(self) -> None:
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.model.parameters())
        self._say(
            f"cratevit: {cfg.arch} ({n_params:,} params, {self.image_size}px) on {self.info.name} "
            f"({self.info.num_classes} classes), {cfg.epochs} epochs x {self.steps_per_epoch} steps of "
            f"{cfg.batch_size} images, {cfg.optimizer} lr {cfg.lr:g}, {self.dist.world_size} process(es) on "
            f"{self.dist.device.type}; run directory {self.run_dir}"
        )
        if cfg.warmup_epochs >= cfg.epochs and not self.evaluate_only:
            self._say(
                f"warning: --warmup-epochs {cfg.warmup_epochs:g} is not shorter than the run ({cfg.epochs} epochs): "
                f"the learning rate never reaches --lr {cfg.lr:g} and the cosine decay never starts; pass "
                f"--warmup-epochs below {cfg.epochs}"
            )
        if cfg.compile and not self.evaluate_only:
            self._say("torch.compile: the first steps compile the model (about 30-80 s on a CPU) before any progress")

    def _batches(self) -> Iterator[Batch]:
        self.train_sampler.set_epoch(self.epoch, skip=self.batch_in_epoch * self.local_batch)
        with stop_signals_held():  # the workers are forked here
            return iter(self.train_loader)

    def _agree(self, stop: StopFlag) -> tuple[int, bool]:
        """(signal number or 0, whether a step checkpoint is due), the same on every process."""
        cfg = self.cfg
        if self.step_in_epoch == 0 or self.global_step == self._saved_step:
            due = False  # just started, resumed, or saved at the epoch's end
        elif cfg.save_every is None:
            due = time.monotonic() - self._saved_time >= SAVE_EVERY_MINUTES * 60
        else:
            due = cfg.save_every > 0 and self.global_step % cfg.save_every == 0
        if not self.dist.enabled:
            return stop.signum or 0, due
        flags = all_reduce_max(torch.tensor([stop.signum or 0, int(due)], device=self.dist.device), self.dist)
        return int(flags[0]), bool(flags[1])

    def train_epoch(self, stop: StopFlag) -> int:
        """Train the rest of the current epoch; returns 0, or the number of a signal that asked to stop."""
        cfg, dist = self.cfg, self.dist
        self.train_model.train()
        progress = Progress(
            dist.is_main,
            self.steps_per_epoch,
            self.step_in_epoch,
            f"epoch {self.epoch + 1}/{cfg.epochs}",
            cfg.print_freq,
        )
        batches = self._batches()
        window = {"loss": 0.0, "correct": 0, "seen": 0, "skipped": 0, "t0": time.perf_counter()}
        try:
            while self.step_in_epoch < self.steps_per_epoch:
                signum, save_due = self._agree(stop)
                if signum:
                    return signum
                if save_due:
                    self.save("last.pt")
                batch = next(batches, None)
                if batch is None:  # batches of unreadable images were skipped: the epoch has fewer steps
                    break
                self.batch_in_epoch += 1
                window["skipped"] += batch.skipped
                if any_true(len(batch.targets) == 0, dist):
                    continue  # every image unreadable (on some process): not a step
                loss, correct = self.train_step(batch)
                self.step_in_epoch += 1
                self.global_step += 1
                self.scheduler.step_update(self.global_step)
                window["loss"] += loss * len(batch.targets)
                window["correct"] += correct
                window["seen"] += len(batch.targets)
                stats = self._window_stats(window)
                progress.update(self.step_in_epoch, stats)
                if self.step_in_epoch % max(cfg.print_freq, 1) == 0 or self.step_in_epoch == self.steps_per_epoch:
                    self._log_train(stats)
                    window = {"loss": 0.0, "correct": 0, "seen": 0, "skipped": 0, "t0": time.perf_counter()}
        finally:
            progress.close()
        if self.step_in_epoch == 0:
            raise UserError(
                f"no training image of {self.info.name} could be read in epoch {self.epoch + 1} "
                f"({self.batch_in_epoch} batches, {int(window['skipped'])} unreadable images skipped, "
                f"see the warnings); fix or remove the files"
            )
        return 0  # a signal during the last step is seen before the next epoch's first step

    def _window_stats(self, w: dict[str, Any]) -> dict[str, float]:
        totals = torch.tensor([w["loss"], w["correct"], w["seen"], w["skipped"]], dtype=torch.float64)
        dt = max(time.perf_counter() - w["t0"], 1e-9)
        seen = max(totals[2].item(), 1.0)
        stats = {
            "loss": totals[0].item() / seen,
            "acc": totals[1].item() / seen,
            "lr": self.optimizer.param_groups[0]["lr"],
            "img_s": seen * self.dist.world_size / dt,
            "skipped": totals[3].item(),
            "seen": seen,
        }
        if not self.objective.classifies:  # no labels predicted: no accuracy
            del stats["acc"]
        return stats

    def _log_train(self, stats: dict[str, float]) -> None:
        if self.dist.enabled:  # average over ranks
            t = torch.tensor(
                [stats["loss"] * stats["seen"], stats.get("acc", 0.0) * stats["seen"], stats["seen"], stats["skipped"]],
                dtype=torch.float64,
            )
            t = all_reduce_sum(t.to(self.dist.device), self.dist).cpu()
            stats = {**stats, "loss": t[0].item() / t[2].item(), "skipped": t[3].item()}
            if "acc" in stats:
                stats["acc"] = t[1].item() / t[2].item()
        record = {
            "kind": "train",
            "epoch": self.epoch,
            "step": self.step_in_epoch,
            "steps": self.steps_per_epoch,
            "global_step": self.global_step,
            "loss": stats["loss"],
            "acc": stats.get("acc"),
            "lr": stats["lr"],
            "img_s": stats["img_s"],
            "skipped_images": int(stats["skipped"]),
        }
        if "acc" not in stats:
            del record["acc"]
        self.log.write(record, self.global_step)

    def train_step(self, batch: Batch) -> tuple[float, int]:
        """One optimiser step; returns (mean loss, correct predictions against the hard labels)."""
        cfg, dev = self.cfg, self.dist.device
        x = batch.images.to(dev, non_blocking=True)
        y = batch.targets.to(dev, non_blocking=True)
        with self.autocast():
            loss, logits = self.objective.train_loss(self.train_model, x, y, self.global_step)
        if any_true(not bool(torch.isfinite(loss)), self.dist):
            raise self._diverged("loss", loss.item(), 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        norm = None
        if cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        if not self.scaler.is_enabled():  # (fp16 loss scaling skips the steps whose gradients overflow)
            if norm is None:
                norm = nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
            if any_true(not bool(torch.isfinite(norm)), self.dist):  # a finite loss can have NaN gradients
                raise self._diverged("gradient norm", norm.item(), 1)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item(), 0 if logits is None else int((logits.argmax(1) == y).sum())

    def end_epoch(self) -> None:
        metrics = self.evaluate()
        score = self.objective.score(metrics)
        is_best = score > self.best_top1
        self.best_top1 = max(self.best_top1, score)  # the objective's score: top-1, or minus the loss
        self.epoch += 1
        self.step_in_epoch = self.batch_in_epoch = 0
        best = {"best_top1": self.best_top1} if self.objective.classifies else {"best_loss": -self.best_top1}
        record = {"kind": "val", "epoch": self.epoch - 1, "global_step": self.global_step, **metrics, **best}
        self.log.write(record, self.global_step)
        if self.objective.classifies:
            self._say(
                f"epoch {self.epoch}/{self.cfg.epochs}: val loss {metrics['loss']:.4f} top-1 "
                f"{metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% (best {self.best_top1:.2f}%)"
            )
        else:
            self._say(
                f"epoch {self.epoch}/{self.cfg.epochs}: val {self.objective.name} loss {metrics['loss']:.4f} "
                f"(best {-self.best_top1:.4f})"
            )
        self.save("last.pt")
        if is_best:
            self.save("best.pt")
        last = self.epoch == self.cfg.epochs
        if self.run_dir is not None and (last or time.perf_counter() - self._plotted > PLOT_EVERY_S):
            plot_curves(self.log.history(), self.run_dir / "curves.png")
            self._plotted = time.perf_counter()
        barrier(self.dist)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss, top-1 and top-5 accuracy (%) over the whole validation set, all ranks together."""
        self.forward_model.eval()
        dev = self.dist.device
        sums = torch.zeros(self.objective.num_sums, dtype=torch.float64)  # the objective's sums, last: the count
        skipped = torch.zeros(1, dtype=torch.float64)
        progress = Progress(self.dist.is_main, len(self.val_loader), 0, "validation", self.cfg.print_freq)
        with stop_signals_held():  # the workers are forked here
            batches = iter(self.val_loader)
        for index, batch in enumerate(batches):
            progress.update(index + 1, text=f"{index + 1} batches")
            skipped += batch.skipped
            if len(batch.targets) == 0:
                continue
            x, y = batch.images.to(dev), batch.targets.to(dev)
            with self.autocast():
                sums += self.objective.eval_sums(self.forward_model, x, y, index)
        progress.close()
        totals = all_reduce_sum(torch.cat([sums, skipped]).to(dev), self.dist).cpu()
        if totals[-2] == 0:
            raise UserError(
                f"none of the {int(totals[-1])} validation images of {self.info.name} could be read (see "
                f"the warnings); fix or remove the files"
            )
        return {**self.objective.metrics(totals[:-1]), "skipped_images": int(totals[-1].item())}


def train(
    cfg: TrainConfig, resume: str | None = None, evaluate_only: bool = False, resume_state: dict[str, Any] | None = None
) -> int:
    """Run (or continue, or only evaluate) a training run; the entry point of both commands.

    ``resume_state`` is the already-read ``--resume`` checkpoint, so that it is not read twice."""
    dist = init_distributed(cfg.device)
    threads = torch.get_num_threads()  # --threads applies to this run only
    try:
        trainer = Trainer(cfg, dist, resume=resume, evaluate_only=evaluate_only, resume_state=resume_state)
        if trainer.cfg.threads:  # the recipe's thread count, for this run only (restored below)
            torch.set_num_threads(trainer.cfg.threads)
        if evaluate_only:
            metrics = trainer.evaluate()
            if dist.is_main:
                print(json.dumps({"arch": trainer.cfg.arch, "data": trainer.info.name, **metrics}))
            return 0
        return trainer.fit()
    finally:
        torch.set_num_threads(threads)
        cleanup(dist)
