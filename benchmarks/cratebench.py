"""Throughput, FLOP utilisation and peak memory of CRATE against its reference formulation and timm ViTs.

One run times, interleaved and after warm-up, every model of the comparison on the same inputs:

* ``reference`` — the literal reference formulation (:mod:`cratevit.models.reference`: three-matmul ISTA, explicit
  softmax attention), holding the same weights as the cratevit model; the baseline of every ratio;
* ``cratevit`` — :class:`cratevit.models.CRATE` (two-matmul ISTA, attention kernel chosen per device and dtype),
  trained with a fused AdamW where torch has one; ``cratevit+compile`` is the same model under ``torch.compile``;
* timm's ``vit_tiny_patch16_224`` and ``vit_small_patch16_224`` (ViT-S has CRATE-T's width).

For a CRATE-alpha preset (``--preset crate_alpha_b16``) the rows are its literal formulation
(:mod:`cratevit.models.reference_alpha`: the two ISTA steps as written), :class:`cratevit.models.CRATEAlpha`
(the fused two-step ISTA) and, by default, the timm ViT of the same width and patch (``vit_base_patch16_224``).

Each figure is the median of repeated timings; ratios are taken within the run, so they survive a noisy
machine. FLOPs are analytic forward FLOPs per image of the matrix products each model actually runs
(a training step counts as three forward passes); utilisation is relative to a large-matmul peak measured in the
same run for the same dtype. Peak memory of a training step is the peak resident set size of a fresh process
(CPU) or the peak allocated device memory (CUDA).

The analysis path is timed too: the coding rate ``R^c`` of one layer through the small ``p x p`` Gram matrix
against the direct ``n x n`` log-determinant.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cratevit import create_model, get_config
from cratevit.checkpoint import to_reference_keys
from cratevit.errors import UserError
from cratevit.models import CRATE, CRATEAlpha, CRATEAlphaConfig, ReferenceCRATEAlpha, forward_flops
from cratevit.models.reference import ReferenceCRATE

__all__ = [
    "BenchOptions",
    "BenchResult",
    "Row",
    "build_variant",
    "coding_rate_timings",
    "format_markdown",
    "gpu_options",
    "matmul_peak",
    "quick_options",
    "run_benchmark",
    "time_interleaved",
    "vit_forward_flops",
]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CRATE_VARIANTS = ("reference", "cratevit", "cratevit+compile")
TIMM_CPU = ("vit_tiny_patch16_224", "vit_small_patch16_224")
DEFAULT_MODELS = (*CRATE_VARIANTS, *TIMM_CPU)
# Nominal dense bfloat16 tensor-core peaks (TFLOP/s) for model FLOP utilisation on known cards.
GPU_BF16_PEAK_TFLOPS: dict[str, float] = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


@dataclass
class BenchOptions:
    """What to compare; the defaults are the CPU table of the README (CRATE-T, 224 px)."""

    preset: str = "crate_tiny"
    image_size: int | None = None
    infer_batch: int = 32
    train_batch: int = 16
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    models: tuple[str, ...] = DEFAULT_MODELS
    modes: tuple[str, ...] = ("inference", "train")
    repeats: int = 5
    warmup: int = 1
    memory: bool = True
    coding_rate: bool = True
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [d for d in self.dtypes if d not in DTYPES]
        if unknown:
            raise UserError(f"unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
        bad_modes = [m for m in self.modes if m not in ("inference", "train")]
        if bad_modes:
            raise UserError(f"unknown mode {bad_modes[0]!r}; choose 'inference' and/or 'train'")
        if self.repeats < 1 or self.warmup < 0 or self.infer_batch < 1 or self.train_batch < 1:
            raise UserError("repeats and batch sizes must be >= 1 and warmup >= 0")
        cfg = get_config(self.preset, image_size=self.image_size)  # an unknown preset or size fails here, with its fix
        if isinstance(cfg, CRATEAlphaConfig) and self.models == DEFAULT_MODELS:  # compare with the ViT of its size
            self.models = (*CRATE_VARIANTS, matching_vit(cfg))
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(
                "cratevit bench --gpu needs a GPU but torch sees no CUDA device; run `cratevit bench` without --gpu "
                "for the CPU comparison"
            )
        for name in self.models:
            if name not in CRATE_VARIANTS and not name.startswith("vit_"):
                raise UserError(f"unknown model {name!r}; choose from {', '.join(CRATE_VARIANTS)} or a timm vit_* name")


@dataclass
class Row:
    """One model in one mode and dtype."""

    mode: str
    dtype: str
    model: str
    batch: int
    images_per_s: float
    gflops_per_image: float
    speedup: float | None = None  # images/s relative to the reference formulation in the same mode and dtype
    gflops_per_s: float = 0.0
    peak_fraction: float = 0.0  # achieved GFLOP/s over the measured matmul peak of this dtype
    peak_mib: float | None = None  # training-step peak memory
    times_s: list[float] = field(default_factory=list)


@dataclass
class BenchResult:
    options: BenchOptions
    device_name: str
    threads: int
    matmul_peak_gflops: dict[str, float]
    rows: list[Row]
    coding_rate_ms: dict[str, float] = field(default_factory=dict)
    torch_version: str = torch.__version__

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"]["dtypes"] = list(self.options.dtypes)
        return d


# ------------------------------------------------------------------------------------------------ FLOP counts
def vit_forward_flops(model: nn.Module) -> int:
    """Analytic forward FLOPs per image of a timm ``VisionTransformer``'s matrix products."""
    n_patch = model.patch_embed.num_patches
    n = n_patch + model.num_prefix_tokens
    d = model.embed_dim
    block = model.blocks[0]
    hidden = block.mlp.fc1.out_features
    patch_dim = model.patch_embed.proj.weight[0].numel()
    per_layer = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * hidden
    head = 2 * d * model.num_classes if model.num_classes else 0
    return 2 * n_patch * patch_dim * d + len(model.blocks) * per_layer + head


