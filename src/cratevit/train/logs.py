"""What a run reports: ``metrics.jsonl`` (and TensorBoard scalars), ``curves.png``, the progress lines, and the
running window of the steps since the last train record.

Records number epochs from 1, as the messages do ("epoch 3/30"): a train record's ``epoch`` is the epoch in
progress, a val record's the epoch just finished.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CratevitWarning
from .rundir import writing

__all__ = ["PROGRESS_EVERY_S", "MetricsLog", "Progress", "RunningWindow", "plot_curves"]

PROGRESS_EVERY_S = 30.0
"""Without a terminal, a progress line at least this often (seconds; slow steps still show life)."""


@dataclass
class RunningWindow:
    """The steps since the last train record: summed loss, correct predictions, images, skipped images.

    Part of the run state (:meth:`state_dict` goes into ``last.pt``): after a mid-epoch resume the first record
    averages the same steps as the uninterrupted run's, so ``metrics.jsonl`` ends the same."""

    loss: float = 0.0
    correct: int = 0
    seen: int = 0
    skipped: int = 0
    t0: float = field(default_factory=time.perf_counter)  # for the throughput (not saved: timing differs anyway)

    def add(self, loss: float, correct: int, images: int) -> None:
        self.loss += loss * images
        self.correct += correct
        self.seen += images

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "correct": self.correct, "seen": self.seen, "skipped": self.skipped}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> RunningWindow:
        """The saved window (an empty one for checkpoints written before the window was saved)."""
        if not state:
            return cls()
        return cls(float(state["loss"]), int(state["correct"]), int(state["seen"]), int(state["skipped"]))


class MetricsLog:
    """JSON lines (and optional TensorBoard scalars) in the run directory; a no-op on non-main ranks.

    ``keep`` lines of an existing file are kept and the rest dropped: a resumed run keeps exactly the records
    written before its checkpoint (``metrics_lines``), so the log ends as an uninterrupted run's. A record cut by a
    kill (no newline, or not JSON) is dropped with a warning naming its line."""

    def __init__(self, run_dir: Path | None, tensorboard: bool, keep: int | None = 0, purge_step: int | None = None):
        self.path = run_dir / "metrics.jsonl" if run_dir else None
        self.lines = 0
        self.writer = None
        if self.path is not None:
            old = self.path.read_text().splitlines(keepends=True) if keep != 0 and self.path.exists() else []
            whole = [i for i, line in enumerate(old) if _is_record(line)]
            cut = [i + 1 for i, line in enumerate(old) if line.strip() and not _is_record(line)]
            if cut:
                warnings.warn(
                    f"{self.path}: dropped {len(cut)} truncated record(s) at line(s) {cut[:5]} (written when the run "
                    f"was stopped or killed); the records before and after are kept",
                    CratevitWarning,
                    stacklevel=2,
                )
            kept = [old[i] for i in whole][:keep] if keep is not None else [old[i] for i in whole]
            with writing(self.path):
                self.path.write_text("".join(kept))
            self.lines = len(kept)
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
        return [json.loads(line) for line in self.path.read_text().splitlines(keepends=True) if _is_record(line)]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _is_record(line: str) -> bool:
    """A whole record: one JSON object ending with a newline (a kill during a write leaves a cut line)."""
    if not line.endswith("\n"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy against epochs, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    accuracy = all("acc" in r for r in train) and all("top1" in r for r in val)  # not for masked autoencoding
    fig, axes = plt.subplots(1, 2 if accuracy else 1, figsize=(10 if accuracy else 5.5, 4), squeeze=False)
    ax_loss, ax_acc = axes[0, 0], axes[0, -1]
    if train:
        x = [r["epoch"] - 1 + r["step"] / r["steps"] for r in train]  # epoch 1 spans (0, 1]
        ax_loss.plot(x, [r["loss"] for r in train], label="train", lw=1)
        if accuracy:
            ax_acc.plot(x, [100 * r["acc"] for r in train], label="train (batch)", lw=1, alpha=0.6)
    if val:
        x = [r["epoch"] for r in val]
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
    """A tqdm bar on a terminal; otherwise plain lines at the first step, every ``print_freq`` steps, at the end,
    and at least every :data:`PROGRESS_EVERY_S` seconds."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str, print_freq: int) -> None:
        self.tty = enabled and sys.stderr.isatty()
        self.enabled, self.print_freq, self.desc, self.total = enabled, max(print_freq, 1), desc, total
        self.initial, self.printed = initial, time.monotonic()
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
            return
        due = step % self.print_freq == 0 or step == self.total or step == self.initial + 1
        if due or time.monotonic() - self.printed >= PROGRESS_EVERY_S:
            print(f"{self.desc} [{step}/{self.total}] {text}", flush=True)
            self.printed = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
