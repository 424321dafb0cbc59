"""The files ``cratevit analyze`` writes from per-layer statistics (Figure 3 of the CRATE paper): one CSV row per
model and layer, the statistics as JSON, and the compression and sparsity curves (plus the sparse code's, for
CRATE-alpha) as PNG and PDF."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .layerwise import LayerwiseStats
from .visualize import layerwise_figure, save_figure

__all__ = ["write_layerwise_report"]

RC_WHERE = {"rc_in": "Z^l (MSSA input)", "rc_half": "Z^{l+1/2} (after MSSA)"}


def write_layerwise_report(results: dict[str, LayerwiseStats], out: Path, plot_rc: str = "rc_in") -> list[str]:
    """Write ``layerwise.csv``, ``layerwise.json``, ``compression``, ``sparsity`` (and ``code_sparsity`` when a
    model has a sparse code) under ``out``, every model's curve on the same axes; ``plot_rc`` picks the plotted
    coding rate (``rc_in``: of the MSSA input, ``rc_half``: after MSSA; both go to the CSV). Returns the names
    written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"model": label, **row} for label, stats in results.items() for row in stats.rows()]
    with (out / "layerwise.csv").open("w", newline="") as f:
        fields = list(dict.fromkeys(k for row in rows for k in row))  # CRATE-alpha's rows add code_sparsity
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out / "layerwise.json").write_text(json.dumps({k: v.to_json() for k, v in results.items()}, indent=2))
    series = {label: stats.rows() for label, stats in results.items()}
    figures = {
        "compression": (
            series,
            plot_rc,
            f"compression R^c of {RC_WHERE[plot_rc]}",
            "coding rate per layer (lower: more compressed)",
        ),
        "sparsity": (
            series,
            "sparsity",
            "fraction of non-zeros of Z^{l+1}",
            "sparsity of the ISTA output (lower: sparser)",
        ),
    }
    coded = {label: rows for label, rows in series.items() if "code_sparsity_mean" in rows[0]}
    if coded:  # CRATE-alpha: the sparse code A_2 is what its ISTA steps make sparse
        figures["code_sparsity"] = (
            coded,
            "code_sparsity",
            "fraction of non-zeros of A_2",
            "sparsity of the sparse code (lower: sparser)",
        )
    tssa = {label: [r for r in rows if "pi_entropy_mean" in r] for label, rows in series.items()}
    tssa = {label: rows for label, rows in tssa.items() if rows}
    if tssa:  # ToST: the TSSA statistics of its TSSA blocks (its class-attention blocks have none)
        figures["pi_entropy"] = (
            tssa,
            "pi_entropy",
            "entropy of the head membership Pi / log(heads)",
            "TSSA membership (0: each token in one head)",
        )
        figures["second_moment"] = (
            tssa,
            "second_moment",
            "mean TSSA statistic s_k",
            "second moments (1 / (1 + s_k) scales head k)",
        )
    for name, (data, key, ylabel, title) in figures.items():
        save_figure(layerwise_figure(data, key, ylabel, title), out / name)
    return ["layerwise.csv", "layerwise.json", *(f"{name}.png/pdf" for name in figures)]