# ------------------------------------------------------------------------------------------------ models
def matching_vit(cfg: Any) -> str:
    """The timm ViT of a configuration's width and patch (``vit_base_patch16_224`` for CRATE-alpha-B/16)."""
    import timm

    size = {384: "small", 768: "base", 1024: "large"}.get(cfg.dim, "base")
    for patch in (cfg.patch_size[0], 16):
        if timm.is_model(name := f"vit_{size}_patch{patch}_224"):
            return name
    return "vit_base_patch16_224"


def _alpha_pair(model: CRATEAlpha) -> tuple[CRATEAlpha, ReferenceCRATEAlpha]:
    c = model.config
    square = c.image_size[0] == c.image_size[1] and c.patch_size[0] == c.patch_size[1]
    if not square or c.dynamic_img_size or c.pool != "cls" or c.overcomplete != 4 or (c.ista, c.lambd) != (0.1, 0.1):
        raise UserError(f"CRATE-alpha configuration {c} has no literal formulation to compare with")
    ref = ReferenceCRATEAlpha(
        image_size=c.image_size[0],
        patch_size=c.patch_size[0],
        num_classes=c.num_classes,
        dim=c.dim,
        depth=c.depth,
        heads=c.heads,
        dim_head=c.dim_head,
        channels=c.channels,
    )
    ref.load_state_dict(to_reference_keys(model.state_dict(), "crate_alpha"))
    return model, ref


def _crate_pair(opts: BenchOptions) -> tuple[CRATE, nn.Module]:
    """A cratevit model and the reference (literal) formulation holding the same weights."""

    torch.manual_seed(opts.seed)
    model = create_model(opts.preset, image_size=opts.image_size)
    if isinstance(model, CRATEAlpha):
        return _alpha_pair(model)
    c = model.config
    if c.head_hidden_dim or c.dynamic_img_size:
        raise UserError(f"preset {opts.preset!r} has no reference formulation to compare with")
    ref = ReferenceCRATE(
        image_size=c.image_size,
        patch_size=c.patch_size,
        num_classes=c.num_classes,
        dim=c.dim,
        depth=c.depth,
        heads=c.heads,
        dim_head=c.dim_head,
        pool=c.pool,
        channels=c.channels,
        ista=c.ista,
    )
    ref.load_state_dict(to_reference_keys(model.state_dict()))
    return model, ref


