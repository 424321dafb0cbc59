"""Plain forward before and after a hooks() context, and run_with_cache, timed side by side (interleaved medians).

    python benchmarks/hooks_bench.py [--preset crate_nano] [--batch 64] [--repeats 15] [--point NAME]
    python benchmarks/hooks_bench.py --preset mae_crate_digits --point decoder_blocks.2.out   # a decoder block
    python benchmarks/hooks_bench.py --preset tost_digits --point class_blocks.1.out          # a class block

The hook API registers nothing outside its context, so "plain, after a context" must equal "plain" up to noise.
``--point`` is the one point cached (default: ``blocks.L.norm2`` of the last backbone block); a CRATE-MAE's
forward is timed with nothing masked.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cratevit import create_model
from cratevit.analysis.hooks import hook_names, hooks, run_with_cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="crate_nano")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--point", default=None, help="the hook name of the one-point case")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.preset).eval()
    size = model.config.image_size
    x = torch.randn(args.batch, 3, *size)
    last = len(model.blocks) - 1
    point = args.point or f"blocks.{last}.norm2"
    kwargs = {}
    if hasattr(model, "decoder_blocks"):  # an autoencoder: the same (empty) mask in every pass
        kwargs["mask"] = torch.zeros(args.batch, model.config.num_patches, dtype=torch.bool)

    def plain() -> None:
        model(x, **kwargs)

    def after_context() -> None:
        with hooks(model, {f"blocks.{last}.out": lambda a, n: None}):
            pass
        model(x, **kwargs)  # outside the context: no hook

    def one_layer() -> None:
        run_with_cache(model, x, [point], **kwargs)

    def every_point() -> None:
        run_with_cache(model, x, hook_names(model), **kwargs)

    cases = {"plain forward": plain, "plain, after a context": after_context}
    cases |= {"run_with_cache, 1 point": one_layer, "run_with_cache, every point": every_point}
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in cases.items():  # interleaved: the machine's load hits every case alike
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain forward"])
    print(
        f"{args.preset} (random weights), batch {args.batch}, {args.threads} thread(s), median of {args.repeats} "
        f"interleaved runs; one point: {point}"
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<30} {1000 * med:8.2f} ms   {med / base:5.2f}x")


if __name__ == "__main__":
    main()
