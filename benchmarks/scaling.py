"""How time and memory grow with the number of tokens: ToST (linear-time TSSA) against CRATE and a timm ViT.

Usage (from a source checkout)::

    OMP_NUM_THREADS=1 python benchmarks/scaling.py --out runs/scaling            # 196 .. 16,384 tokens, minutes
    python benchmarks/scaling.py --quick --out /tmp/scaling                       # CI size, seconds
    python benchmarks/scaling.py --device cuda --max-mem-gb 100 --out runs/scaling_gpu   # the GPU variant

Every model has the same width (``--dim``, ``--heads``), depth (``--depth`` token-mixing blocks; ToST adds its two
class-attention blocks, as the official models) and patch 16; the token count ``n = (S / 16)^2`` grows with the
image side ``S`` (224 -> 196 tokens, ..., 2048 -> 16,384). The models, all at batch 1 in float32:

* ``tost`` — :class:`cratevit.models.tost.ToST` (TSSA: no ``n x n`` matrix);
* ``crate`` — :class:`cratevit.models.CRATE` as shipped (``attn_impl="auto"``: PyTorch's fused attention kernel on
  CPU float32, which never stores the ``n x n`` matrix but still does ``O(n^2)`` work);
* ``crate_explicit`` — the same CRATE with the explicit softmax (``attn_impl="math"``), the ``n x n`` matrix stored
  as in the paper's formulation;
* ``vit`` — timm's ``VisionTransformer`` (fused attention, timm's default).

Timings are interleaved (each repetition runs every model once), after one warm-up call, and reported as
medians (a point whose timings already took ``--max-rep-seconds`` is not repeated). Memory, measured on the
warm-up call, is the peak resident set size during one call above the resident size just before it: the peak
is reset through ``/proc/self/clear_refs`` and freed heap memory is returned to the system (``malloc_trim``) before
each measurement (Linux). It counts the activations, the attention buffers and (training) the gradients, not the
weights. A model stops at the next token count whose time or memory, extrapolated from its last two points,
would exceed ``--max-seconds`` / ``--max-mem-gb``; the table says so. Exponents are least-squares slopes of
``log(time)`` / ``log(memory)`` against ``log(n)`` over the points with ``n >= --fit-from``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("tost", "crate", "crate_explicit", "vit")
LABELS = {
    "tost": "ToST (TSSA)",
    "crate": "CRATE (fused attention)",
    "crate_explicit": "CRATE (explicit n x n attention)",
    "vit": "timm ViT (fused attention)",
}
FULL_SIDES = (224, 448, 640, 1024, 1440, 2048)  # 196, 784, 1600, 4096, 8100, 16384 tokens at patch 16
QUICK_SIDES = (64, 128)


@dataclass
class Point:
    model: str
    tokens: int
    infer_ms: float | None = None
    train_ms: float | None = None
    infer_mib: float | None = None
    train_mib: float | None = None
    stopped: str | None = None  # why the model did not run at this size


@dataclass
class Result:
    settings: dict
    points: list[Point] = field(default_factory=list)
    exponents: dict = field(default_factory=dict)  # model -> {metric: slope}

    def series(self, model: str, metric: str) -> tuple[list[int], list[float]]:
        pts = [p for p in self.points if p.model == model and getattr(p, metric) is not None]
        return [p.tokens for p in pts], [getattr(p, metric) for p in pts]


# ----------------------------------------------------------------------------------------------- models
def build(name: str, side: int, dim: int, heads: int, depth: int, patch: int = 16) -> nn.Module:
    torch.manual_seed(0)
    if name == "tost":
        from cratevit.models.tost import ToST, ToSTConfig

        cfg = ToSTConfig(image_size=side, patch_size=patch, dim=dim, depth=depth, heads=heads, num_classes=10)
        return ToST(config=cfg)
    if name in ("crate", "crate_explicit"):
        from cratevit.models import CRATE

        impl = "math" if name == "crate_explicit" else "auto"
        return CRATE(
            image_size=side,
            patch_size=patch,
            dim=dim,
            depth=depth,
            heads=heads,
            dim_head=dim // heads,
            num_classes=10,
            attn_impl=impl,
        )
    if name == "vit":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            img_size=side, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, num_classes=10
        )
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def inference_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        with torch.inference_mode():
            model(x)

    return run


def training_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    target = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def run() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        opt.step()

    return run


# ----------------------------------------------------------------------------------------------- measurement
def _status_mib(key: str) -> float:
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _release() -> None:
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: freed memory stays with the allocator
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory_mib(fn: Callable[[], None], device: str = "cpu") -> float:
    """Peak memory of one call of ``fn`` above the memory in use before it, in MiB: resident memory on the CPU
    (Linux), allocated device memory on CUDA."""
    _release()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident size
    before = _status_mib("VmRSS")
    fn()
    return max(_status_mib("VmHWM") - before, 0.0)


def seconds(fn: Callable[[], None], device: str = "cpu") -> float:
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) against log(x)."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y and y > 0]
    if len(pairs) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pairs)
    my = statistics.fmean(p[1] for p in pairs)
    sxx = sum((p[0] - mx) ** 2 for p in pairs)
    return sum((p[0] - mx) * (p[1] - my) for p in pairs) / sxx


def extrapolate(xs: list[int], ys: list[float], x_next: int, default_exponent: float = 2.0) -> float:
    """The next value on the line through the last two points in log-log (one point: ``default_exponent``)."""
    if len(xs) >= 2 and ys[-1] > 0 and ys[-2] > 0:
        e = max(math.log(ys[-1] / ys[-2]) / math.log(xs[-1] / xs[-2]), 1.0)
    else:
        e = default_exponent
    return ys[-1] * (x_next / xs[-1]) ** e


def run(args: argparse.Namespace) -> Result:
    torch.set_num_threads(args.threads)
    sides = QUICK_SIDES if args.quick else tuple(args.sides)
    result = Result(settings={k: v for k, v in vars(args).items() if k != "out"} | {"sides": list(sides)})
    stopped: dict[str, str] = {}
    for side in sides:
        n = (side // 16) ** 2
        x = torch.randn(1, 3, side, side, device=args.device)
        live: dict[str, dict[str, Callable[[], None]]] = {}
        for name in args.models:
            if name in stopped:
                result.points.append(Point(name, n, stopped=stopped[name]))
                continue
            prev_n, prev_t = result.series(name, "train_ms")
            _, prev_m = result.series(name, "train_mib")
            if prev_n:
                t_next = extrapolate(prev_n, prev_t, n) / 1e3
                m_next = extrapolate(prev_n, prev_m, n) / 1024 if prev_m else 0.0
                if t_next > args.max_seconds or m_next > args.max_mem_gb:
                    why = (
                        f"stopped at {n} tokens: a training step would take ~{t_next:.0f} s / ~{m_next:.1f} GiB "
                        f"(limits {args.max_seconds:g} s, {args.max_mem_gb:g} GiB)"
                    )
                    stopped[name] = why
                    result.points.append(Point(name, n, stopped=why))
                    print(f"{name}: {why}", flush=True)
                    continue
            model = build(name, side, args.dim, args.heads, args.depth).to(args.device)
            live[name] = {"infer": inference_step(model, x), "train": training_step(model, x)}
        memory: dict[tuple[str, str], float | None] = {}
        for name, fns in live.items():  # the first call of each step: warm-up, and the memory measurement
            for mode, fn in fns.items():
                if args.memory:
                    memory[(name, mode)] = peak_memory_mib(fn, args.device)
                else:
                    fn()
                    memory[(name, mode)] = None
        times: dict[tuple[str, str], list[float]] = {}
        for rep in range(args.reps):  # interleaved: every model once per repetition
            for name, fns in live.items():
                spent = sum(sum(times.get((name, mode), [])) for mode in fns)
                if rep and spent > args.max_rep_seconds:  # slow points: fewer repetitions (at least one)
                    continue
                for mode, fn in fns.items():
                    times.setdefault((name, mode), []).append(seconds(fn, args.device))
        for name in live:
            p = Point(
                name,
                n,
                infer_ms=1e3 * statistics.median(times[(name, "infer")]),
                train_ms=1e3 * statistics.median(times[(name, "train")]),
                infer_mib=memory[(name, "infer")],
                train_mib=memory[(name, "train")],
            )
            result.points.append(p)
            mem = f", memory {p.infer_mib:.1f} / {p.train_mib:.1f} MiB" if args.memory else ""
            print(
                f"{name:15s} n={n:6d}: inference {p.infer_ms:9.2f} ms, training {p.train_ms:9.2f} ms{mem}", flush=True
            )
        live.clear()
        _release()
    for name in args.models:
        result.exponents[name] = {}
        for metric in ("infer_ms", "train_ms", "infer_mib", "train_mib"):
            xs, ys = result.series(name, metric)
            keep = [(a, b) for a, b in zip(xs, ys, strict=True) if a >= args.fit_from] or list(zip(xs, ys, strict=True))
            result.exponents[name][metric] = slope([a for a, _ in keep], [b for _, b in keep])
    return result


# ----------------------------------------------------------------------------------------------- reports
def _fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def claims(result: Result) -> list[str]:
    """The issue's targets, each with what this run measured."""
    lines = []
    e = result.exponents.get("tost", {})
    if e:
        exps = ", ".join(f"{k} {_fmt(v, 2)}" for k, v in e.items())
        ok = all(v is not None and v <= 1.1 for v in e.values())
        lines.append(f"ToST exponents <= 1.1: {'holds' if ok else 'does NOT hold'} ({exps})")
    tost = {p.tokens: p for p in result.points if p.model == "tost" and p.stopped is None}
    for other in ("crate", "crate_explicit", "vit"):
        pts = {p.tokens: p for p in result.points if p.model == other and p.stopped is None}
        common = sorted(set(tost) & set(pts))
        if not common:
            continue
        big = [n for n in common if n >= 1000]
        faster = [n for n in big if tost[n].infer_ms < pts[n].infer_ms and tost[n].train_ms < pts[n].train_ms]
        if big:
            lines.append(
                f"ToST faster than {other} at >= 1k tokens (inference and training): "
                f"{'holds' if faster == big else 'does NOT hold'} at {len(faster)}/{len(big)} sizes"
            )
        n = common[-1]
        ti, tt = pts[n].infer_ms / tost[n].infer_ms, pts[n].train_ms / tost[n].train_ms
        line = f"at {n} tokens, {other} / ToST: inference time {ti:.1f}x, training time {tt:.1f}x"
        if tost[n].train_mib and pts[n].train_mib is not None:
            mi = pts[n].infer_mib / max(tost[n].infer_mib, 1e-9)
            mt = pts[n].train_mib / max(tost[n].train_mib, 1e-9)
            line += f", inference memory {mi:.1f}x, training memory {mt:.1f}x"
        lines.append(line)
    return lines


