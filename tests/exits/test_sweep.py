import json

import numpy as np
import pytest
import torch

from gcnee.config import load_config
from gcnee.exits.calibration import Calibration
from gcnee.exits.heads import ExitHeads
from gcnee.exits.rules import make_rule, replay
from gcnee.exits.scorer import EarlyExitScorer
from gcnee.exits.sweep import (
    choose,
    cross_fitted,
    fold_auc,
    run_sweep,
    sweep_settings,
    val_folds,
)
from gcnee.exits.sweep_output import write_sweep
from gcnee.metrics import auc

from tiny import make_tiny_llama


def _scorer(layers=(1, 2, 3, 4), seed=0, **kw):
    model = make_tiny_llama(64, num_layers=4, seed=seed)
    heads = ExitHeads.from_model(model, list(layers), (10, 11), head="answer", init="random")
    return EarlyExitScorer(model, heads, **kw)


def _requests(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=g)
    reqs = [torch.randint(5, 64, (int(t),), generator=g).tolist() for t in lengths]
    labels = torch.randint(0, 2, (n,), generator=g).tolist()
    return reqs, labels


def _cfg(*extra):
    return load_config(None, ["eval.batch_size=5", "eval.rps_samples=10", "eval.bootstrap=50",
                              "eval.rps_repeats=1", *extra]).eval


def test_settings_cover_every_family_with_and_without_calibration():
    cfg = _cfg("eval.thresholds=[0.1,0.2]", "eval.windows=[1,2]", "eval.window=2",
               "eval.threshold=0.1", "eval.confidence_thresholds=[0.7]",
               "eval.patience_windows=[2,9]")
    raw = sweep_settings(cfg, n_heads=4, calibrated=False)
    assert [(s.kind, s.rule.label() if s.rule else None) for s in raw] == [
        ("full", None), ("tau", "window(tau=0.1,m=2)"), ("tau", "window(tau=0.2,m=2)"),
        ("m", "window(tau=0.1,m=1)"),  # (0.1, 2) is already in the τ sweep
        ("confidence", "confidence(tau=0.7)"), ("patience", "patience(m=2)"),  # m=9 > heads
        ("fixed", "fixed(head=1)"), ("fixed", "fixed(head=2)"), ("fixed", "fixed(head=3)")]
    cal = sweep_settings(cfg, n_heads=4, calibrated=True)
    rule_rows = [s for s in cal if s.kind not in ("full", "fixed")]
    assert [(s.calibrated, s.reads) for s in rule_rows[:3]] == [
        (False, "raw"), (True, "raw"), (True, "calibrated")]
    assert len(rule_rows) == 3 * 5
    one = sweep_settings(_cfg("eval.sweep_rules=[patience]", "eval.patience_windows=[2]",
                              "eval.sweep_rule_reads=[raw]"), 4, True)
    assert [(s.calibrated, s.reads) for s in one[1:]] == [(False, "raw"), (True, "raw")]
    only = sweep_settings(_cfg("eval.sweep_rules=[fixed]"), 4, True)
    assert [s.kind for s in only] == ["full", "fixed", "fixed", "fixed"]


