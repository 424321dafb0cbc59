"""Remake the figures the documentation shows, with the commands the pages print (about 2 minutes on 2 CPU cores).

    python scripts/docs_figures.py                 # all of them, into docs/<topic>/
    python scripts/docs_figures.py --work /tmp/w   # keep the runs somewhere else (default: runs/docs-figures)

Each figure is copied from the output folder of the command that makes it, so a change to a plot's style is
one rerun away from the site. The figures of CRATE-MAE (``docs/mae/``) and of the explorer (``docs/explore.png``,
a browser screenshot) are made as their pages describe, not here.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def cratevit(*args: str) -> None:
    command = [sys.executable, "-m", "cratevit", *args]
    print("$ cratevit " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def digit_pngs(folder: Path, indices: tuple[int, ...]) -> list[Path]:
    """Held-out scikit-learn digits written as 32-px grey PNGs (the built-in data's own upscaling)."""
    from PIL import Image

    from cratevit.data.digits import DigitsDataset

    data = DigitsDataset("val", image_size=32)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in indices:
        image, label = data[i]
        path = folder / f"digit{i}_{label}.png"
        Image.fromarray((image[0].numpy() * 255).round().astype("uint8")).save(path)
        paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "docs-figures")
    args = parser.parse_args()
    work = args.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    cratevit("train", "--epochs", "15", "--output", str(work / "digits"))
    (DOCS / "training").mkdir(exist_ok=True)
    shutil.copy(work / "digits" / "curves.png", DOCS / "training" / "curves-digits-15.png")

    cratevit("analyze", str(work / "digits" / "best.pt"), "--with-random", "-o", str(work / "analyze"))
    (DOCS / "analysis").mkdir(exist_ok=True)
    for name in ("compression.png", "sparsity.png"):
        shutil.copy(work / "analyze" / name, DOCS / "analysis" / name)

    [digit] = digit_pngs(work / "digits-png", (0,))
    cratevit("attention", str(work / "digits" / "best.pt"), str(digit), "-o", str(work / "attention"))
    shutil.copy(work / "attention" / digit.stem / "heads.png", DOCS / "analysis" / "attention-heads-digit.png")
    print(f"figures written under {DOCS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