def markdown(result: Result) -> str:
    s = result.settings
    models = [m for m in MODELS if m in s["models"]]
    out = [
        f"Batch 1, float32, {s['device']}, {s['threads']} thread(s); width {s['dim']}, {s['heads']} heads, {s['depth']} "
        f"token-mixing blocks, patch 16, random weights; medians of {s['reps']} interleaved repetitions.",
        "",
        "| tokens | " + " | ".join(f"{LABELS[m]}: inference ms / training ms / training MiB" for m in models) + " |",
        "|---:|" + "---:|" * len(models),
    ]
    for n in sorted({p.tokens for p in result.points}):
        cells = []
        for m in models:
            p = next((q for q in result.points if q.model == m and q.tokens == n), None)
            if p is None or p.stopped:
                cells.append("stopped" if p else "—")
            else:
                cells.append(f"{_fmt(p.infer_ms)} / {_fmt(p.train_ms)} / {_fmt(p.train_mib, 0)}")
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    out += [
        "",
        f"Fitted exponents (slope of log-log, points with n >= {s['fit_from']}):",
        "",
        "| model | inference time | training time | inference memory | training memory |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in models:
        e = result.exponents.get(m, {})
        out.append(
            f"| {LABELS[m]} | "
            + " | ".join(_fmt(e.get(k), 2) for k in ("infer_ms", "train_ms", "infer_mib", "train_mib"))
            + " |"
        )
    stops = [p.stopped for p in result.points if p.stopped]
    notes = sorted({f"{p.model}: {p.stopped}" for p in result.points if p.stopped}) if stops else []
    out += ["", *[f"- {c}" for c in claims(result)], *[f"- {n}" for n in notes]]
    return "\n".join(out) + "\n"


def plot(result: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        ("infer_ms", "inference time (ms)"),
        ("train_ms", "training step time (ms)"),
        ("infer_mib", "inference peak memory (MiB)"),
        ("train_mib", "training peak memory (MiB)"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (metric, label) in zip(axes, metrics, strict=True):
        for m in result.settings["models"]:
            xs, ys = result.series(m, metric)
            if xs:
                e = result.exponents.get(m, {}).get(metric)
                ax.loglog(xs, ys, "o-", label=f"{LABELS[m]} (slope {_fmt(e, 2)})")
        ax.set_xlabel("tokens n")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(
        f"Scaling with the number of tokens (batch 1, float32, {result.settings['device']}, "
        f"{result.settings['threads']} thread(s), "
        f"width {result.settings['dim']}, random weights)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/scaling"), help="folder for results.json, scaling.md/png")
    p.add_argument("--quick", action="store_true", help="CI size: 16 and 64 tokens, width 32, one block, one rep")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--sides", nargs="+", type=int, default=list(FULL_SIDES), help="image sides (multiples of 16)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU variant (device memory measured)")
    p.add_argument("--max-mem-gb", type=float, default=4.0, help="stop a model before a step would exceed this")
    p.add_argument("--max-seconds", type=float, default=150.0, help="stop a model before a step would exceed this")
    p.add_argument(
        "--max-rep-seconds", type=float, default=30.0, help="repeat a point only while its timings took less than this"
    )
    p.add_argument("--fit-from", type=int, default=1000, help="fit exponents over the points with n >= this")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory measurement")
    args = p.parse_args(argv)
    if any(s % 16 for s in args.sides):
        p.error(f"--sides must be multiples of the patch size 16, got {args.sides}")
    if args.quick:
        args.dim, args.heads, args.depth, args.reps, args.fit_from = 32, 2, 1, 1, 0
    return args


def main(argv: list[str] | None = None) -> Result:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (args.out / "results.json").write_text(
        json.dumps({**asdict(result), "settings": {**result.settings, "models": list(args.models)}}, indent=1)
    )
    (args.out / "scaling.md").write_text(markdown(result))
    plot(result, args.out / "scaling.png")
    print(markdown(result))
    print(f"wrote {args.out / 'scaling.md'}, {args.out / 'scaling.png'}, {args.out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
