"""Coding rate, sparsity and the layer-wise statistics of Figure 3; the `cratevit analyze` command."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from cratevit import create_model
from cratevit.analysis import coding_rate, compression, layerwise_stats, load_model, logdet_spd, sparsity
from cratevit.cli import main


def direct_rate(x: np.ndarray, eps: float = 0.01) -> float:
    """The reference's formula on the n x n matrix, with numpy's LU log-determinant."""
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    n, p = x.shape
    sign, logdet = np.linalg.slogdet(np.eye(n) + p / (n * eps) * x @ x.T)
    assert sign > 0
    return 0.5 * logdet


@pytest.mark.parametrize("n,p", [(65, 16), (17, 32), (197, 64)])
def test_gram_form_equals_direct_formula(n: int, p: int) -> None:
    x = torch.randn(2, 3, n, p)
    ours = coding_rate(x)
    for side in ("tokens", "features"):
        torch.testing.assert_close(coding_rate(x, side=side), ours, rtol=1e-10, atol=1e-9)
    expected = np.array([[direct_rate(x[b, h].double().numpy()) for h in range(3)] for b in range(2)])
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10)


def test_coding_rate_known_values() -> None:
    # n identical unit tokens: X X^T = all-ones (rank 1, eigenvalue n) -> 1/2 log(1 + p/eps)
    x = torch.ones(10, 4)
    assert coding_rate(x).item() == pytest.approx(0.5 * math.log(1 + 4 / 0.01))
    # n = p orthonormal tokens: X X^T = I -> n/2 log(1 + p/(n eps))
    assert coding_rate(torch.eye(8)).item() == pytest.approx(4 * math.log(1 + 1 / 0.01))
    # scaling a token does not change the rate (tokens are normalised)
    y = torch.randn(30, 8)
    assert coding_rate(y * torch.rand(30, 1) * 10).item() == pytest.approx(coding_rate(y).item())


def test_logdet_and_rates_never_nan_with_two_threads(torch_threads) -> None:
    """torch.logdet returned NaN for 197x197 matrices under set_num_threads(2); the Cholesky form must not."""
    torch_threads(2)
    proj = torch.randn(4, 6, 197, 64)
    rates = compression(proj)
    assert torch.isfinite(rates).all()
    rates_direct = coding_rate(proj, side="tokens")
    assert torch.isfinite(rates_direct).all()
    torch.testing.assert_close(rates_direct.sum(1), rates, rtol=1e-9, atol=1e-8)
    with pytest.raises(ValueError, match="positive definite"):
        logdet_spd(-torch.eye(3))


def test_sparsity_counts_nonzeros() -> None:
    z = torch.zeros(2, 4, 5)
    z[0, :2] = 1.0
    assert sparsity(z).tolist() == [0.5, 0.0]


def test_layerwise_stats_shapes_and_consistency(torch_threads) -> None:
    torch_threads(2)
    model = create_model("crate_debug")
    x = torch.randn(5, 3, 32, 32)
    stats = layerwise_stats(model, x, batch_size=2)
    assert stats.rc_in.shape == stats.rc_half.shape == stats.sparsity.shape == (5, 2)
    assert torch.isfinite(stats.rc_in).all() and torch.isfinite(stats.rc_half).all()
    trace = model.eval().forward_trace(x)
    torch.testing.assert_close(stats.rc_in[:, 1], compression(trace.layers[1].proj))
    torch.testing.assert_close(stats.sparsity[:, 0], sparsity(trace.layers[0].z_out))
    rows = stats.rows()
    assert [r["layer"] for r in rows] == [0, 1]  # block indices, as blocks.0 and blocks.1
    assert rows[0]["rc_in_mean"] == pytest.approx(float(stats.rc_in[:, 0].mean()))
    assert 0 < rows[1]["sparsity_mean"] < 1
    # the upper bound of the rate: heads * 1/2 * min(n, p) * log(1 + max eigenvalue) is never exceeded
    n, p = 17, 16
    assert float(stats.rc_in.max()) < 2 * 0.5 * min(n, p) * math.log(1 + n * p / (n * 0.01))


def test_load_model_errors() -> None:
    with pytest.raises(FileNotFoundError, match=r"not found: missing\.pth"):
        load_model("missing.pth")
    with pytest.raises(ValueError, match="neither a checkpoint file nor a preset"):
        load_model("crate_tinyy")
    assert load_model("CRATE_debug").config.depth == 2


def test_analyze_command_writes_csv_json_plots(tmp_path, capsys) -> None:
    from cratevit import save_checkpoint

    torch.manual_seed(1)  # other weights than the random init (seed 0)
    ckpt = save_checkpoint(tmp_path / "m.pt", create_model("crate_debug"))
    out = tmp_path / "out"
    rc = main(["analyze", str(ckpt), "--with-random", "--num-images", "12", "--batch-size", "5", "-o", str(out)])
    assert rc == 0
    rows = list(csv.DictReader((out / "layerwise.csv").open()))
    label = f"{tmp_path.name}/m.pt"
    assert [r["model"] for r in rows] == [label] * 2 + ["random init"] * 2
    assert rows[0]["rc_in_mean"] != rows[2]["rc_in_mean"]
    assert {"rc_in_mean", "rc_in_std", "rc_half_mean", "rc_half_std", "sparsity_mean", "sparsity_std"} <= set(rows[0])
    data = json.loads((out / "layerwise.json").read_text())
    assert data[label]["num_images"] == 12 and "logdet" in data[label]["definitions"]["rc_in"]
    for name in ("compression", "sparsity"):
        assert (out / f"{name}.png").stat().st_size > 1000
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    assert label in capsys.readouterr().out


def test_analyze_on_image_files(tmp_path, capsys) -> None:
    from PIL import Image
    from skimage import data

    Image.fromarray(data.astronaut()).save(tmp_path / "a.png")
    Image.fromarray(data.camera()).save(tmp_path / "b.jpg")
    out = tmp_path / "out"
    assert (
        main(["analyze", "crate_debug", "--images", str(tmp_path / "a.png"), str(tmp_path / "b.jpg"), "-o", str(out)])
        == 0
    )
    data = json.loads((out / "layerwise.json").read_text())
    assert data["crate_debug"]["num_images"] == 2
    assert main(["analyze", "crate_debug", "--data", str(tmp_path / "nothing"), "-o", str(out)]) == 2
    assert "not a folder" in capsys.readouterr().err