def build_variant(name: str, opts: BenchOptions) -> tuple[nn.Module, int, bool]:
    """``(model, forward FLOPs per image, use a fused optimizer)`` for one row of the comparison."""
    if name in CRATE_VARIANTS:
        model, ref = _crate_pair(opts)
        flops, ref_flops = (
            forward_flops(model.config),
            forward_flops(model.config, ista_matmuls=3),
        )  # CRATE-alpha: equal
        if name == "reference":
            return ref, ref_flops, False
        if name == "cratevit+compile":
            return torch.compile(model), flops, True
        return model, flops, True
    import timm

    cfg = get_config(opts.preset, image_size=opts.image_size)
    try:
        model = timm.create_model(name, pretrained=False, img_size=cfg.image_size, num_classes=cfg.num_classes)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"timm cannot build {name!r} for {cfg.image_size} inputs: {e}") from e
    return model, vit_forward_flops(model), False


# ------------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Wall-clock seconds of each function, called in turn ``repeats`` times after ``warmup`` rounds.

    The order rotates every round so that no function always runs right after the same neighbour.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a large square matrix product: the practical peak of this device and dtype."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = time_interleaved({"mm": lambda: a @ b}, repeats, 1, device)["mm"]
    return 2 * size**3 / min(times) / 1e9


def inference_step(model: nn.Module, x: Tensor, dtype: torch.dtype) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), _autocast(x.device, dtype):
            model(x)

    return step


def train_step(model: nn.Module, x: Tensor, y: Tensor, dtype: torch.dtype, fused: bool) -> Callable[[], None]:
    """One AdamW step on cross-entropy (fused AdamW when asked and torch has it for this device)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=fused or None)

    def step() -> None:
        with _autocast(x.device, dtype):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _inputs(opts: BenchOptions, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Random images and labels of the preset's shape and class count (the same for every model)."""
    cfg = get_config(opts.preset, image_size=opts.image_size)
    gen = torch.Generator().manual_seed(opts.seed)
    x = torch.randn(batch, cfg.channels, *cfg.image_size, generator=gen).to(device)
    y = torch.randint(0, max(cfg.num_classes, 1), (batch,), generator=gen).to(device)
    return x, y


