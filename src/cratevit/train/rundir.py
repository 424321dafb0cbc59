"""The run directory: where a run writes, who holds it, and how SIGTERM/SIGINT become a clean stop.

* :func:`choose_run_dir`: ``--output``, else the resumed run's own directory, else ``runs/DATA-ARCH-TIME``; a
  directory that already holds a run is refused unless resumed;
* :class:`RunLock`: an exclusive ``fcntl.flock`` held for the run's lifetime (two runs never write one directory);
* :class:`StopFlag`, :func:`ignore_stop_signals`, :func:`stop_signals_held`: signals turn into a flag the loop
  checks after each step; data workers leave them to the main process, which saves and then stops them;
* :func:`writing`: a full, read-only or forbidden disk becomes one line naming the file.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = [
    "LOCK_NAME",
    "SIGNALS",
    "RunLock",
    "StopFlag",
    "choose_run_dir",
    "ignore_stop_signals",
    "remove_stale_files",
    "signal_name",
    "stop_signals_held",
    "writing",
]

LOCK_NAME = ".lock"
"""The run directory's lock file (``fcntl.flock``, held for the run's lifetime)."""
SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""The signals that stop a run cleanly (``SIGTERM``, ``SIGINT``)."""


def choose_run_dir(
    output: str | None, resumed_dir: Path | None, arch: str | None, data: str, dummy: bool, is_main: bool
) -> Path:
    """The directory a run writes (the same on every process; only the first writes there)."""
    if output:
        run_dir = Path(output)
    elif resumed_dir is not None:
        run_dir = resumed_dir.absolute()
    else:
        name = (arch or "model").replace("/", "_")
        run_dir = (
            Path("runs").absolute() / f"{'dummy' if dummy else Path(data).name}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"--output {run_dir} is a file; pass a directory")
    if is_main and run_dir.is_dir():
        RunLock.check(run_dir)  # another run is writing there: say so before anything else
    if resumed_dir is None and (run_dir / "last.pt").exists():
        raise UserError(
            f"{run_dir} already holds a run (last.pt); continue it with --resume {run_dir}, or choose another --output"
        )
    return run_dir


def remove_stale_files(run_dir: Path) -> None:
    """Temporary files half-written by a killed run (call with the lock held: nobody else writes there)."""
    for stale in [*run_dir.glob(".*.pt.*.tmp"), run_dir / "curves.tmp.png"]:
        stale.unlink(missing_ok=True)


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


def signal_name(signum: int) -> str:
    """A signal number with its name for messages, e.g. ``"15 (SIGTERM)"``."""
    try:
        return f"{signum} ({signal.Signals(signum).name})"
    except ValueError:
        return str(signum)


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
