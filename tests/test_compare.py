"""gcnee compare: paired AUC differences of llm stages on the same samples."""

import csv
import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from gcnee.cli import main
from gcnee.config import load_config
from gcnee.metrics import auc
from gcnee.report.compare import compare_runs, config_diff


def fake_run(root, name, ids, labels, scores, **overrides):
    d = root / name / "llm"
    d.mkdir(parents=True)
    with open(d / "scores_val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample_id", "label", "tuned", "untuned"])
        for i, y, p in zip(ids, labels, scores):
            w.writerow([i, y, p, 0.5])
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    OmegaConf.save(cfg, d / "config.yaml")
    (d / "summary.json").write_text(json.dumps({
        "prompt_tokens": {"val": {"mean": 120.0, "max": 150}}, "train_samples": 256,
        "final_train_loss": 0.5, "seconds": {"train": 60.0, "total": 300.0}}))


def test_compare_pairs_runs_and_names_their_differences(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ids = np.arange(200)
    y = rng.integers(0, 2, 200)
    good = y * 0.3 + rng.random(200)
    weak = y * 0.1 + rng.random(200)
    fake_run(tmp_path, "ref", ids, y, weak)
    fake_run(tmp_path, "better", ids[::-1], y[::-1], good[::-1], **{"llm.lr": 0.002})
    rows = compare_runs(["ref", "better"], tmp_path, "val", n_boot=200)
    assert rows[0]["diff"] is None and rows[0]["changes"] == []
    assert rows[1]["changes"] == ["llm.lr=0.002"]
    d, lo, hi = rows[1]["diff"]
    assert d == pytest.approx(auc(y, good) - auc(y, weak))  # rows re-sorted by sample id
    assert lo < d < hi and lo > 0  # a clear gain: the paired interval excludes 0
    assert main(["compare", "ref", "better", "--checkpoints-dir", str(tmp_path),
                 "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "| better | llm.lr=0.002 |" in out and "(n=200)" in out


def test_compare_refuses_runs_on_other_samples(tmp_path):
    fake_run(tmp_path, "a", [1, 2, 3, 4], [0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8])
    fake_run(tmp_path, "b", [1, 2, 3, 5], [0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8])
    with pytest.raises(ValueError, match="other val samples"):
        compare_runs(["a", "b"], tmp_path)
    assert main(["compare", "a", "missing", "--checkpoints-dir", str(tmp_path)]) == 1


def test_config_diff_lists_nested_recipe_keys():
    a = load_config(None, [])
    b = load_config(None, ["llm.lora.r=4", "prompt.history_items=5", "trainer.precision=bf16-mixed",
                           "eval.max_samples=10"])
    assert config_diff(a, b) == ["llm.lora.r=4", "prompt.history_items=5",
                                 "trainer.precision=bf16-mixed"]