@contextlib.contextmanager
def _num_threads(n: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _measure_mode(mode: str, dtype_name: str, opts: BenchOptions, device: torch.device) -> list[Row]:
    """Time every model of ``opts.models`` in one mode and dtype, interleaved."""
    dtype = DTYPES[dtype_name]
    batch = opts.infer_batch if mode == "inference" else opts.train_batch
    fns: dict[str, Callable[[], None]] = {}
    flops: dict[str, int] = {}
    for name in opts.models:
        model, flops[name], fused = build_variant(name, opts)
        model = model.to(device).train(mode == "train")
        x, y = _inputs(opts, batch, device)
        fns[name] = inference_step(model, x, dtype) if mode == "inference" else train_step(model, x, y, dtype, fused)
    times = time_interleaved(fns, opts.repeats, opts.warmup, device)
    factor = 1 if mode == "inference" else 3  # backward ~ 2x forward
    rows = []
    for name in opts.models:
        ips = batch / statistics.median(times[name])
        rows.append(
            Row(
                mode=mode,
                dtype=dtype_name,
                model=name,
                batch=batch,
                images_per_s=ips,
                gflops_per_image=flops[name] / 1e9,
                gflops_per_s=ips * factor * flops[name] / 1e9,
                times_s=times[name],
            )
        )
    return rows


# ------------------------------------------------------------------------------------------------ memory
def training_peak_mib(name: str, dtype_name: str, opts: BenchOptions, steps: int = 2) -> float:
    """Peak memory (MiB) of training steps of one model: a fresh process's peak RSS on CPU, or the peak
    allocated memory on CUDA (measured in this process)."""
    device = torch.device(opts.device)
    if device.type == "cuda":
        model, _, fused = build_variant(name, opts)
        model = model.to(device).train()
        x, y = _inputs(opts, opts.train_batch, device)
        step = train_step(model, x, y, DTYPES[dtype_name], fused)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step()
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        del model, step
        torch.cuda.empty_cache()
        return peak
    spec = {"name": name, "dtype": dtype_name, "steps": steps, "options": asdict(opts)}
    proc = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {name} ({dtype_name}) failed:\n{proc.stderr[-2000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])


def _memory_probe(spec_json: str) -> None:
    """Child process of :func:`training_peak_mib`: run training steps, print the peak RSS as JSON."""
    import timm  # noqa: F401  (every probe imports the same libraries, so their baselines are equal)

    spec = json.loads(spec_json)
    o = spec["options"]
    opts = BenchOptions(**{**o, "dtypes": tuple(o["dtypes"]), "models": tuple(o["models"]), "modes": tuple(o["modes"])})
    if opts.threads:
        torch.set_num_threads(opts.threads)
    model, _, fused = build_variant(spec["name"], opts)
    model.train()
    x, y = _inputs(opts, opts.train_batch, torch.device("cpu"))
    step = train_step(model, x, y, DTYPES[spec["dtype"]], fused)
    before = _peak_rss_mib()
    for _ in range(spec["steps"]):
        step()
    print(json.dumps({"peak_mib": _peak_rss_mib(), "before_steps_mib": before}))


def _peak_rss_mib() -> float:
    """This process's peak resident set size. ``VmHWM`` where Linux has it: unlike ``ru_maxrss`` it starts afresh
    at ``exec`` instead of inheriting the parent's high-water mark."""
    import resource
    from pathlib import Path

    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------ coding rate
def coding_rate_timings(
    images: int = 32, tokens: int = 197, heads: int = 6, dim_head: int = 64, repeats: int = 5, seed: int = 0
) -> dict[str, float]:
    """Milliseconds (median) of one layer's ``R^c`` for a batch: direct ``n x n`` log-determinant against the
    ``p x p`` Gram form of :func:`cratevit.analysis.compression`; also their largest relative difference."""
    from cratevit import analysis

    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(images, heads, tokens, dim_head, generator=gen)
    fns = {
        "direct": lambda: analysis.coding_rate(proj, side="tokens").sum(dim=1),
        "gram": lambda: analysis.compression(proj),
    }
    times = time_interleaved(fns, repeats, 1, torch.device("cpu"))
    direct, gram = fns["direct"](), fns["gram"]()
    rel = ((gram - direct).abs() / direct.abs()).max().item()
    out = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    out["max_rel_diff"] = rel
    out["nan"] = float(bool(torch.isnan(gram).any() or torch.isnan(direct).any()))
    return out


# ------------------------------------------------------------------------------------------------ driver
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _add_ratios(rows: list[Row], peaks: dict[str, float]) -> None:
    base = {(r.mode, r.dtype): r.images_per_s for r in rows if r.model == "reference"}
    for r in rows:
        ref = base.get((r.mode, r.dtype))
        r.speedup = r.images_per_s / ref if ref else None
        r.peak_fraction = r.gflops_per_s / peaks[r.dtype] if peaks.get(r.dtype) else 0.0


def run_benchmark(opts: BenchOptions, log: Callable[[str], None] = lambda s: None) -> BenchResult:
    """Run the whole comparison (see the module docstring) and return every measurement."""
    device = torch.device(opts.device)
    with _num_threads(opts.threads) as threads:
        peaks = {}
        for d in opts.dtypes:
            peaks[d] = matmul_peak(DTYPES[d], device, size=4096 if device.type == "cuda" else 2048)
            log(f"matmul peak {d}: {peaks[d]:.0f} GFLOP/s")
        rows: list[Row] = []
        for mode in opts.modes:
            for d in opts.dtypes:
                new = _measure_mode(mode, d, opts, device)
                for r in new:
                    log(f"{mode:9s} {d:8s} {r.model:24s} {r.images_per_s:8.2f} img/s")
                rows += new
        if opts.memory and "train" in opts.modes:
            for r in rows:  # a compiled model would pay its compilation again in the probe: not probed
                if r.mode == "train" and not r.model.endswith("+compile"):
                    r.peak_mib = training_peak_mib(r.model, r.dtype, opts)
                    log(f"train     {r.dtype:8s} {r.model:24s} peak {r.peak_mib:8.0f} MiB")
        # a second peak measurement after the models ran: keep the better one (the machine may be busy)
        for d in opts.dtypes:
            peaks[d] = max(peaks[d], matmul_peak(DTYPES[d], device, size=4096 if device.type == "cuda" else 2048))
        _add_ratios(rows, peaks)
        rc = coding_rate_timings(repeats=opts.repeats) if opts.coding_rate else {}
    return BenchResult(
        options=opts,
        device_name=_device_name(device),
        threads=threads,
        matmul_peak_gflops=peaks,
        rows=rows,
        coding_rate_ms=rc,
    )


def gpu_options(preset: str = "crate_base", batch: int = 256, **overrides: Any) -> BenchOptions:
    """The GPU comparison of the issue: CRATE-B in bfloat16 at batch 256 against the reference and ViT-B/16."""
    base = BenchOptions(
        preset=preset,
        infer_batch=batch,
        train_batch=batch,
        dtypes=("bfloat16",),
        models=("reference", "cratevit", "vit_base_patch16_224"),
        device="cuda",
        repeats=10,
        warmup=3,
        coding_rate=False,
    )
    return replace(base, **overrides)


def quick_options(**overrides: Any) -> BenchOptions:
    """A seconds-long smoke run on the debug preset (for CI)."""
    base = BenchOptions(
        preset="crate_debug",
        infer_batch=4,
        train_batch=4,
        models=("reference", "cratevit", "vit_tiny_patch16_224"),
        repeats=2,
        warmup=1,
        memory=False,
    )
    return replace(base, **overrides)


def _mfu(result: BenchResult, row: Row) -> str:
    for card, tflops in GPU_BF16_PEAK_TFLOPS.items():
        if card in result.device_name and row.dtype == "bfloat16":
            return f"{100 * row.gflops_per_s / (tflops * 1e3):.1f}%"
    return "–"


def format_markdown(result: BenchResult) -> str:
    """The Markdown report: one table of throughput / utilisation / memory, and the coding-rate timings."""
    o = result.options
    peaks = ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in result.matmul_peak_gflops.items())
    gpu = o.device.startswith("cuda")
    lines = [
        f"{o.preset} at {get_config(o.preset, image_size=o.image_size).image_size[1]} px on {result.device_name}, {result.threads} threads, "
        f"torch {result.torch_version}; matmul peak measured in this run: {peaks}. "
        f"Median of {o.repeats} interleaved timings after {o.warmup} warm-up.",
        "",
        "| mode | dtype | model | batch | images/s | vs reference | GFLOPs/img | GFLOP/s | % of matmul peak"
        + (" | MFU (nominal bf16 peak)" if gpu else "")
        + " | train peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "") + "---:|",
    ]
    for r in result.rows:
        speed = f"{r.speedup:.2f}x" if r.speedup is not None else "–"
        mem = f"{r.peak_mib:,.0f}" if r.peak_mib is not None else "–"
        cells = [
            r.mode,
            r.dtype,
            r.model,
            str(r.batch),
            f"{r.images_per_s:.1f}",
            speed,
            f"{r.gflops_per_image:.3g}",
            f"{r.gflops_per_s:.0f}",
            f"{100 * r.peak_fraction:.0f}%",
        ]
        if gpu:
            cells.append(_mfu(result, r))
        cells.append(mem)
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Training GFLOP/s count a step as three forward passes. Peak memory: "
        + ("peak allocated CUDA memory." if gpu else "peak RSS of a fresh process running two steps."),
    ]
    rc = result.coding_rate_ms
    if rc:
        speed = rc["direct"] / rc["gram"] if rc["gram"] else math.nan
        lines += [
            "",
            "| R^c of one layer (32 images, 197 tokens, 6 heads of 64, float64) | ms | vs direct |",
            "|---|---:|---:|",
            f"| direct n x n log-determinant (Cholesky) | {rc['direct']:.1f} | 1.00x |",
            f"| p x p Gram form (`cratevit.analysis.compression`) | {rc['gram']:.1f} | {speed:.1f}x |",
            "",
            f"Largest relative difference between the two: {rc['max_rel_diff']:.1e}.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":  # child process of training_peak_mib
    _memory_probe(sys.argv[1])
