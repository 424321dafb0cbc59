"""Seed spread of the random-weights scores of a ``cratevit ablation`` run (no training): a floor for the
run-to-run noise of its table. For each of the paper's four variants, the architecture of ``RUN/NAME/best.pt``
is initialised with seeds 1..4 and scored exactly as the run scored its seed-0 copy; writes ``RUN/noise.json``.

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/ablation_noise.py runs/ablation
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from cratevit.analysis.ablation import PAPER_VARIANTS, AblationConfig, random_weights, score_model
from cratevit.analysis.layerwise import input_normalization
from cratevit.checkpoint import load_model
from cratevit.data.coco import load_annotations, read_coco_folder


def main(run: Path, seeds: tuple[int, ...] = (1, 2, 3, 4)) -> None:
    config = json.loads((run / "ablation.json").read_text())
    rows = config["rows"]
    cfg = AblationConfig(out=run, **{k: v for k, v in config["config"].items() if k not in ("out", "variants")})
    images, ann = read_coco_folder(run / "multishapes")
    coco = (images, load_annotations(ann))
    out: dict[str, dict[str, list[float]]] = {}
    for name in PAPER_VARIANTS:
        ckpt = run / name / "best.pt"
        model = load_model(str(ckpt))
        mean, std = input_normalization(ckpt)
        (seed0,) = [r for r in rows if r["variant"] == name and r["weights"] == "random weights"]
        figures = {"shapes_miou": [seed0["shapes_miou"]], "multishapes_miou": [seed0["multishapes_miou"]]}
        figures |= {"box_AP50": [seed0["box"]["AP50"]], "box_AP": [seed0["box"]["AP"]]}
        for seed in seeds:
            s = score_model(random_weights(model, seed), mean, std, cfg, coco)
            for key, value in (("shapes_miou", s["shapes_miou"]), ("multishapes_miou", s["multishapes_miou"])):
                figures[key].append(value)
            figures["box_AP50"].append(s["box"]["AP50"])
            figures["box_AP"].append(s["box"]["AP"])
        out[name] = figures
        print(
            name,
            " | ".join(
                f"{k} {statistics.fmean(v):.1f} ± {statistics.stdev(v):.1f} ({min(v):.1f}-{max(v):.1f})"
                for k, v in figures.items()
            ),
            flush=True,
        )
    (run / "noise.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
