"""``cratevit bench``: throughput, FLOP utilisation and peak memory against the reference formulation and timm.

The harness lives outside the installed package, in ``benchmarks/cratebench.py`` of a source checkout (as
timm's ``benchmark.py`` and nanoGPT's ``bench.py`` live at their repositories' roots); this command is its
thin front end and says so in one line when the file is not there.
"""

from __future__ import annotations

import argparse
from types import ModuleType
from typing import Any

from ._args import add_output_argument, add_threads_argument, nonneg_int, positive_int

HELP = "benchmark inference and training against the reference formulation and timm ViTs (Markdown table)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="CRATE preset to time (default crate_tiny; crate_base with --gpu)")
    p.add_argument("--image-size", type=positive_int, default=None, help="input size in pixels (default: the preset's)")
    p.add_argument("--batch", type=positive_int, default=None, help="inference batch size (default 32; 256 with --gpu)")
    p.add_argument(
        "--train-batch", type=positive_int, default=None, help="training batch size (default 16; 256 with --gpu)"
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        choices=("float32", "bfloat16"),
        default=None,
        help="dtypes to time; bfloat16 runs under autocast (default both; bfloat16 with --gpu)",
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="rows of the table: reference, cratevit, cratevit+compile (torch.compile) and timm vit_* "
        "names (default: all three and vit_tiny_patch16_224, vit_small_patch16_224)",
    )
    p.add_argument("--modes", nargs="+", choices=("inference", "train"), default=None, help="default both")
    p.add_argument(
        "--no-compile", action="store_true", help="drop the cratevit+compile row (and its torch.compile time)"
    )
    p.add_argument("--repeats", type=positive_int, default=None, help="timed repeats per model (median reported)")
    p.add_argument("--warmup", type=nonneg_int, default=None, help="untimed warm-up rounds")
    add_threads_argument(p, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the training peak-memory probes")
    p.add_argument("--no-coding-rate", action="store_true", help="skip the R^c timing")
    p.add_argument(
        "--gpu",
        action="store_true",
        help="the GPU comparison: CRATE-B, bfloat16, batch 256, vs the reference and ViT-B/16, with MFU",
    )
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run on the debug preset")
    add_output_argument(p, "also write bench.md and bench.json into this directory")


def harness() -> ModuleType:
    """``benchmarks/cratebench.py`` of the source checkout this cratevit runs from (imported once)."""
    import importlib.util
    import sys
    from pathlib import Path

    from ..errors import UserError

    if "cratebench" in sys.modules:
        return sys.modules["cratebench"]
    path = Path(__file__).resolve().parents[3] / "benchmarks" / "cratebench.py"
    if not path.is_file():
        raise UserError(
            "`cratevit bench` runs the benchmark harness of a source checkout (benchmarks/cratebench.py), which this "
            "installation does not have; clone the repository, `pip install -e .` it, and run the command there"
        )
    spec = importlib.util.spec_from_file_location("cratebench", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["cratebench"] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def options_from_args(args: argparse.Namespace) -> Any:
    """The ``BenchOptions`` of ``benchmarks/cratebench.py`` the flags ask for: a base (default, --quick, --gpu) plus overrides."""
    from dataclasses import replace

    from ..errors import UserError

    bench = harness()
    BenchOptions, gpu_options, quick_options = bench.BenchOptions, bench.gpu_options, bench.quick_options
    if args.quick and args.gpu:
        raise UserError("--quick and --gpu exclude each other; pick one")
    base = gpu_options() if args.gpu else quick_options() if args.quick else BenchOptions()
    overrides: dict[str, Any] = {
        "preset": args.preset,
        "image_size": args.image_size,
        "infer_batch": args.batch,
        "train_batch": args.train_batch,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads,
        "dtypes": tuple(args.dtype) if args.dtype else None,
        "models": tuple(args.models) if args.models else None,
        "modes": tuple(args.modes) if args.modes else None,
    }
    opts = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_compile:
        opts = replace(opts, models=tuple(m for m in opts.models if not m.endswith("+compile")))
    if args.no_memory:
        opts = replace(opts, memory=False)
    if args.no_coding_rate:
        opts = replace(opts, coding_rate=False)
    return opts


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    format_markdown, run_benchmark = harness().format_markdown, harness().run_benchmark
    opts = options_from_args(args)
    smoke = (
        "SMOKE TEST (--quick): the debug preset at batch 4, 2 repeats; it checks that every model and mode runs, "
        "its ratios and percentages are not measurements (run `cratevit bench` for those)"
    )
    if args.quick:
        print(smoke, file=sys.stderr, flush=True)
    result = run_benchmark(opts, log=lambda line: print(line, file=sys.stderr, flush=True))
    table = format_markdown(result)
    if args.quick:
        table = f"{smoke}.\n\n{table}"
    print(table)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.md").write_text(table + "\n")
        (out / "bench.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
        print(f"wrote {out / 'bench.md'} and {out / 'bench.json'}", file=sys.stderr)
    return 0
