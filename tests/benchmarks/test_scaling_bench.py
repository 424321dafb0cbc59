"""The scaling benchmark (benchmarks/scaling.py) at CI size: every file written, every model measured or stopped
with a reason, exponents fitted; the statistics it reports are the right ones."""

from __future__ import annotations

import json
import math

import pytest
import scaling  # benchmarks/ is on sys.path (tests/conftest.py)


def test_quick_run_writes_table_plot_and_json(tmp_path, torch_threads):  # the script sets --threads
    result = scaling.main(["--quick", "--models", "tost", "crate", "--reps", "1", "--out", str(tmp_path)])
    for name in ("scaling.md", "scaling.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert {(p["model"], p["tokens"]) for p in data["points"]} == {(m, n) for m in ("tost", "crate") for n in (16, 64)}
    for p in result.points:
        assert p.infer_ms > 0 and p.train_ms > 0 and p.train_mib >= 0
    assert all(isinstance(result.exponents[m]["train_ms"], float) for m in ("tost", "crate"))
    table = (tmp_path / "scaling.md").read_text()
    assert "| 64 |" in table and "ToST (TSSA)" in table and "Fitted exponents" in table


def test_a_model_stops_before_it_would_exceed_the_memory_limit(tmp_path, torch_threads):  # sets --threads
    result = scaling.main(
        ["--quick", "--models", "crate_explicit", "--max-mem-gb", "1e-9", "--no-memory", "--out", str(tmp_path)]
    )
    # without memory figures the limit cannot be judged from data: only the time limit applies, nothing stops
    assert [p.stopped for p in result.points] == [None, None]
    result = scaling.main(["--quick", "--models", "crate_explicit", "--max-seconds", "1e-9", "--out", str(tmp_path)])
    first, second = result.points
    assert first.stopped is None and first.train_ms > 0
    assert second.stopped.startswith("stopped at 64 tokens") and second.train_ms is None
    assert "stopped at 64 tokens" in (tmp_path / "scaling.md").read_text()


def test_fit_and_extrapolation():
    xs = [100, 200, 400, 800]
    assert scaling.slope(xs, [3 * x**1.5 for x in xs]) == pytest.approx(1.5)
    assert scaling.extrapolate([100, 200], [1.0, 4.0], 400) == pytest.approx(16.0)
    assert scaling.extrapolate([100], [1.0], 300) == pytest.approx(9.0)  # one point: assume quadratic
    assert math.isclose(scaling.extrapolate([100, 200], [2.0, 1.0], 400), 2.0)  # never assumes less than linear


def test_memory_measurement_sees_a_known_allocation():
    import torch

    mib = scaling.peak_memory_mib(lambda: torch.ones(64 * 2**20 // 4).add_(1))
    assert 60 <= mib <= 80
