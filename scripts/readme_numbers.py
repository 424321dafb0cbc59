"""Rerun the README's measured commands and print the figures the README quotes, so they cannot drift.

    python scripts/readme_numbers.py --list                 # the sections and what each costs
    python scripts/readme_numbers.py --only presets,digits  # some of them
    python scripts/readme_numbers.py                        # all of them (about 45 minutes on 2 quiet cores)

Every command runs as the README writes it, in a fresh process, under ``--work`` (default ``runs/readme``).
For each one the script prints the command, its wall time, its peak memory (the child's peak RSS, from
``os.wait4``) and the 1-minute load average before and after: on a shared machine, a figure measured under load
is not a figure to publish. The tables are printed in the README's Markdown layout, ready to paste.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

CLI = [sys.executable, "-m", "cratevit"]


class Runner:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.rows: list[tuple[str, float, float, str]] = []

    def run(self, args: list[str], env: dict[str, str] | None = None) -> str:
        """Run ``cratevit ARGS`` (or another command), echo and return its output; record time and peak RSS."""
        cmd = args if args[0] != "cratevit" else CLI + args[1:]
        shown = shlex.join(["cratevit", *args[1:]] if args[0] == "cratevit" else args)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})}, cwd=self.work)  # fmt: skip
        out = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        peak_mib = usage.ru_maxrss / 1024  # KiB on Linux
        load = f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}"
        self.rows.append((shown, wall, peak_mib, load))
        print(f"$ {shown}\n  {wall:.1f} s, peak {peak_mib:,.0f} MiB, load {load}, exit {proc.returncode}")
        if proc.returncode != 0:
            print(out[-3000:])
            raise SystemExit(f"command failed ({proc.returncode}): {shown}")
        return out

    def summary(self) -> None:
        print("\n| command | wall time | peak memory | load (1 min) |\n|---|---:|---:|---|")
        for shown, wall, peak, load in self.rows:
            print(f"| `{shown}` | {wall:.1f} s | {peak:,.0f} MiB | {load} |")


def _last_val(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("kind") == "val"][-1]


def presets(r: Runner) -> None:
    """The Python API's preset table: parameters at 1000 classes and analytic forward GFLOPs at 224 px."""
    from cratevit import create_model, forward_flops

    print("| preset | dim | heads | depth | params (1000 classes) | GFLOPs/img (224 px) |\n|---|---|---|---|---|---|")
    for name in ("crate_tiny", "crate_small", "crate_base", "crate_large"):
        m = create_model(name)
        c = m.config
        print(f"| `{name}` | {c.dim} | {c.heads} | {c.depth} | {m.num_params():,} | {forward_flops(c) / 1e9:.2f} |")


def imports(r: Runner) -> None:
    """Start-up cost: `import cratevit` and `cratevit --help` (best of 3, fresh processes)."""
    for what, args in (("import cratevit", [sys.executable, "-c", "import cratevit"]), ("cratevit --help", None)):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run(args or [*CLI, "--help"], check=True, capture_output=True, cwd=r.work)
            times.append(time.perf_counter() - start)
        print(f"{what}: best of 3 {min(times):.2f} s (all: {', '.join(f'{t:.2f}' for t in times)})")


def digits(r: Runner) -> None:
    """The quick start: `cratevit train` (defaults) and `--seed 1`."""
    for extra in ([], ["--seed", "1"]):
        out = r.work / ("digits" + "".join(extra).replace("--", "-"))
        r.run(["cratevit", "train", *extra, "--output", str(out)])
        val = _last_val(out)
        print(f"  final held-out top-1 {val['top1']:.2f}% (best {val['best_top1']:.2f}%)")


