"""Per-head calibration: Platt/isotonic fits, auto choice by K-fold, mixing heads, state."""

import json
import math

import numpy as np
import pytest
import torch

from gcnee.exits.calibration import (
    ISO_EPS,
    Calibration,
    IsotonicMap,
    PlattMap,
    fit_head_calibration,
    fit_isotonic,
    fit_platt,
)
from gcnee.metrics import auc


def logistic_data(n, a=2.0, b=-0.5, seed=0):
    """p uniform, y ~ Bernoulli(sigmoid(a logit p + b)): Platt is the true model."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.01, 0.99, n)
    q = 1 / (1 + np.exp(-(a * np.log(p / (1 - p)) + b)))
    return p, (rng.uniform(size=n) < q).astype(np.float64)


def step_data(n, seed=0):
    """P(y=1 | p) = 0.1 below 0.5 and 0.9 above: a step no sigmoid of logit p follows."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 1, n)
    return p, (rng.uniform(size=n) < np.where(p < 0.5, 0.1, 0.9)).astype(np.float64)


def test_platt_recovers_known_parameters():
    m = fit_platt(*logistic_data(20000))
    assert m.a == pytest.approx(2.0, abs=0.1)
    assert m.b == pytest.approx(-0.5, abs=0.1)


def test_platt_anticorrelated_falls_back_to_constant():
    p, y = logistic_data(2000, a=-2.0, b=0.0)
    m = fit_platt(p, y)
    assert m.a == 0.0
    assert 1 / (1 + math.exp(-m.b)) == pytest.approx((y.sum() + 0.5) / (y.size + 1))


@pytest.mark.parametrize("kind", ["platt", "isotonic", "auto"])
@pytest.mark.parametrize("data", [logistic_data, step_data])
def test_maps_monotone_and_inside_unit_interval(kind, data):
    m = fit_head_calibration(*data(3000), kind=kind)
    grid = torch.linspace(0, 1, 10001)
    q = m(grid)
    assert q.shape == grid.shape and q.dtype == torch.float32
    assert (q[1:] >= q[:-1]).all()
    assert (q > 0).all() and (q < 1).all()


def test_isotonic_hand_computed_pav():
    # y = 0 | 1 0 0 | 1 1: (1, 0) violates -> pooled 1/2, then 0 < 1/2 -> pooled 1/3; 1, 1 equal
    # -> pooled. Blocks {0.1}: 0, {0.2..0.4}: 1/3, {0.5, 0.6}: 1.
    m = fit_isotonic(np.array([0.4, 0.1, 0.3, 0.2, 0.6, 0.5]), np.array([0, 0, 0, 1, 1, 1]))
    assert m.x == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.6])
    assert m.y == pytest.approx([ISO_EPS, 1 / 3, 1 / 3, 1 - ISO_EPS, 1 - ISO_EPS])
    p = torch.tensor([0.0, 0.1, 0.15, 0.2, 0.3, 0.45, 0.55, 0.9])
    expected = [ISO_EPS, ISO_EPS, (ISO_EPS + 1 / 3) / 2, 1 / 3, 1 / 3, (1 / 3 + 1 - ISO_EPS) / 2,
                1 - ISO_EPS, 1 - ISO_EPS]
    assert m(p).tolist() == pytest.approx(expected, abs=1e-6)


def test_isotonic_separable_and_ties():
    m = fit_isotonic(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1]))
    assert m.x == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert m(torch.tensor([0.05, 0.2, 0.25, 0.4])).tolist() == pytest.approx(
        [ISO_EPS, ISO_EPS, 0.5, 1 - ISO_EPS], abs=1e-6)
    # tied p values are one block before PAV starts: {0.2, 0.2} -> 1/2, {0.5} -> 1
    m = fit_isotonic(np.array([0.2, 0.2, 0.5]), np.array([0, 1, 1]))
    assert m.x == pytest.approx([0.2, 0.5])
    assert m.y == pytest.approx([0.5, 1 - ISO_EPS])


def test_identity_is_bit_identical():
    cal = Calibration.identity([4, 8, 12])
    assert cal.is_identity
    probs = torch.rand(64, 3)
    assert torch.equal(cal.apply(8, probs[:, 1]), probs[:, 1])
    assert torch.equal(cal.apply_all(probs, [4, 8, 12]), probs)
    with_nan = probs.clone()
    with_nan[::3, 1:] = float("nan")
    out = cal.apply_all(with_nan, [4, 8, 12])
    assert torch.equal(torch.isnan(out), torch.isnan(with_nan))
    assert torch.equal(out.nan_to_num(-1), with_nan.nan_to_num(-1))


