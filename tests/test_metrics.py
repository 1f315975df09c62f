import time

import numpy as np
import pytest

from gcnee.metrics import accuracy, auc, auc_ci, log_loss, summarize


def test_auc_hand_checked():
    # Pairs (pos, neg): (0.35, 0.1) win, (0.35, 0.4) lose, (0.8, 0.1) win, (0.8, 0.4) win -> 3/4
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1], [0.2, 0.9]) == 1.0
    assert auc([1, 0], [0.2, 0.9]) == 0.0


def test_auc_ties_count_half():
    assert auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    # pos 0.5 vs negs {0.5 tie, 0.1 win} -> 1.5 / 2
    assert auc([0, 0, 1], [0.5, 0.1, 0.5]) == pytest.approx(0.75)


def test_auc_matches_torchmetrics():
    import torch
    from torchmetrics.functional.classification import binary_auroc

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(y * 0.5, 1.0), 1)  # rounding creates ties
    expected = float(binary_auroc(torch.tensor(s), torch.tensor(y)))
    assert auc(y, s) == pytest.approx(expected, abs=1e-6)


def test_auc_single_class_is_nan():
    assert np.isnan(auc([1, 1], [0.1, 0.2]))
    assert all(np.isnan(v) for v in auc_ci([1, 1], [0.1, 0.2])[1:])


def test_auc_ci_covers_point_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (400, 10_000):
        y = rng.integers(0, 2, n)
        s = rng.normal(y * 0.6, 1.0)
        a, lo, hi = auc_ci(y, s, n_boot=500, seed=0)
        assert lo < a < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(n): 5x narrower for 25x the samples
    # the analytic standard error of this AUC at n=400 is ~0.028: 95% width ~ 0.11
    assert 0.07 < widths[0] < 0.15


def test_auc_ci_deterministic_and_fast():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 10_000)
    s = rng.normal(y * 0.3, 1.0)
    start = time.process_time()  # CPU time: the machine may be shared
    first = auc_ci(y, s, n_boot=1000, seed=3)
    assert time.process_time() - start < 10
    assert auc_ci(y, s, n_boot=1000, seed=3) == first


def test_log_loss_and_accuracy_hand_checked():
    y, p = [1, 0, 1, 0], [0.8, 0.3, 0.4, 0.5]
    expected = -(np.log(0.8) + np.log(0.7) + np.log(0.4) + np.log(0.5)) / 4
    assert log_loss(y, p) == pytest.approx(expected)
    assert accuracy(y, p) == pytest.approx(0.5)  # 0.8 right, 0.3 right, 0.4 wrong, 0.5 wrong
    assert np.isfinite(log_loss([1], [0.0]))  # clipped


def test_summarize_keys():
    out = summarize([0, 1, 1, 0], [1.0, 4.0, 5.0, 2.0], n_boot=50, probabilities=False)
    assert out["auc"] == 1.0 and out["n"] == 4 and out["positives"] == 2
    assert "log_loss" not in out
    with pytest.raises(ValueError, match="differ in length"):
        auc([0, 1], [0.3])


def test_auc_diff_ci_is_paired():
    from gcnee.metrics import auc_diff_ci

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 2000)
    a = y + rng.normal(0, 1.0, y.size)  # informative
    b = a + rng.normal(0, 0.3, y.size)  # the same scorer, a little noisier
    assert auc_diff_ci(y, a, a, n_boot=200) == (0.0, 0.0, 0.0)
    d, lo, hi = auc_diff_ci(y, a, b, n_boot=500)
    assert d == pytest.approx(auc(y, a) - auc(y, b)) and lo < d < hi
    assert lo > 0  # paired: the small, consistent gap is resolved...
    _, la, ha = auc_ci(y, a, n_boot=500)
    _, lb, hb = auc_ci(y, b, n_boot=500)
    assert la < hb  # ...although the two separate intervals overlap