def analyze(r: Runner) -> None:
    """ "Looking inside": a 15-epoch digits run and its layer-wise table against random init."""
    run_dir, out = r.work / "digits15", r.work / "analyze"
    r.run(["cratevit", "train", "--epochs", "15", "--output", str(run_dir)])
    print(f"  15-epoch digits run: top-1 {_last_val(run_dir)['top1']:.2f}%")
    r.run(["cratevit", "analyze", str(run_dir / "best.pt"), "--with-random", "-o", str(out)])
    results = json.loads((out / "layerwise.json").read_text())
    trained, random = (results[k]["layers"] for k in results)
    print("| layer | R^c(Z^l) trained | R^c(Z^l) random | R^c(Z^{l+1/2}) trained | non-zeros of Z^{l+1} trained "
          "| non-zeros random |\n|---|---|---|---|---|---|")  # fmt: skip

    def pm(row: dict, name: str, fmt: str) -> str:
        return f"{row[name + '_mean']:{fmt}} ± {row[name + '_std']:{fmt}}"

    for t, z in zip(trained, random, strict=True):
        print(f"| {t['layer']} | {pm(t, 'rc_in', '.1f')} | {pm(z, 'rc_in', '.1f')} | {pm(t, 'rc_half', '.1f')} | "
              f"{pm(t, 'sparsity', '.3f')} | {pm(z, 'sparsity', '.3f')} |")  # fmt: skip


def dummy(r: Runner) -> None:
    """The synthetic-data example (one short epoch)."""
    out = r.work / "dummy"
    r.run(["cratevit", "train", "--dummy", "--arch", "crate_small", "--amp", "bf16", "--batch-size", "32",
           "--epochs", "1", "--steps-per-epoch", "5", "--output", str(out)])  # fmt: skip


def onnx(r: Runner) -> None:
    """ONNX export of crate_tiny (random weights, seed 0) with the logit check (needs the onnx extra)."""
    import torch

    import cratevit

    folder = r.work / "onnx"
    folder.mkdir(exist_ok=True)
    torch.manual_seed(0)
    cratevit.save_checkpoint(folder / "crate_tiny.pt", cratevit.create_model("crate_tiny"))
    out = r.run(["cratevit", "export", str(folder / "crate_tiny.pt"), "--output", str(folder / "crate_tiny.onnx")])
    print("  " + "\n  ".join(out.strip().splitlines()[-3:]))


def bench(r: Runner) -> None:
    """The performance table (`cratevit bench --preset crate_tiny`, about 10 minutes on 2 quiet cores)."""
    out = r.work / "bench"
    r.run(["cratevit", "bench", "--preset", "crate_tiny", "--out", str(out)])
    print((out / "bench.md").read_text())


def shapes(r: Runner) -> None:
    """Emergent segmentation: CRATE and a matched timm ViT on the shapes data (about 20 minutes)."""
    w = r.work
    r.run(["cratevit", "train", "--data", "shapes", "--epochs", "15", "--workers", "0", "--output", str(w / "shapes")],
          env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    r.run(["cratevit", "train", "--data", "shapes", "--arch", "vit_tiny_patch16_224", "--image-size", "32",
           "--patch-size", "4", "--model-kwargs", '{"embed_dim": 96, "depth": 6, "num_heads": 3}', "--epochs", "15",
           "--workers", "0", "--output", str(w / "shapes-vit")], env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    for name in ("shapes", "shapes-vit"):
        print(f"  {name}: val top-1 {_last_val(w / name)['top1']:.1f}%")
    print(r.run(["cratevit", "segeval", str(w / "shapes" / "best.pt"), str(w / "shapes-vit" / "best.pt"),
                 "--with-random", "--num-images", "300", "-o", str(w / "segeval")]))  # fmt: skip
    print(r.run(["cratevit", "segeval", str(w / "shapes-vit" / "best.pt"), "--with-random", "--num-images", "300",
                 "-o", str(w / "segeval-vit")]))  # fmt: skip


SECTIONS: dict[str, tuple[str, Callable[[Runner], None]]] = {
    "presets": ("seconds", presets),
    "imports": ("~10 s", imports),
    "digits": ("~1 min", digits),
    "analyze": ("~1 min", analyze),
    "dummy": ("~1 min", dummy),
    "onnx": ("~20 s", onnx),
    "bench": ("~10 min", bench),
    "shapes": ("~20-30 min", shapes),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--work", type=Path, default=Path("runs/readme"), help="folder for the runs' outputs")
    p.add_argument("--list", action="store_true", help="list the sections and their cost, then exit")
    args = p.parse_args(argv)
    if args.list:
        for name, (cost, fn) in SECTIONS.items():
            print(f"{name:8} {cost:>11}  {fn.__doc__.splitlines()[0]}")
        return 0
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.work.resolve())
    print(f"cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    for name in chosen:
        print(f"\n## {name}")
        SECTIONS[name][1](runner)
    if runner.rows:
        runner.summary()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
