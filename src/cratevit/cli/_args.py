"""The CLI's vocabulary: every option more than one command takes is declared here, once, with one help text; and
every kind of number an option takes is checked here, once, by an argparse ``type=`` callable.

A bad value stops the parse with one line naming the option, the value and the valid range, exit status 2::

    cratevit probe: error: argument --k: must be a positive integer (1, 2, ...), got '-5'

Only the standard library is imported: ``cratevit --help`` stays instant.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_PIXELS",
    "add_arch_heads_arguments",
    "add_batch_size_argument",
    "add_device_argument",
    "add_layer_argument",
    "add_max_pixels_argument",
    "add_normalization_arguments",
    "add_output_argument",
    "add_seed_argument",
    "add_threads_argument",
    "add_workers_argument",
    "apply_threads",
    "finite_float",
    "has_random_weights",
    "in_range_float",
    "int_range",
    "nonneg_float",
    "nonneg_int",
    "open_unit_float",
    "port_number",
    "positive_float",
    "positive_int",
    "probability",
    "say_random_weights",
    "unit_float",
]

MAX_PIXELS = 89_478_485  # PIL's decompression-bomb limit, Image.MAX_IMAGE_PIXELS (not imported: --help stays fast)


# ----------------------------------------------------------------------------------------------- value checks
def _number(text: str, kind: type, what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _checked(kind: type, what: str, ok: Callable[[Any], bool], name: str) -> Callable[[str], Any]:
    def check(text: str) -> Any:
        value = _number(text, kind, what)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    check.__name__ = check.__qualname__ = name  # argparse names the type in its own messages
    check.what = what  # type: ignore[attr-defined]
    return check


def any_int(text: str) -> int:
    """Any integer (for options where negative values mean something, e.g. ``--layer -1``: the last)."""
    return _number(text, int, "an integer")


any_int.what = "an integer"  # type: ignore[attr-defined]

positive_int = _checked(int, "a positive integer (1, 2, ...)", lambda v: v >= 1, "positive_int")
nonneg_int = _checked(int, "an integer of 0 or more", lambda v: v >= 0, "nonneg_int")
finite_float = _checked(float, "a finite number", lambda v: True, "finite_float")
positive_float = _checked(float, "a finite number above 0", lambda v: v > 0, "positive_float")
nonneg_float = _checked(float, "a finite number of 0 or more", lambda v: v >= 0, "nonneg_float")
probability = _checked(float, "a fraction in [0, 1]", lambda v: 0 <= v <= 1, "probability")
unit_float = _checked(float, "a fraction in [0, 1)", lambda v: 0 <= v < 1, "unit_float")
open_unit_float = _checked(float, "a fraction in (0, 1), 0 and 1 excluded", lambda v: 0 < v < 1, "open_unit_float")
port_number = _checked(int, "a port number in 0..65535 (0: any free port)", lambda v: 0 <= v < 65536, "port_number")


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer in ``low..high`` (``high`` None: no upper end)."""
    what = f"an integer of {low} or more" if high is None else f"an integer in {low}..{high}"
    return _checked(int, what, lambda v: v >= low and (high is None or v <= high), "int_range")


