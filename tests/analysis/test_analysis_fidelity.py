"""Figure 3's error bars use the reference code's standard deviation for each measure (values by hand)."""

import math

import torch

from cratevit.analysis import DEFINITIONS, LayerwiseStats, compression


def stats(rc: list[float], sparse: list[float]) -> LayerwiseStats:
    col = lambda v: torch.tensor(v, dtype=torch.float64)[:, None]  # (images, 1 layer)
    return LayerwiseStats(rc_in=col(rc), rc_half=col(rc), sparsity=col(sparse))


def test_coding_rate_std_is_unbiased_and_sparsity_std_is_population():
    (row,) = stats([1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.4]).rows()
    # R^c: the official CodingRate returns torch.std (divide by N - 1): sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3)
    assert math.isclose(row["rc_in_std"], math.sqrt(5 / 3), rel_tol=1e-12)
    assert math.isclose(row["rc_half_std"], math.sqrt(5 / 3), rel_tol=1e-12)
    # sparsity: the official plot code uses np.std (divide by N): sqrt((0.0225 + 0.0025 + 0.0025 + 0.0225) / 4)
    assert math.isclose(row["sparsity_std"], math.sqrt(0.0125), rel_tol=1e-12)
    assert math.isclose(row["rc_in_mean"], 2.5) and math.isclose(row["sparsity_mean"], 0.25)
    assert "unbiased" in DEFINITIONS["std"] and "population" in DEFINITIONS["std"]


def test_one_image_has_zero_spread_not_nan():
    (row,) = stats([7.0], [0.5]).rows()
    assert row["rc_in_std"] == 0.0 and row["sparsity_std"] == 0.0


def test_compression_by_hand():
    # two heads, two orthogonal unit tokens of width 2: each head 1/2 logdet((1 + 2/(2*0.01)) I_2) = ln(101)
    proj = torch.eye(2).expand(1, 2, 2, 2)
    torch.testing.assert_close(compression(proj), torch.tensor([2 * math.log(101.0)], dtype=torch.float64))
