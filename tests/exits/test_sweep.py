import json

import numpy as np
import torch

from gcnee.config import load_config
from gcnee.exits.heads import ExitHeads
from gcnee.exits.rules import make_rule, replay
from gcnee.exits.scorer import EarlyExitScorer
from gcnee.exits.sweep import run_sweep, sweep_rules, write_sweep
from gcnee.metrics import auc

from tiny import make_tiny_llama


def _scorer(layers=(1, 2, 3, 4), seed=0):
    model = make_tiny_llama(64, num_layers=4, seed=seed)
    heads = ExitHeads.from_model(model, list(layers), (10, 11), head="answer", init="random")
    return EarlyExitScorer(model, heads)


def _requests(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=g)
    reqs = [torch.randint(5, 64, (int(t),), generator=g).tolist() for t in lengths]
    labels = torch.randint(0, 2, (n,), generator=g).tolist()
    return reqs, labels


def test_sweep_rules_cover_thresholds_and_windows():
    cfg = load_config(None, ["eval.thresholds=[0.1,0.2]", "eval.windows=[1,3]",
                             "eval.window=2", "eval.threshold=0.05"]).eval
    rules = sweep_rules(cfg)
    assert [(k, r.tau, r.m) for k, r in rules] == [
        ("tau", 0.1, 2), ("tau", 0.2, 2), ("m", 0.05, 1), ("m", 0.05, 3)]


def test_sweep_rows_match_replay_and_full_depth(tmp_path):
    scorer = _scorer()
    reqs, labels = _requests()
    cfg = load_config(None, ["eval.thresholds=[0.0,1.0]", "eval.windows=[1]", "eval.batch_size=5",
                             "eval.rps_samples=10", "eval.bootstrap=50"]).eval
    result = run_sweep(scorer, reqs, labels, cfg, progress=False)
    rows = result["rows"]
    assert [r["kind"] for r in rows] == ["full", "tau", "tau", "m"]
    full = scorer.score_requests(reqs, 5, mode="full").scores.numpy()
    assert abs(rows[0]["auc"] - auc(labels, full)) < 1e-9
    assert rows[0]["mean_exit_layer"] == 4
    # tau = 0 never fires (strict <): every row answers at the last head, as full depth
    assert rows[1]["mean_exit_layer"] == 4 and abs(rows[1]["auc"] - rows[0]["auc"]) < 1e-6
    # tau = 1 always fires: every row leaves at the first eligible head (the third, layer 3)
    assert rows[2]["mean_exit_layer"] == 3 and rows[2]["exit_share"][3] == 1.0
    probs = scorer.score_requests(reqs, 5, mode="all").head_probs
    rule = make_rule("window", tau=1.0, m=int(cfg.window))
    heads = replay(probs, rule)
    assert abs(rows[2]["auc"] - auc(labels, probs[torch.arange(len(reqs)), heads].numpy())) < 1e-9
    assert all(r.get("replay_mismatches", 0) == 0 for r in rows)
    assert all(r["n_rps"] == 10 and r["n_auc"] == len(reqs) and r["rps"] > 0 for r in rows)
    for r in rows:
        assert abs(sum(r["exit_share"].values()) - 1.0) < 1e-9

    paths = write_sweep(result, tmp_path)
    names = {p.name for p in paths}
    assert {"sweep.json", "sweep.csv", "sweep.md", "sweep_threshold.png",
            "sweep_window.png"} <= names
    assert json.loads((tmp_path / "sweep.json").read_text())["rows"][0]["row"] == "full depth"
    lines = (tmp_path / "sweep.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + len(rows)
    assert np.isclose(float(lines[1].split(",")[4]), rows[0]["auc"])


def test_sweep_with_recorded_head_probs_equals_its_own_pass():
    scorer = _scorer(seed=1)
    reqs, labels = _requests(n=16, seed=3)
    cfg = load_config(None, ["eval.thresholds=[0.05,1.0]", "eval.windows=[2]",
                             "eval.batch_size=4", "eval.rps_samples=4", "eval.bootstrap=0"]).eval
    own = run_sweep(scorer, reqs, labels, cfg, progress=False)
    probs = scorer.score_requests(reqs, 3, mode="all").head_probs  # another batching
    given = run_sweep(scorer, reqs, labels, cfg, progress=False, head_probs=probs)
    for a, b in zip(own["rows"], given["rows"]):
        assert abs(a["auc"] - b["auc"]) < 1e-6
        assert a["mean_exit_layer"] == b["mean_exit_layer"]