def in_range_float(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable:
    """A finite float in the interval ``[low, high]``, either end optionally open."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    return _checked(
        float,
        f"a number in {left}{low:g}, {high:g}{right}",
        lambda v: (v > low if low_open else v >= low) and (v < high if high_open else v <= high),
        "in_range_float",
        "int_range",
    )


# ----------------------------------------------------------------------------------------------- shared options
def add_arch_heads_arguments(p: argparse.ArgumentParser) -> None:
    """``--arch`` and ``--heads``: what a checkpoint file that does not record its architecture needs."""
    p.add_argument(
        "--arch",
        default=None,
        metavar="PRESET",
        help="preset of a checkpoint that does not record its architecture (reference files)",
    )
    p.add_argument(
        "--heads",
        type=positive_int,
        default=None,
        help="head count, where the file's shapes cannot tell it (6x128 vs 12x64)",
    )


def add_output_argument(
    p: argparse.ArgumentParser, help: str, required: bool = False, default: Any = None, type: Any = Path
) -> None:
    """``-o/--output`` (``--out``: the old spelling of some commands, still accepted), ``dest="output"``."""
    p.add_argument("-o", "--output", "--out", dest="output", required=required, default=default, type=type, help=help)


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto", help="auto (this process's GPU if there is one, else cpu), cpu, cuda, cuda:1"
    )


def add_batch_size_argument(p: argparse.ArgumentParser, default: int, help: str = "images per forward pass") -> None:
    p.add_argument("--batch-size", "-b", dest="batch_size", type=positive_int, default=default, help=help)


def add_workers_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", "-j", type=nonneg_int, default=0, help="data loading processes (0: the main process)")


def add_threads_argument(p: argparse.ArgumentParser, help: str = "torch CPU threads (default: torch's)") -> None:
    """``--threads N`` (a positive integer; None: leave torch's setting), applied by :func:`apply_threads`."""
    p.add_argument("--threads", type=positive_int, default=None, help=help)


def apply_threads(args: argparse.Namespace, default: int | None = None) -> None:
    """Set torch's CPU thread count from ``--threads`` (or ``default`` when it was not given; None: leave it)."""
    threads = getattr(args, "threads", None) or default
    if threads is not None:
        import torch  # here, not at the top: --help stays fast

        torch.set_num_threads(threads)


def add_seed_argument(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--seed", type=nonneg_int, default=0, help=help)


def add_layer_argument(p: argparse.ArgumentParser, default: int | None = -1, extra: str = "") -> None:
    p.add_argument(
        "--layer",
        type=any_int,
        default=default,
        help=f"layer = block index, 0-based (blocks.0 .. blocks.L-1); negative counts from the end (-1: the last)"
        f"{extra}",
    )


def add_max_pixels_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-pixels",
        dest="max_pixels",
        type=nonneg_int,
        default=MAX_PIXELS,
        help="refuse images with more pixels than this before decoding them (default: PIL's "
        "decompression-bomb limit); 0: no limit",
    )


def add_normalization_arguments(p: argparse.ArgumentParser) -> None:
    """``--mean R G B`` (finite) and ``--std R G B`` (positive: a zero std divides by zero)."""
    p.add_argument(
        "--mean",
        type=finite_float,
        nargs=3,
        default=None,
        metavar=("R", "G", "B"),
        help="normalisation mean (default: the training data's, else ImageNet's)",
    )
    p.add_argument(
        "--std",
        type=positive_float,
        nargs=3,
        default=None,
        metavar=("R", "G", "B"),
        help="normalisation std, each above 0 (default: the training data's, else ImageNet's)",
    )


# ----------------------------------------------------------------------------------------------- shared messages
def has_random_weights(spec: str) -> bool:
    """A preset or timm model name (not a file, folder or hf-hub address) is built with random weights."""
    return not (spec.startswith("hf-hub:") or Path(spec).exists())


def say_random_weights(spec: str, seed: int | None = None) -> bool:
    """Print ``SPEC: random weights (...)`` once when ``spec`` is a preset or timm name rather than a file."""
    if not has_random_weights(spec):
        return False
    how = f" seeded with {seed}" if seed is not None else ""
    print(
        f"{spec}: random weights{how} (a preset name, not a trained checkpoint; pass a checkpoint file for "
        f"trained weights)",
        flush=True,
    )
    return True


def progress(iterable: Any, total: int | None, desc: str) -> Any:
    """tqdm progress on stderr when it is a terminal (or when asked via ``CRATEVIT_PROGRESS=1``); a line every
    10% otherwise, so a log file still shows a long command moving."""
    import os

    if sys.stderr.isatty() or os.environ.get("CRATEVIT_PROGRESS") == "1":
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False)
    return _lines(iterable, total, desc)


def _lines(iterable: Any, total: int | None, desc: str) -> Any:
    import time

    start = time.perf_counter()
    step = max(1, (total or 10) // 10)
    for i, item in enumerate(iterable, 1):
        yield item
        if total and total > 1 and (i % step == 0 or i == total):
            elapsed = time.perf_counter() - start
            print(f"{desc}: {i}/{total} ({elapsed:.0f} s)", file=sys.stderr, flush=True)