def test_sweep_rows_match_replay_and_full_depth(tmp_path):
    scorer = _scorer()
    reqs, labels = _requests()
    cfg = _cfg("eval.thresholds=[0.0,1.0]", "eval.windows=[1]", "eval.sweep_rules=[window,fixed]")
    result = run_sweep(scorer, reqs, labels, cfg)
    rows = result["rows"]
    assert [r["kind"] for r in rows] == ["full", "tau", "tau", "m", "fixed", "fixed", "fixed"]
    full = scorer.score_requests(reqs, 5, mode="full").scores.numpy()
    assert abs(rows[0]["auc"] - auc(labels, full)) < 1e-9
    assert rows[0]["mean_exit_layer"] == 4 and rows[0]["auc_diff"] == 0
    # tau = 0 never fires (strict <): every row answers at the last head, as full depth
    assert rows[1]["mean_exit_layer"] == 4 and abs(rows[1]["auc"] - rows[0]["auc"]) < 1e-6
    assert rows[1]["timed_as"] == rows[1]["row"] and rows[1]["ideal_speedup"] < 1.0
    # tau = 1 always fires: every row leaves at the first eligible head (the third, layer 3)
    assert rows[2]["mean_exit_layer"] == 3 and rows[2]["exit_share"][3] == 1.0
    probs = scorer.score_requests(reqs, 5, mode="all").head_probs
    heads = replay(probs, make_rule("window", tau=1.0, m=int(cfg.window)))
    assert abs(rows[2]["auc"] - auc(labels, probs[torch.arange(len(reqs)), heads].numpy())) < 1e-9
    d = auc(labels, probs[torch.arange(len(reqs)), heads].numpy()) - auc(labels, full)
    assert rows[2]["auc_diff"] == pytest.approx(d, abs=1e-9)
    assert rows[2]["auc_diff_lo"] <= rows[2]["auc_diff"] <= rows[2]["auc_diff_hi"]
    # every request at layer 3 has the same exits as tau = 1: one timing serves both
    fixed3 = next(r for r in rows if r.get("layer") == 3)
    assert fixed3["timed_as"] == rows[2]["row"] and fixed3["rps"] == rows[2]["rps"]
    assert fixed3["row"] == "every request at layer 3" and fixed3["mean_exit_layer"] == 3
    assert all(r.get("replay_mismatches", 0) == 0 for r in rows)
    for r in rows:
        assert r["n_rps"] == 10 and r["n_auc"] == len(reqs) and r["rps"] > 0
        assert r["achieved_fraction"] == pytest.approx(r["speedup"] / r["timed_ideal_speedup"])
        assert abs(sum(r["exit_share"].values()) - 1.0) < 1e-9
    assert result["chosen"] is None  # no validation, nothing chosen

    paths = write_sweep(result, tmp_path)
    names = {p.name for p in paths}
    assert {"sweep.json", "sweep.csv", "sweep.md", "sweep_pareto.png", "sweep_threshold.png",
            "sweep_window.png"} <= names
    assert json.loads((tmp_path / "sweep.json").read_text())["rows"][0]["row"] == "full depth"
    lines = (tmp_path / "sweep.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + len(rows)
    assert np.isclose(float(lines[1].split(",")[8]), rows[0]["auc"])


def test_sweep_with_recorded_head_probs_equals_its_own_pass():
    scorer = _scorer(seed=1)
    reqs, labels = _requests(n=16, seed=3)
    cfg = _cfg("eval.thresholds=[0.05,1.0]", "eval.windows=[2]", "eval.bootstrap=0")
    own = run_sweep(scorer, reqs, labels, cfg)
    probs = scorer.score_requests(reqs, 3, mode="all").head_probs  # another batching
    given = run_sweep(scorer, reqs, labels, cfg, head_probs=probs)
    assert own["head_probs"] == "all-heads pass" and given["head_probs"] == "recorded"
    for a, b in zip(own["rows"], given["rows"]):
        assert abs(a["auc"] - b["auc"]) < 1e-6
        assert a["mean_exit_layer"] == b["mean_exit_layer"]


def test_choice_uses_validation_only():
    rows = [{"row": "full depth", "val_auc": 0.70, "val_auc_loss": 0.0, "val_ideal_speedup": 1.0,
             "auc": 0.60},
            {"row": "fast but worse on val", "val_auc": 0.60, "val_auc_loss": 0.10,
             "val_ideal_speedup": 3.0, "auc": 0.99},  # great on test: must not be chosen
            {"row": "a", "val_auc": 0.698, "val_auc_loss": 0.002, "val_ideal_speedup": 1.5,
             "auc": 0.50},
            {"row": "b", "val_auc": 0.699, "val_auc_loss": 0.001, "val_ideal_speedup": 1.5,
             "auc": 0.40}]
    assert choose(rows, 0.005)["row"] == "b"  # same speed: the higher validation AUC
    assert choose(rows, 0.0)["row"] == "full depth"
    assert choose([{"row": "x"}], 0.005) is None


def test_calibrated_sweep_chooses_on_cross_fitted_validation_and_reports_test():
    """Two heads that rank perfectly on different scales: mixing their raw scores loses AUC,
    calibrated scores keep it; calibrated rows are judged on validation out of fold."""
    scorer = _scorer(layers=(2, 4), seed=2)
    reqs, labels = _requests(n=40, seed=5)
    g = np.random.default_rng(0)

    def planted(y):  # head at layer 2 | head at layer 4, positives above negatives in each
        a = np.where(y == 1, g.uniform(0.85, 0.95, len(y)), g.uniform(0.5, 0.7, len(y)))
        b = np.where(y == 1, g.uniform(0.95, 1.0, len(y)), g.uniform(0.91, 0.94, len(y)))
        return torch.tensor(np.stack([a, b], 1), dtype=torch.float32)

    test_p = planted(np.asarray(labels))
    vy = np.tile([0, 1], 60)
    val_p = planted(vy)
    cal = Calibration.fit(val_p, vy, [2, 4], kind="platt")
    cfg = _cfg("eval.sweep_rules=[confidence]", "eval.confidence_thresholds=[0.9]",
               "eval.max_auc_loss=0.0")
    res = run_sweep(scorer, reqs, labels, cfg, head_probs=test_p, val_probs=val_p,
                    val_labels=vy.tolist(), calibration=cal, calibration_kind="platt")
    by = {(r["rule"], r["calibrated"], r["reads"]): r for r in res["rows"]}
    raw, cal_raw = by[("confidence", False, "raw")], by[("confidence", True, "raw")]
    cal_cal = by[("confidence", True, "calibrated")]
    # raw: confident positives leave at layer 2 with P 0.90-0.95, below the negatives that
    # reach layer 4 (0.91-0.94): the mix ranks worse than either head
    assert 0 < raw["exit_share"][2] < 1 and raw["auc"] < 1.0 and raw["val_auc"] < 1.0
    # the same exits with calibrated scores rank perfectly
    assert cal_raw["exit_share"] == raw["exit_share"] and cal_raw["timed_as"] == raw["row"]
    assert cal_raw["auc"] == 1.0
    # a rule reading calibrated P is confident at layer 2 for everyone: 2x faster, still 1.0
    assert cal_cal["exit_share"] == {2: 1.0} and cal_cal["auc"] == 1.0
    assert cal_cal["val_auc"] == 1.0 and cal_cal["val_auc_loss"] == 0.0
    assert res["chosen"]["row"] == cal_cal["row"]
    assert res["calibration"] is not None and res["n_val"] == 120
    fold = val_folds(vy)
    assert sorted(np.bincount(fold).tolist()) == [24] * 5  # stratified: 12 of each class
    assert all(vy[fold == k].sum() == 12 for k in range(5))
    oof = cross_fitted(val_p, vy, [2, 4], "platt", fold)
    assert oof.shape == val_p.shape and not torch.equal(oof, cal.apply_all(val_p, [2, 4]))
    # validation AUC is the mean of per-fold AUCs (each fold scored by one set of maps)
    scores = oof[:, 1].numpy()
    assert fold_auc(vy, scores, fold) == pytest.approx(
        np.mean([auc(vy[fold == k], scores[fold == k]) for k in range(5)]))