@pytest.mark.parametrize("kind", ["none", "platt", "isotonic", "auto"])
def test_nan_passes_through_every_kind(kind):
    p, y = step_data(1000)
    probs = np.stack([p, p], axis=1)
    probs[::4, 1] = np.nan  # rows that left at the first head never reached the second
    cal = Calibration.fit(probs, y, layers=[3, 6], kind=kind)
    assert cal.maps[6].info["n"] == 750  # NaN rows are not fitted on
    x = torch.tensor(probs, dtype=torch.float32)
    with torch.inference_mode():
        out = cal.apply_all(x, [3, 6])
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device == x.device
    assert torch.equal(torch.isnan(out), torch.isnan(x))


def planted(n, seed):
    """Two heads that rank perfectly but on different scales: A in [0, 0.4], B in [0.6, 1]."""
    rng = np.random.default_rng(seed)
    # A small margin at each head's threshold: with a continuous boundary, a finite validation
    # draw leaves a gap in which any calibrator has to guess.
    ya, yb = rng.integers(0, 2, n), rng.integers(0, 2, n)
    pa = np.where(ya == 1, rng.uniform(0.22, 0.4, n), rng.uniform(0.0, 0.18, n))
    pb = np.where(yb == 1, rng.uniform(0.82, 1.0, n), rng.uniform(0.6, 0.78, n))
    return pa, ya, pb, yb


@pytest.mark.parametrize("kind", ["platt", "isotonic", "auto"])
def test_planted_mixed_heads_auc(kind):
    va_a, vy_a, va_b, vy_b = planted(1000, seed=1)  # validation draw
    pa, ya, pb, yb = planted(1000, seed=2)  # test draw: half from each head
    y, raw = np.concatenate([ya, yb]), np.concatenate([pa, pb])
    assert auc(ya, pa) == 1.0 and auc(yb, pb) == 1.0
    assert auc(y, raw) < 0.8
    ma, mb = fit_head_calibration(va_a, vy_a, kind), fit_head_calibration(va_b, vy_b, kind)
    cal = np.concatenate([ma(torch.from_numpy(pa)).numpy(), mb(torch.from_numpy(pb)).numpy()])
    assert auc(y, cal) == 1.0


def test_auto_picks_isotonic_for_step_and_platt_for_logistic():
    step = fit_head_calibration(*step_data(5000), kind="auto", seed=0)
    assert step.kind == "isotonic" and isinstance(step, IsotonicMap)
    assert step.info["log_loss_isotonic"] < step.info["log_loss_platt"] < step.info["log_loss_raw"]
    logi = fit_head_calibration(*logistic_data(5000), kind="auto", seed=0)
    assert logi.kind == "platt" and isinstance(logi, PlattMap)
    assert logi.info["log_loss_platt"] < logi.info["log_loss_isotonic"]
    assert logi.info["log_loss_cal"] == logi.info["log_loss_platt"]
    again = fit_head_calibration(*logistic_data(5000), kind="auto", seed=0)
    assert again.info == logi.info and (again.a, again.b) == (logi.a, logi.b)


def test_state_round_trip_is_json():
    p, y = step_data(2000)
    probs = np.stack([p, np.clip(p * 0.5, 0, 1), p], axis=1)
    labels = y.copy()
    cal = Calibration.fit(probs, labels, layers=[2, 5, 9], kind="auto", seed=3)
    cal.maps[9] = fit_head_calibration(p, np.zeros_like(p), "platt")  # NaN out-of-fold losses
    state = json.loads(json.dumps(cal.state_dict(), allow_nan=False))
    back = Calibration.from_state(state)
    x = torch.tensor(probs, dtype=torch.float32)
    assert torch.equal(back.apply_all(x, [2, 5, 9]), cal.apply_all(x, [2, 5, 9]))
    assert {k: v["kind"] for k, v in back.summary().items()} == {
        k: v["kind"] for k, v in cal.summary().items()}
    assert math.isnan(back.summary()[9]["log_loss_cal"])
    assert set(cal.summary()[2]) >= {"kind", "log_loss_raw", "log_loss_cal"}
    assert not back.is_identity
    assert Calibration.from_state(Calibration.identity([1]).state_dict()).is_identity


@pytest.mark.parametrize("kind", ["platt", "isotonic", "auto"])
def test_single_class_gives_constant_map(kind):
    p = np.random.default_rng(0).uniform(size=200)
    m = fit_head_calibration(p, np.zeros(200), kind)
    q = m(torch.linspace(0, 1, 101))
    assert torch.isfinite(q).all() and (q > 0).all()
    assert q.max() - q.min() < 1e-6 and q.max() < 0.01  # ~ the (smoothed) rate of zero
    assert math.isnan(m.info["log_loss_cal"])


def test_fit_checks_shapes_and_unknown_layer():
    with pytest.raises(ValueError):
        Calibration.fit(np.zeros((10, 2)), np.zeros(10), layers=[1, 2, 3])
    with pytest.raises(ValueError):
        fit_head_calibration(np.zeros(3), np.zeros(3), kind="beta")
    with pytest.raises(KeyError):
        Calibration.identity([1]).apply(2, torch.zeros(3))
