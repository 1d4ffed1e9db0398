"""The evaluation's set scores (prdc's precision/recall/density/coverage, torchmetrics' KID, the Fréchet distance) on
point sets with known answers, and the gaps' intervals and DD-Ranking's label-robust score against direct
computations."""
import math

import numpy as np
import pytest
import torch

from d4m.figures import gap_interval, gap_text, label_robust_score
from d4m.scores import frechet, kid, set_scores


def clusters(n: int, centres: list[float], seed: int = 0, dims: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n, dims, generator=gen) * 0.1 + c for c in centres])


def test_a_set_of_real_points_covers_them_and_a_far_set_nothing():
    real = clusters(100, [0.0])
    same = set_scores(real, real[:50])
    assert same["precision"] == 1 and same["recall"] == pytest.approx(1, abs=0.05)
    far = set_scores(real, clusters(50, [10.0], seed=1))
    assert far["precision"] == far["recall"] == far["density"] == far["coverage"] == 0


def test_a_set_in_one_of_two_modes_covers_half_the_real_points():
    real = clusters(100, [0.0, 5.0])
    one_mode = set_scores(real, clusters(100, [0.0], seed=1))
    both = set_scores(real, clusters(50, [0.0, 5.0], seed=1))
    assert one_mode["precision"] > 0.8 and both["precision"] > 0.8  # the set's points lie among real points
    assert one_mode["coverage"] == pytest.approx(0.5, abs=0.03)  # only the first mode's real points are reached
    assert both["coverage"] > 0.8
    assert one_mode["kid"] > both["kid"]


def test_kid_is_the_unbiased_polynomial_mmd():
    """With subsets as large as the sets, every subset holds all points: KID is then the unbiased MMD^2 with the
    kernel (x.y / d + 1)^3, computed here directly."""
    a, b = clusters(20, [0.0], seed=0), clusters(20, [0.5], seed=1)
    k = lambda x, y: (x.double() @ y.double().T / x.shape[1] + 1) ** 3
    m = len(a)
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    expected = ((kaa.sum() - kaa.trace()) / (m * (m - 1)) + (kbb.sum() - kbb.trace()) / (m * (m - 1))
                - 2 * kab.mean())
    mean, std = kid(a, b)
    assert mean == pytest.approx(float(expected), rel=1e-6) and std == pytest.approx(0, abs=1e-9)


def test_kid_of_two_samples_of_one_distribution_is_near_zero_whatever_their_size():
    real = clusters(2000, [0.0], dims=16)
    small = clusters(10, [0.0], seed=3, dims=16)
    assert abs(kid(real, small)[0]) < 0.05 < kid(real, small + 1)[0]


def test_frechet_is_given_only_where_the_set_outnumbers_the_dimensions():
    real = clusters(200, [0.0])
    assert set_scores(real, real[:4])["frechet"] is None  # 4 points in 4 dimensions
    assert set_scores(real, real[:5])["frechet"] is not None
    a = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert frechet(a, a) == pytest.approx(0, abs=1e-8)
    assert frechet(a, a + 2) == pytest.approx(8 * 4, rel=1e-6)


def test_sets_too_small_for_neighbours_get_kid_but_no_prdc():
    real = clusters(100, [0.0])
    tiny = set_scores(real, real[:2])
    assert tiny["coverage"] is None and tiny["precision"] is None and math.isfinite(tiny["kid"])


def test_gap_interval_is_welchs():
    from scipy.stats import ttest_ind

    runs, baseline = [81.2, 81.3, 81.0, 80.7], [80.1, 80.9, 80.5]
    gap, low, high = gap_interval(runs, baseline)
    interval = ttest_ind(runs, baseline, equal_var=False).confidence_interval(0.95)
    assert gap == pytest.approx(np.mean(runs) - np.mean(baseline))
    assert (low, high) == pytest.approx((interval.low, interval.high))
    one = gap_interval([81.0], baseline)
    assert one[0] == pytest.approx(81.0 - np.mean(baseline)) and math.isnan(one[1])


def test_gap_text_shows_the_interval_when_there_is_one():
    assert gap_text({"ior_fkd": 1.234, "ior_fkd_ci": [0.1, 2.36]}, "ior_fkd") == "+1.23 [+0.10, +2.36]"
    assert gap_text({"ior_fkd": -0.5, "ior_fkd_ci": None}, "ior_fkd") == "-0.50"
    assert gap_text({}, "ior_fkd") == "—"


def test_label_robust_score_is_ddrankings_formula_on_fractions():
    e = math.e
    assert label_robust_score(0, 0) == pytest.approx((1 - 1 / e) / (e - 1 / e))
    # IOR +10 points, HLR 30 points: alpha = 0.5 * 0.1 - 0.5 * 0.3 = -0.1
    assert label_robust_score(10, 30) == pytest.approx((math.exp(-0.1) - 1 / e) / (e - 1 / e))
    assert label_robust_score(100, 0) > label_robust_score(0, 0) > label_robust_score(0, 100)
