"""The training loop behind ``cratevit train``, ``finetune`` and ``pretrain``: one configuration, one loop.

A run is described by a :class:`TrainConfig`. Fields left ``None`` take the recipe of the data (see
:data:`RECIPES`). The engine room around this loop:

* :mod:`.build`: the model, data loaders, optimiser, schedule and objective;
* :mod:`.state`: ``--resume`` as one value (:class:`~cratevit.train.state.Resume`), the RNG state;
* :mod:`.rundir`: the run directory, its lock, signals and write errors;
* :mod:`.logs`: ``metrics.jsonl``, ``curves.png``, progress lines and the running metrics window.

The run directory receives ``config.json`` (rerun with ``--config``), ``metrics.jsonl``, ``last.pt``, ``best.pt``,
``curves.png`` and, with ``--tensorboard``, an event file.

Nothing is lost: checkpoints are written atomically, at each epoch's end and every ``--save-every`` steps (by
default every 10 minutes); SIGTERM/SIGINT (also sent to the data workers, as ``timeout``, SLURM and Kubernetes do)
save a resumable ``last.pt`` at the current step, also when they arrive during the last validation; resuming
(``--resume``) continues mid-epoch with the same data order, augmentation, dropout and running metrics window, so
the final weights and ``metrics.jsonl`` equal those of an uninterrupted run. Nothing is silently wrong: non-finite
weights are never saved (a run that diverges before its first checkpoint saves the finite weights of the steps
before the bad one), a run directory is locked while a run uses it, and batches whose images are all unreadable
are not counted as steps. Epochs are numbered from 1 in every message and record ("epoch 3/30").
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import atomic_save, load_state_dict_strict
from ..data import Batch, data_info
from ..errors import UserError, require
from ..presets import data_preprocessing, pretrained_cfg_for
from ..registry import ddp_prepare, is_family_model
from .build import (
    build_loaders,
    build_model,
    build_optimisation,
    checkpoint_payload,
    classifier_from_autoencoder,
    load_pretrained,
    model_from_checkpoint,
    model_image_size,
)
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
    peers_watched,
)
from .logs import PROGRESS_EVERY_S, MetricsLog, Progress, RunningWindow, plot_curves
from .memory import check_training_memory
from .rundir import RunLock, StopFlag, choose_run_dir, remove_stale_files, signal_name, stop_signals_held, writing
from .state import Resume, load_run_config, read_resume_checkpoint, resume_path, rng_state, set_rng_state

__all__ = [
    "PROGRESS_EVERY_S",
    "RECIPES",
    "Diverged",
    "Resume",
    "RunLock",
    "TrainConfig",
    "Trainer",
    "load_run_config",
    "read_resume_checkpoint",
    "resolve_config",
    "resume_path",
    "train",
]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PLOT_EVERY_S = 60.0  # redraw curves.png at most this often (and after the last epoch): plotting costs ~0.5 s


class Diverged(UserError):
    """The loss, the gradients or the weights became non-finite; nothing non-finite was saved."""


class Trainer:
    """Builds the model, data, optimiser and schedule of a run, and trains, evaluates and checkpoints it.

    ``resume``: the run to continue (:class:`Resume`, or a run directory / ``last.pt`` path, read once here)."""

    def __init__(
        self, cfg: TrainConfig, dist: DistInfo, resume: Resume | str | Path | None = None, evaluate_only: bool = False
    ):
        self.dist = dist
        if resume is not None and not isinstance(resume, Resume):
            resume = Resume.read(resume)
        self.evaluate_only = evaluate_only
        if cfg.tensorboard:
            require("tensorboard", "tensorboard", "--tensorboard")
        self.info = data_info(cfg.data, cfg.dummy, cfg.num_classes, evaluate_only=evaluate_only)
        self.cfg = cfg = resolve_config(cfg, self.info)
        if resume is not None and not evaluate_only:
            resume.check_config_file()
            resume.check_options(cfg)
        self.run_dir = None
        if not evaluate_only:
            run_dir = choose_run_dir(
                cfg.output, resume.run_dir if resume else None, cfg.arch, cfg.data, cfg.dummy, dist.is_main
            )
            self.run_dir = run_dir if dist.is_main else None
        if cfg.batch_size % dist.world_size:
            raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {dist.world_size} processes")
        self.local_batch = cfg.batch_size // dist.world_size
        if cfg.amp == "fp16" and dist.device.type != "cuda":
            raise UserError("--amp fp16 needs a CUDA GPU; use --amp bf16 on the CPU")

        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.model = self._model(resume)
        if dist.enabled:  # what the family needs before DistributedDataParallel (ToST: SyncBatchNorm on GPUs)
            self.model = ddp_prepare(self.model, dist.device.type)
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if not evaluate_only:  # a run the machine cannot hold says so now, not after the kernel kills it
            check_training_memory(self.model, self.cfg, self.local_batch, dist.device)
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
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0  # epochs finished; steps of the current one
        self.best_score = -1.0 if self.objective.classifies else float("-inf")  # top-1, or minus the loss
        self.best_epoch: int | None = None  # the epoch (1-based) whose weights are best.pt
        self.batch_in_epoch = 0  # batches drawn this epoch: steps + batches whose images were all unreadable
        self.window = RunningWindow()  # the steps since the last train record
        self.metrics_lines: int | None = 0  # records of metrics.jsonl to keep (a resumed run: its checkpoint's)
        self._saved_time, self._saved_step = time.monotonic(), 0  # when and at which step last.pt was written
        self._has_last = resume is not None  # whether the run has a last.pt (known on every process)
        self._resumed_config: dict[str, Any] | None = None
        if dist.enabled:  # dropout etc. differ between ranks
            torch.manual_seed(cfg.seed + 7919 * dist.rank)
        if resume is not None:
            self._load_state(resume.state)

    # ------------------------------------------------------------------------------------------- building
    def _model(self, resume: Resume | None) -> nn.Module:
        """The run's model: the checkpoint's own (resume), a classifier from an autoencoder's encoder, or the
        ``--arch`` model with the ``--pretrained`` weights."""
        cfg, classes = self.cfg, self.info.num_classes
        if resume is not None:  # built from the checkpoint's configuration; its weights are loaded with the state
            model = model_from_checkpoint(resume.state, cfg, classes)
        else:
            model = classifier_from_autoencoder(cfg, classes)
            if model is not None:  # the run records the encoder's name as its architecture
                self.cfg = cfg = replace(cfg, arch=model.config.name or "crate_mae_encoder")
            else:
                model = build_model(cfg, classes)
                if cfg.pretrained:
                    load_pretrained(model, cfg.pretrained)
        if is_family_model(model):  # checkpoints record the data's preprocessing and class names
            model.pretrained_cfg = model.default_cfg = pretrained_cfg_for(
                model.config, data_preprocessing(self.info.kind)
            )
            if self.info.classes:
                model.pretrained_cfg = {**model.pretrained_cfg, "label_names": list(self.info.classes)}
        return model

    def _build_data(self) -> None:
        loaders = build_loaders(self.cfg, self.info, self.image_size, self.dist, self.local_batch, self.evaluate_only)
        self.train_loader, self.val_loader = loaders.train, loaders.val
        self.train_sampler, self.val_sampler = loaders.train_sampler, loaders.val_sampler
        self.steps_per_epoch = len(self.train_loader)
        if self.cfg.steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, self.cfg.steps_per_epoch)

    def _build_optimisation(self) -> None:
        self.optimizer, self.scheduler, self.scaler, self.objective = build_optimisation(
            self.cfg, self.model, self.steps_per_epoch, self.info.num_classes, self.dist
        )

    def autocast(self) -> AbstractContextManager:
        if self.cfg.amp == "none":
            return nullcontext()
        return torch.autocast(self.dist.device.type, dtype=AMP_DTYPES[self.cfg.amp])

    # ------------------------------------------------------------------------------------------- state
    def state(self, rng_ranks: list[Any] | None = None, windows: list[Any] | None = None) -> dict[str, Any]:
        """A checkpoint that :meth:`_load_state` continues from exactly (``rng_ranks``/``windows``: every
        process's RNG state and running metrics window)."""
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
            best_score=self.best_score,
            best_epoch=self.best_epoch,
            rng=rng_state(),
            rng_ranks=rng_ranks,
            windows=windows or [self.window.state_dict()],
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
        before = self._resumed_config = dict(ckpt["train_config"])
        if all(before.get(k) == getattr(self.cfg, k) for k in schedule):  # else: the new schedule (e.g. more epochs)
            self.scheduler.load_state_dict(dict(ckpt["scheduler"]))
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step_in_epoch = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
        self.batch_in_epoch = int(ckpt.get("batch_in_epoch", self.step_in_epoch))
        self.global_step = int(ckpt["global_step"])
        self.best_score = float(ckpt.get("best_score", ckpt.get("best_top1", self.best_score)))  # (older: best_top1)
        self.best_epoch = ckpt.get("best_epoch")
        self.metrics_lines = ckpt.get("metrics_lines")  # None (older checkpoints): keep the whole log
        self._saved_step = self.global_step
        self.scheduler.step_update(self.global_step)
        ranks, windows, dist = ckpt.get("rng_ranks"), ckpt.get("windows") or [], self.dist
        if len(windows) == dist.world_size:
            self.window = RunningWindow.from_state(windows[dist.rank])
        if not dist.enabled:
            set_rng_state(ckpt["rng"])
        elif ranks and len(ranks) == dist.world_size:
            set_rng_state(ranks[dist.rank])
        else:  # another process count: the dropout of the remaining steps differs from the first run's
            torch.manual_seed(self.cfg.seed + 7919 * dist.rank + self.global_step)

    def save(self, name: str) -> Path | None:
        """Write a checkpoint atomically (called by every process: it gathers their RNG states and windows).
        Non-finite weights are never written: the run stops instead, keeping the previous file."""
        ranks = all_gather_objects(rng_state(), self.dist) if self.dist.enabled else None
        windows = all_gather_objects(self.window.state_dict(), self.dist)
        bad = [k for k, v in self.model.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]
        if bad:
            raise self._diverged(f"weights ({len(bad)} tensors, e.g. {bad[0]})", "non-finite", 0)
        if name == "last.pt":
            self._saved_time, self._saved_step, self._has_last = time.monotonic(), self.global_step, True
        if self.run_dir is None:
            return None
        path = self.run_dir / name
        with writing(path, f"; the previous {name} is kept" if path.exists() else "; no checkpoint was written"):
            atomic_save(self.state(ranks, windows), path)
        return path

    def _where(self, ahead: int) -> str:
        """The step a message is about, epochs 1-based (``ahead``: 1 while computing the next step)."""
        if ahead == 0 and self.step_in_epoch == 0 and self.epoch > 0:
            return f"the end of epoch {self.epoch} (global step {self.global_step})"
        return f"epoch {self.epoch + 1} step {self.step_in_epoch + ahead} (global step {self.global_step + ahead})"

    def _diverged(self, what: str, value: Any, ahead: int) -> Diverged:
        """The error that stops a run whose numbers became non-finite, saying truthfully what is on disk
        (``ahead``: 1 while computing the next step, whose update was not applied; 0 after it). A run that has no
        checkpoint yet saves the finite weights of the steps before the bad one."""
        where = self._where(ahead)
        fix = "a lower --lr (or set --clip-grad)"
        if ahead and not self._has_last and self.global_step > 0:  # keep the steps before the bad one
            self.batch_in_epoch -= 1  # the bad batch was drawn: a resumed run draws it again
            self.save("last.pt")
            self.batch_in_epoch += 1
            if self.run_dir is None:
                return Diverged(f"the {what} became {value} at {where}; the first process saved the steps before it")
            return Diverged(
                f"the {what} became {value} at {where}; stopped before applying it: the finite weights of the "
                f"{self.global_step} steps before it are saved in {self.run_dir / 'last.pt'}; continue with --resume "
                f"{self.run_dir} and {fix}"
            )
        if self.run_dir is None:
            kept = f"the first process writes the checkpoints; use {fix}"
        elif self._has_last:
            kept = (
                f"the last good checkpoint {self.run_dir / 'last.pt'} is kept: continue from it with --resume "
                f"{self.run_dir} and {fix}"
            )
        else:
            kept = f"no checkpoint was written yet in {self.run_dir}: start again with {fix}"
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
            remove_stale_files(self.run_dir)
            with writing(self.run_dir / "config.json"):
                (self.run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        resumed = self.global_step > 0 or self.epoch > 0
        self.log = MetricsLog(
            self.run_dir, cfg.tensorboard, keep=self.metrics_lines, purge_step=self.global_step + 1 if resumed else None
        )
        if self._resumed_config is not None and self._resumed_config != asdict(cfg):
            self.save("last.pt")  # options changed on --resume: last.pt and config.json agree from now on
        self._plotted = time.perf_counter()
        self._announce()
        try:
            with StopFlag() as stop:
                while self.epoch < cfg.epochs:
                    signum = self.train_epoch(stop)
                    if signum:
                        self.save("last.pt")
                        self._say(
                            f"stopped by signal {signal_name(signum)} at epoch {self.epoch + 1}/{cfg.epochs} step "
                            f"{self.step_in_epoch}/{self.steps_per_epoch}; saved "
                            f"{self.run_dir / 'last.pt' if self.run_dir else ''}; continue with --resume {self.run_dir}"
                        )
                        return 128 + signum
                    self.end_epoch()
                signum = self._signal(stop)  # one that arrived during the last validation
                if signum:
                    self._say(
                        f"stopped by signal {signal_name(signum)} after the last epoch's validation "
                        f"(epoch {self.epoch}/{cfg.epochs}); the run is complete: {self._best_text()}"
                    )
                    return 128 + signum
        finally:
            self.log.close()
        self._say(f"done: {self._best_text()}; run directory {self.run_dir}")
        return 0

    def _best_text(self) -> str:
        """The best validation score and where its weights are (truthfully, if best.pt was deleted)."""
        score = (
            f"top-1 {self.best_score:.2f}%"
            if self.objective.classifies
            else f"{self.objective.name} loss {-self.best_score:.4f}"
        )
        at = f" at epoch {self.best_epoch}" if self.best_epoch else ""
        if self.run_dir is not None and self.best_epoch is not None and not (self.run_dir / "best.pt").exists():
            return (
                f"best val {score}{at}, whose best.pt was deleted (no later epoch was better: there is no best.pt; "
                f"last.pt holds the final weights)"
            )
        return f"best val {score}{at}"

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
        if self.epoch or self.step_in_epoch:
            self._say(
                f"resumed at epoch {self.epoch + 1}/{cfg.epochs} step {self.step_in_epoch}/{self.steps_per_epoch}"
            )
        if self.best_epoch is not None and self.run_dir is not None and not (self.run_dir / "best.pt").exists():
            self._say(
                f"warning: {self.run_dir / 'best.pt'} (epoch {self.best_epoch}) was deleted; it cannot be restored: "
                f"a later epoch better than it writes best.pt again"
            )
        if cfg.warmup_epochs >= cfg.epochs and cfg.warmup_epochs > 0 and not self.evaluate_only:
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

    def _signal(self, stop: StopFlag) -> int:
        """The number of a signal that asked to stop (0: none), the same on every process."""
        if not self.dist.enabled:
            return stop.signum or 0
        return int(all_reduce_max(torch.tensor([stop.signum or 0], device=self.dist.device), self.dist)[0])

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
        self.window.t0 = time.perf_counter()
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
                self.window.skipped += batch.skipped
                if any_true(len(batch.targets) == 0, dist):
                    continue  # every image unreadable (on some process): not a step
                loss, correct = self.train_step(batch)
                self.step_in_epoch += 1
                self.global_step += 1
                self.scheduler.step_update(self.global_step)
                self.window.add(loss, correct, len(batch.targets))
                stats = self._window_stats()
                progress.update(self.step_in_epoch, stats)
                if self.step_in_epoch % max(cfg.print_freq, 1) == 0 or self.step_in_epoch == self.steps_per_epoch:
                    self._log_train(stats)
                    self.window = RunningWindow()
        finally:
            progress.close()
        if self.step_in_epoch == 0:
            raise UserError(
                f"no training image of {self.info.name} could be read in epoch {self.epoch + 1} "
                f"({self.batch_in_epoch} batches, {self.window.skipped} unreadable images skipped, "
                f"see the warnings); fix or remove the files"
            )
        return 0  # a signal during the last step is seen before the next epoch's first step

    def _window_stats(self) -> dict[str, float]:
        w = self.window
        dt = max(time.perf_counter() - w.t0, 1e-9)
        seen = max(float(w.seen), 1.0)
        stats = {
            "loss": w.loss / seen,
            "acc": w.correct / seen,
            "lr": self.optimizer.param_groups[0]["lr"],
            "img_s": seen * self.dist.world_size / dt,
            "skipped": float(w.skipped),
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
            "epoch": self.epoch + 1,
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
        is_best = score > self.best_score
        self.epoch += 1
        if is_best:
            self.best_score, self.best_epoch = score, self.epoch
        self.step_in_epoch = self.batch_in_epoch = 0
        best = {"best_top1": self.best_score} if self.objective.classifies else {"best_loss": -self.best_score}
        record = {"kind": "val", "epoch": self.epoch, "global_step": self.global_step, **metrics, **best}
        self.log.write(record, self.global_step)
        if self.objective.classifies:
            self._say(
                f"epoch {self.epoch}/{self.cfg.epochs}: val loss {metrics['loss']:.4f} top-1 "
                f"{metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% (best {self.best_score:.2f}%)"
            )
        else:
            self._say(
                f"epoch {self.epoch}/{self.cfg.epochs}: val {self.objective.name} loss {metrics['loss']:.4f} "
                f"(best {-self.best_score:.4f})"
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


def train(cfg: TrainConfig, resume: Resume | str | Path | None = None, evaluate_only: bool = False) -> int:
    """Run (or continue, or only evaluate) a training run; the entry point of every training command.

    ``resume``: the run to continue, read once (:class:`Resume`; a path is read here)."""
    dist = init_distributed(cfg.device)
    threads = torch.get_num_threads()  # --threads applies to this run only
    try:
        with peers_watched(dist, cfg.output):
            trainer = Trainer(cfg, dist, resume=resume, evaluate_only=evaluate_only)
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
